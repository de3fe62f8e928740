"""Evaluation: confusion matrix and loss of a model over a (sharded) loader, and of a checkpoint on a dataset."""

import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..data import build_dataset, create_fer_transform, detect_layout
from ..metrics import compute_metrics, confusion_matrix
from ..sources import ModelDescription, build_model, load_model, resolve_description
from .distributed import DistInfo, ShardSampler, all_sum, init_distributed
from .model import autocast

__all__ = ["evaluate", "evaluate_checkpoint"]

PathLike = Union[str, os.PathLike]
DATASET_NAMES = {"rafdb": "RAF-DB", "affectnet": "AffectNet", "fer2013": "FER-2013"}


def batches(loader: DataLoader) -> Iterator[Any]:
    """The batches of ``loader``. An error in a worker process is raised with its own message, as with
    ``workers=0``: torch puts the worker's whole traceback into the message of the error it re-raises."""
    try:
        yield from loader
    except Exception as e:
        first, _, rest = str(e).partition("\n")
        if not (first.startswith("Caught ") and "DataLoader worker" in first and rest):
            raise
        message = rest.rstrip().splitlines()[-1].partition(": ")[2]  # "module.ErrorType: message"
        try:
            error = type(e)(message)
        except Exception:
            error = RuntimeError(message)
        raise error from None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    info: DistInfo,
    amp: bool = False,
    tta_flip: bool = False,
    channels_last: bool = False,
    output_index: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> Tuple[torch.Tensor, float]:
    """Confusion matrix and mean cross-entropy of ``model`` over ``loader``, summed over all ranks.

    With ``tta_flip`` the softmax of each image and of its horizontal flip are averaged. ``output_index[i]``
    is the model output that holds dataset class ``i`` (to map a checkpoint's label order onto the dataset's
    by name); default: the identity.
    """
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=len(loader.sampler) * info.world_size, unit="img", desc="eval", disable=not progress, leave=False)
    for x, y in batches(loader):
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(info.device, amp):
            logits = model(x)
            if output_index is not None:
                logits = logits[:, list(output_index)]
            probs = logits.float().softmax(dim=1)
            if tta_flip:
                flipped = model(x.flip(dims=(3,)))
                if output_index is not None:
                    flipped = flipped[:, list(output_index)]
                probs = (probs + flipped.float().softmax(dim=1)) / 2
        loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").double().cpu()
        cm += confusion_matrix(y.cpu(), probs.argmax(dim=1).cpu(), num_classes)
        bar.update(len(x) * info.world_size)
    bar.close()
    cm = all_sum(cm, info)
    loss_sum = all_sum(loss_sum, info)
    return cm, float(loss_sum) / max(int(cm.sum()), 1)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, info: DistInfo) -> DataLoader:
    """Validation batches in order, this process's disjoint share of them (every image once across processes)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), info.world_size, info.rank),
        num_workers=workers,
        pin_memory=info.device.type == "cuda",
    )


def resolve_layout(data: PathLike, layout: str) -> str:
    """``layout``, or the one detected in ``data`` for ``"auto"``."""
    return detect_layout(data) if layout == "auto" else layout


def dataset_display_name(data: PathLike, layout: str, name: Optional[str] = None) -> str:
    """``name``, else the layout's dataset name (RAF-DB...), else the dataset folder's name."""
    return name or DATASET_NAMES.get(layout) or Path(data).resolve().name


def check_finite_weights(state_dict: Dict[str, torch.Tensor], source: PathLike) -> None:
    """Refuse weights holding NaN/inf: a diverged run's model predicts one class, whatever the input."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ValueError(
            f"{source} holds NaN/inf weights ({len(bad)} tensors: {shown}): the training diverged or the file is "
            "damaged. Use an earlier checkpoint of the run, or train again with a lower --lr."
        )


def _check_sizes(**sizes: Optional[int]) -> None:
    for name, value in sizes.items():
        low = 0 if name == "workers" else 1
        if value is not None and value < low:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be at least {low}, got {value}.")


