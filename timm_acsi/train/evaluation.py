"""Evaluation: confusion matrix and loss of a model over a (sharded) loader, and of a checkpoint on a dataset."""

import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..data import build_dataset, create_fer_transform, detect_layout
from ..labels import check_label_names
from ..metrics import compute_metrics, confusion_matrix
from .distributed import DistInfo, ShardSampler, all_sum, init_distributed
from .model import autocast, build_model, classifier_name, load_weights

__all__ = ["evaluate", "evaluate_checkpoint"]

PathLike = Union[str, os.PathLike]
DATASET_NAMES = {"rafdb": "RAF-DB", "affectnet": "AffectNet", "fer2013": "FER-2013"}
#: The recipe's evaluation crop (resize 256, centre crop 224), for checkpoints that record none.
DEFAULT_CROP_PCT = 224 / 256


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


def eval_loader(dataset, batch_size: int, workers: int, info: DistInfo) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), info.world_size, info.rank),
        num_workers=workers,
        pin_memory=info.device.type == "cuda",
    )


def resolve_layout(data: PathLike, layout: str) -> str:
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
    """Evaluate a checkpoint on one split of a dataset; returns the ``metrics.json`` dict.

    Architecture (with its ``model_args``), classes, label names and preprocessing (crop, and grayscale faces
    for a model trained on them) come from the checkpoint's description; arguments that contradict it raise. A
    checkpoint without one needs ``model_name`` (and the ``model_args`` of a variant, e.g.
    ``{"attn_placement": "stage"}``) and ``label_names`` (the classes in the order of the model's outputs; their
    count is the classifier's unless ``num_classes`` says otherwise). Outputs are matched to the dataset's
    classes by label *name*. ``resize`` defaults to ``round(img_size / crop_pct)`` with the checkpoint's
    ``crop_pct`` (the recipe's 224 / 256 if it has none). Weights holding NaN/inf are refused.
    """
    _check_sizes(img_size=img_size, resize=resize, batch_size=batch_size, workers=workers)
    state_dict, meta = load_checkpoint(checkpoint)
    meta = meta or {}
    arch, model_args = _architecture(checkpoint, meta, model_name, model_args)
    n_out = _num_outputs(checkpoint, meta, state_dict, arch, num_classes, label_names)
    ckpt_names = _label_names(checkpoint, meta, n_out, label_names)
    check_finite_weights(state_dict, checkpoint)
    img_size = img_size or (meta.get("input_size") or [3, 224, 224])[-1]
    resize = resize or round(img_size / (meta.get("crop_pct") or DEFAULT_CROP_PCT))

    info = init_distributed(device)
    model = build_model(arch, n_out, model_args)
    load_weights(model, state_dict, checkpoint, arch)
    model.to(info.device)

    transform = create_fer_transform(False, img_size=img_size, resize=resize, grayscale=bool(meta.get("grayscale")))
    dataset = build_dataset(data, split, layout, n_out, transform=transform, skip_unreadable=skip_unreadable)
    missing = sorted(set(dataset.label_names) - set(ckpt_names))
    if missing:
        raise ValueError(f"The checkpoint has no output for dataset class(es) {missing}; its labels are {ckpt_names}.")
    output_index = [ckpt_names.index(n) for n in dataset.label_names]
    cm, _ = evaluate(
        model,
        eval_loader(dataset, batch_size, workers, info),
        len(dataset.label_names),
        info,
        amp=amp,
        tta_flip=tta_flip,
        output_index=None if output_index == list(range(n_out)) else output_index,
        progress=progress and info.is_main,
    )
    name = dataset_display_name(data, resolve_layout(data, layout), dataset_name)
    return compute_metrics(cm, dataset.label_names, name, split)


def _architecture(
    checkpoint: PathLike, meta: Dict[str, Any], model_name: Optional[str], model_args: Optional[Dict[str, Any]]
) -> Tuple[str, Dict[str, Any]]:
    """The architecture and model_args: the description's, else the arguments; contradictions raise."""
    arch = meta.get("architecture")
    if model_name and arch and model_name.split(".", 1)[0] != arch:
        raise ValueError(f"{checkpoint} says architecture {arch}, not {model_name}: drop the model name (--model).")
    if model_args is not None and meta.get("model_args") is not None and dict(model_args) != meta["model_args"]:
        raise ValueError(
            f"{checkpoint} says model_args {meta['model_args']}, not {dict(model_args)}: drop --model-args."
        )
    arch = arch or model_name
    if not arch:
        raise ValueError(f"{checkpoint} has no description naming its architecture: pass the model name (--model).")
    if not timm.is_model(arch):
        raise ValueError(f"Unknown model {arch!r}: pass a timm model name (--model), e.g. acsinet18.")
    return arch, dict(meta.get("model_args") or model_args or {})


def _num_outputs(
    checkpoint: PathLike,
    meta: Dict[str, Any],
    state_dict: Dict[str, torch.Tensor],
    arch: str,
    num_classes: Optional[int],
    label_names: Optional[Sequence[str]],
) -> int:
    """The model's number of outputs: the description's, the arguments', else the classifier's size."""
    meta_classes = meta.get("num_classes") or len(meta.get("label_names") or []) or None
    if num_classes and meta_classes not in (None, num_classes):
        raise ValueError(
            f"{checkpoint} says it has {meta_classes} classes, not {num_classes}: drop num_classes (--num-classes)."
        )
    n_out = num_classes or meta_classes or (len(label_names) if label_names else None)
    head = state_dict.get(f"{classifier_name(arch)}.weight")
    n_out = n_out or (head.shape[0] if head is not None and head.ndim == 2 else None)
    if n_out is None:
        raise ValueError(f"{checkpoint} does not say how many classes it has: pass num_classes (--num-classes 7 or 8).")
    return n_out


def _label_names(
    checkpoint: PathLike, meta: Dict[str, Any], n_out: int, label_names: Optional[Sequence[str]]
) -> Tuple[str, ...]:
    """The class of each output: the description's (arguments must agree), else ``label_names``."""
    if meta.get("label_names"):
        ckpt_names = check_label_names(meta["label_names"], n_out)
        if label_names and check_label_names(label_names, n_out) != ckpt_names:
            raise ValueError(
                f"{checkpoint} says its outputs are {list(ckpt_names)}, not {list(label_names)}: drop label_names "
                "(--label-names)."
            )
        return ckpt_names
    if label_names:
        return check_label_names(label_names, n_out)
    raise ValueError(
        f"{checkpoint} does not record the order of its {n_out} outputs (no label_names in its description): "
        "pass label_names, one per output in the order of the model's outputs (e.g. --label-names "
        "anger,disgust,fear,happiness,sadness,surprise,neutral; RAF-DB's own order starts with surprise)."
    )