def evaluate_checkpoint(
    checkpoint: PathLike,
    data: PathLike,
    split: str = "test",
    layout: str = "auto",
    model_name: Optional[str] = None,
    model_args: Optional[Dict[str, Any]] = None,
    num_classes: Optional[int] = None,
    label_names: Optional[Sequence[str]] = None,
    img_size: Optional[int] = None,
    resize: Optional[int] = None,
    batch_size: int = 64,
    workers: int = 4,
    device: Optional[str] = None,
    amp: bool = False,
    tta_flip: bool = False,
    skip_unreadable: bool = False,
    dataset_name: Optional[str] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """Evaluate a checkpoint or trained model on one split of a dataset; returns the ``metrics.json`` dict.

    ``checkpoint`` is a weights file, or any other model source :func:`~timm_acsi.sources.load_model` reads: a
    run folder, a tag with weights (``acsinet18.fer2013``), a Hub folder, ``local-dir:`` or ``hf-hub:``.
    Architecture (with its ``model_args``), classes, label names and preprocessing (crop, and grayscale faces
    for a model trained on them) come from its description, read by the rules every command uses
    (:func:`~timm_acsi.sources.resolve_description`); arguments that contradict it raise. A weights file without
    one needs ``model_name`` (and the ``model_args`` of a variant, e.g. ``{"attn_placement": "stage"}``) and
    ``label_names`` (the classes in the order of the model's outputs). Outputs are matched to the dataset's
    classes by label *name*. ``resize`` defaults to ``round(img_size / crop_pct)`` with the model's
    ``crop_pct`` (the recipe's 224 / 256 if it has none). Weights holding NaN/inf are refused.
    """
    _check_sizes(img_size=img_size, resize=resize, batch_size=batch_size, workers=workers)
    overrides = dict(model_name=model_name, model_args=model_args, num_classes=num_classes, label_names=label_names)
    if Path(checkpoint).is_file():
        model, desc = _load_weights_file(checkpoint, overrides)
    else:
        model, desc = _load_model_source(str(checkpoint), overrides)
    img_size = img_size or desc.input_size[-1]
    resize = resize or round(img_size / desc.crop_pct)

    info = init_distributed(device)
    model = model.to(info.device)

    transform = create_fer_transform(False, img_size=img_size, resize=resize, grayscale=desc.grayscale)
    dataset = build_dataset(data, split, layout, desc.num_classes, transform=transform, skip_unreadable=skip_unreadable)
    missing = sorted(set(dataset.label_names) - set(desc.label_names))
    if missing:
        raise ValueError(
            f"The checkpoint has no output for dataset class(es) {missing}; its labels are {desc.label_names}."
        )
    output_index = [desc.label_names.index(n) for n in dataset.label_names]
    cm, _ = evaluate(
        model,
        eval_loader(dataset, batch_size, workers, info),
        len(dataset.label_names),
        info,
        amp=amp,
        tta_flip=tta_flip,
        output_index=None if output_index == list(range(desc.num_classes)) else output_index,
        progress=progress and info.is_main,
    )
    name = dataset_display_name(data, resolve_layout(data, layout), dataset_name)
    return compute_metrics(cm, dataset.label_names, name, split)


#: evaluate_checkpoint's arguments that describe a bare weights file, and their command-line flags.
_DESCRIPTION_FLAGS = {
    "model_name": "--model",
    "model_args": "--model-args",
    "num_classes": "--num-classes",
    "label_names": "--label-names",
}


def _load_weights_file(checkpoint: PathLike, overrides: Dict[str, Any]) -> Tuple[nn.Module, ModelDescription]:
    """The model of a weights file and its description (from its meta, completed or checked by ``overrides``)."""
    state_dict, meta = load_checkpoint(checkpoint)
    desc = resolve_description(
        meta,
        str(checkpoint),
        architecture=overrides["model_name"],
        label_names=overrides["label_names"],
        model_args=overrides["model_args"],
        num_classes=overrides["num_classes"],
        state_dict=state_dict,
    )
    check_finite_weights(state_dict, checkpoint)
    return build_model(desc, state_dict, str(checkpoint)), desc


def _load_model_source(source: str, overrides: Dict[str, Any]) -> Tuple[nn.Module, ModelDescription]:
    """The model of a run folder, tag or Hub source, which all describe themselves, and the facts evaluation uses."""
    given = [flag for name, flag in _DESCRIPTION_FLAGS.items() if overrides[name] is not None]
    if given:
        verb = "describes" if len(given) == 1 else "describe"
        raise ValueError(f"{' and '.join(given)} {verb} a bare weights file; {source} describes itself.")
    loaded = load_model(source)
    check_finite_weights(loaded.model.state_dict(), source)
    config = loaded.data_config
    desc = ModelDescription(
        architecture=loaded.architecture,
        num_classes=len(loaded.label_names),
        label_names=loaded.label_names,
        model_args={},
        input_size=tuple(config["input_size"]),
        crop_pct=config["crop_pct"],
        grayscale=loaded.grayscale,
    )
    return loaded.model, desc
