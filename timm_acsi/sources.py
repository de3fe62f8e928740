"""Model sources: one resolver from a name, tag, Hub repo, folder or checkpoint to a ready expression model.

The predictor, the ONNX export, evaluate and publish build their model here, so every command reads
checkpoint descriptions and loads weights by the same rules. Stable API::

    load_model(source, device="cpu", *, architecture=None, label_names=None, model_args=None,
               grayscale=None, **model_kwargs) -> LoadedModel
    resolve_description(meta, source, *, architecture=None, label_names=None, model_args=None,
                        num_classes=None, grayscale=None, dataset=None, state_dict=None,
                        arch_flag="--model") -> ModelDescription
    build_model(description, state_dict=None, source="", *, arch_flag="--model", **model_kwargs) -> nn.Module

Sources accepted by :func:`load_model`:

- a timm name or ``name.tag`` whose pretrained config has weights (``pretrained=True``), e.g.
  ``acsinet18.fer2013``; ``model_kwargs`` go to ``timm.create_model`` (e.g. ``pretrained_cfg_overlay``);
- ``hf-hub:ORG/NAME[@REVISION]`` and ``local-dir:PATH``: timm's Hub folders (``config.json`` +
  ``model.safetensors``), as ``timm-acsi publish`` writes them;
- a checkpoint written by ``timm-acsi train`` (``.safetensors``; ``.pth``/``.pt``/``.bin``/``.ckpt`` are read
  with ``torch.load(weights_only=True)``): its JSON description gives architecture, model_args, num_classes,
  label_names, input_size, crop_pct and grayscale. A checkpoint without one needs ``architecture`` and
  ``label_names`` (and the ``model_args`` of a variant);
- a run folder (its ``best.safetensors``), or a folder holding ``config.json`` + ``model.safetensors``.

The model is built through ``timm.create_model`` with a pretrained config carrying the label names, input size
and crop, so ``timm.data.resolve_data_config(model=model)`` gives the preprocessing it was trained with.
Weights load strictly; a mismatch says what the file's keys look like instead of torch's key dump.

Grayscale models (trained on FER-2013's gray faces) say so with ``"grayscale": true`` in their checkpoint
description, as ``model.grayscale`` (CoResNet's ``grayscale`` argument: set by the ``.fer2013`` tags and recorded
in a Hub ``config.json``'s ``model_args``), or as a ``grayscale`` key of a ``config.json`` (top level or inside
``pretrained_cfg``; timm's ``PretrainedCfg`` has no such field, so it is taken out before timm sees it). The
returned model always has ``model.grayscale`` set, and :attr:`LoadedModel.grayscale` says the same.
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.models import (
    get_arch_pretrained_cfgs,
    model_entrypoint,
    resolve_pretrained_cfg,
    split_model_name_tag,
)
from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
from torch import nn

from . import models  # noqa: F401  (registers coresnet*/acsinet* with timm)
from .checkpoint import PICKLE_SUFFIXES, load_checkpoint, load_weights
from .labels import check_label_names

__all__ = [
    "LoadedModel",
    "ModelDescription",
    "load_model",
    "resolve_description",
    "build_model",
    "file_sha256",
    "is_own_model",
    "own_models",
    "classifier_outputs",
    "DEFAULT_CROP_PCT",
]

PathLike = Union[str, os.PathLike]
#: The paper's evaluation crop (resize to 256, centre crop 224), for descriptions that record none.
DEFAULT_CROP_PCT = 224 / 256
#: Preprocessing ``timm-acsi train`` always uses; a description may override each.
TRAIN_PREPROCESSING = dict(interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
RUN_CHECKPOINT = "best.safetensors"
HUB_CONFIG = "config.json"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass
class LoadedModel:
    """A ready model and what a consumer needs to feed it and read its outputs."""

    model: nn.Module  # eval mode, on the device asked for
    architecture: str  # e.g. "acsinet18"
    label_names: Tuple[str, ...]  # output i is label_names[i]
    data_config: Dict[str, Any]  # resolve_data_config(model=model): input_size, mean, std, interpolation, crop...
    grayscale: bool  # faces must be fed as grayscale replicated to 3 channels
    source: str  # what was loaded, for messages and metadata
    weights_sha256: Optional[str] = None  # sha256 of the weights file, when there is one
    description: Dict[str, Any] = field(default_factory=dict)  # checkpoint description / pretrained cfg facts


@dataclass(frozen=True)
class ModelDescription:
    """Everything needed to rebuild a trained model: the resolved form of a checkpoint description."""

    architecture: str
    num_classes: int
    label_names: Tuple[str, ...]
    model_args: Dict[str, Any]
    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = DEFAULT_CROP_PCT
    grayscale: bool = False
    interpolation: str = TRAIN_PREPROCESSING["interpolation"]
    mean: Tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    std: Tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
    dataset: Optional[str] = None

    def pretrained_cfg(self) -> Dict[str, Any]:
        """A timm pretrained config (no weights source) that gives this model's preprocessing and labels."""
        default = resolve_pretrained_cfg(self.architecture)
        return dict(
            architecture=self.architecture,
            num_classes=self.num_classes,
            label_names=self.label_names,
            input_size=self.input_size,
            pool_size=(math.ceil(self.input_size[1] / 32), math.ceil(self.input_size[2] / 32)),  # 48 -> 2x2
            crop_pct=self.crop_pct,
            crop_mode="center",
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            first_conv=default.first_conv or "conv1",
            classifier=default.classifier or "fc",
        )

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# ------------------------------------------------------------------------------------------ descriptions

#: What the checkpoint says against what an argument says, and how to drop the argument (``flag``: the
#: architecture's option, ``--model`` or ``--arch``).
_CONTRADICTIONS = {
    "architecture": "says architecture {known}, not {given}: drop the model name ({flag})",
    "model_args": "says model_args {known}, not {given}: drop --model-args",
    "num_classes": "says it has {known} classes, not {given}: drop num_classes (--num-classes)",
    "label_names": "says its outputs are {known}, not {given}: drop label_names (--label-names)",
    "grayscale": "says grayscale={known}, not {given}: drop grayscale (--grayscale)",
    "dataset": "says dataset {known}, not {given}: drop --dataset",
}
_LABEL_NAMES_FIX = (
    "label_names, one per output in the order of the model's outputs (e.g. --label-names "
    "anger,disgust,fear,happiness,sadness,surprise,neutral; RAF-DB's own order starts with surprise)"
)


def _known(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """What a description says about each argument of :func:`resolve_description` (``None``: nothing)."""
    names = meta.get("label_names")
    return dict(
        architecture=meta.get("architecture"),
        model_args=meta.get("model_args"),
        num_classes=meta.get("num_classes") or (len(names) if names else None),
        label_names=list(check_label_names(names, len(names))) if names else None,
        grayscale=meta.get("grayscale"),
        dataset=meta.get("dataset"),
    )


def _refuse_contradictions(known: Mapping[str, Any], given: Mapping[str, Any], source: str, flag: str) -> None:
    """Refuse arguments that contradict what the checkpoint says about itself (it was written with the weights)."""
    found = [
        _CONTRADICTIONS[k].format(known=known[k], given=v, flag=flag) for k, v in given.items() if _differs(v, known[k])
    ]
    if found:
        raise ValueError(f"{source} " + "; it ".join(found) + ".")


def _differs(given: Any, known: Any) -> bool:
    if given is None or known is None:
        return False
    if isinstance(given, (list, tuple)) and isinstance(known, (list, tuple)):
        return list(given) != list(known)
    return given != known


def _missing(source: str, missing: Sequence[str], outputs: Optional[int], flag: str) -> str:
    """The message for a description without ``missing`` (``architecture``, ``label_names``): what to pass."""
    what = dict(
        architecture="its architecture",
        label_names=f"the order of its {outputs} outputs" if outputs else "the order of its outputs",
    )
    fixes = dict(
        architecture=f"the model name ({flag}, e.g. acsinet18; and --model-args for a variant such as "
        "attn_placement=stage)",
        label_names=_LABEL_NAMES_FIX,
    )
    return (
        f"{source} does not record {' nor '.join(what[k] for k in missing)} (no {' and no '.join(missing)} in its "
        f"description): pass {' and '.join(fixes[k] for k in missing)}."
    )


def _crop_pct(value: Any, source: str) -> float:
    if value is None:
        return DEFAULT_CROP_PCT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"{source}: crop_pct {value!r} is not a positive number (eval crop size / resize size, e.g. 0.875 for "
            "224/256): fix its description."
        )
    return float(value)


def _input_size(value: Any, source: str) -> Tuple[int, int, int]:
    if value is None:
        return (3, 224, 224)
    size = tuple(value)
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"{source}: input_size {value!r} is not [channels, height, width]: fix its description.")
    return size


def classifier_outputs(architecture: str, state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The number of outputs of the architecture's classifier (timm's pretrained cfg names it) in a state dict."""
    classifier = resolve_pretrained_cfg(architecture).classifier or "fc"
    weight = state_dict.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def resolve_description(
    meta: Optional[Mapping[str, Any]],
    source: str,
    *,
    architecture: Optional[str] = None,
    label_names: Optional[Sequence[str]] = None,
    model_args: Optional[Mapping[str, Any]] = None,
    num_classes: Optional[int] = None,
    grayscale: Optional[bool] = None,
    dataset: Optional[str] = None,
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
    arch_flag: str = "--model",
) -> ModelDescription:
    """Merge a checkpoint description with explicit arguments; an argument that contradicts it raises.

    ``meta`` is what :func:`~timm_acsi.checkpoint.load_checkpoint` returns (``None`` for a bare state dict).
    Architecture and label names are required from one or the other; ``num_classes`` defaults to the number
    of label names. A tag on the architecture (``acsinet18.rafdb``) is dropped. Label names are canonicalised
    (``happy`` -> ``happiness``), never reordered. Missing input size / crop take the paper's 224 / 256.
    ``state_dict`` (the checkpoint's weights) lets a message say how many outputs need label names;
    ``arch_flag`` is the command's option for the architecture (``--model``; the predictor's is ``--arch``).
    """
    meta = dict(meta or {})
    known = _known(meta)
    base = split_model_name_tag(architecture)[0] if architecture else None
    given = dict(
        architecture=base,
        model_args=dict(model_args) if model_args is not None else None,
        num_classes=num_classes,
        label_names=list(check_label_names(label_names, len(label_names))) if label_names else None,
        grayscale=grayscale,
        dataset=dataset,
    )
    _refuse_contradictions(known, given, source, arch_flag)
    arch = known["architecture"] or base
    names = meta.get("label_names") or label_names
    missing = [k for k, v in (("architecture", arch), ("label_names", names)) if not v]
    if missing:
        outputs = known["num_classes"] or num_classes
        if arch and not outputs and state_dict is not None and timm.is_model(arch):
            outputs = classifier_outputs(arch, state_dict)
        raise ValueError(_missing(source, missing, outputs, arch_flag))
    if not timm.is_model(arch):
        raise ValueError(
            f"{source}: unknown architecture {arch!r}: pass a timm model name ({arch_flag}); timm-acsi's are "
            f"{', '.join(own_models())}."
        )
    n = int(known["num_classes"] or num_classes or len(names))
    return ModelDescription(
        architecture=arch,
        num_classes=n,
        label_names=check_label_names(names, n),
        model_args=dict(meta.get("model_args") or model_args or {}),
        input_size=_input_size(meta.get("input_size"), source),
        crop_pct=_crop_pct(meta.get("crop_pct"), source),
        grayscale=bool(known["grayscale"] if known["grayscale"] is not None else grayscale),
        interpolation=meta.get("interpolation") or TRAIN_PREPROCESSING["interpolation"],
        mean=tuple(meta.get("mean") or TRAIN_PREPROCESSING["mean"]),
        std=tuple(meta.get("std") or TRAIN_PREPROCESSING["std"]),
        dataset=known["dataset"] or dataset,
    )


def own_models() -> Sequence[str]:
    """timm-acsi's registered architectures (coresnet*, acsinet*)."""
    return timm.list_models(module="coresnet")


# ------------------------------------------------------------------------------------------------ models

_FIT_HINT = "Pass the architecture (and model_args) it was trained as."


def build_model(
    description: ModelDescription,
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
    source: str = "",
    *,
    arch_flag: str = "--model",
    **model_kwargs: Any,
) -> nn.Module:
    """The timm model of ``description`` (its pretrained cfg set), with ``state_dict`` loaded strictly, in eval mode.

    ``arch_flag`` is the command's option for the architecture, named by the message of weights that do not fit.
    """
    arch, model_args = description.architecture, description.model_args
    kwargs = {**model_args, **model_kwargs}
    if description.grayscale and is_own_model(arch):
        kwargs["grayscale"] = True  # CoResNet records it (model.grayscale, and config.json via save_for_hf)
    try:
        model = timm.create_model(
            arch, num_classes=description.num_classes, pretrained_cfg=description.pretrained_cfg(), **kwargs
        )
    except TypeError as e:
        raise ValueError(
            f"{arch} does not accept model_args {json.dumps(model_args)} ({e}): pass only its create_model arguments "
            "in --model-args."
        ) from e
    model.grayscale = description.grayscale
    if state_dict is not None:
        target = arch + (f" with model_args {json.dumps(model_args)}" if model_args else "")
        hint = f"Pass the architecture ({arch_flag}) and model_args (--model-args) it was trained as."
        load_weights(model, state_dict, source or "The state dict", target, hint=hint)
    return model.eval()


def is_own_model(architecture: str) -> bool:
    """Whether ``architecture`` is one of timm-acsi's (registered by :mod:`timm_acsi.models`)."""
    return timm.is_model(architecture) and model_entrypoint(architecture).__module__.startswith("timm_acsi.")


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- sources


def load_model(
    source: str,
    device: Union[str, torch.device] = "cpu",
    *,
    architecture: Optional[str] = None,
    label_names: Optional[Sequence[str]] = None,
    model_args: Optional[Mapping[str, Any]] = None,
    grayscale: Optional[bool] = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """Resolve ``source`` (see the module docstring) to an eval-mode model on ``device`` and its facts.

    ``architecture``, ``label_names``, ``model_args`` and ``grayscale`` describe checkpoints that carry no
    description (they must agree with one that does); ``model_kwargs`` go to ``timm.create_model``.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a folder without weights, a checkpoint without description and without the arguments
            that replace it, an unknown model name, a tag without weights, weights that do not fit.
    """
    overrides = dict(architecture=architecture, label_names=label_names, model_args=model_args, grayscale=grayscale)
    source = str(source)
    if source.startswith(("hf-hub:", "local-dir:")):
        loaded = _load_hub(source, **model_kwargs)
    elif _is_path(source):
        loaded = _load_path(Path(source), overrides, **model_kwargs)
    else:
        loaded = _load_tag(source, **model_kwargs)
    loaded.model.to(device).eval()
    return loaded


def _is_path(source: str) -> bool:
    """A path, existing or meant to: anything on disk, with a separator, or with a weights suffix."""
    return os.path.exists(source) or os.sep in source or "/" in source or source.endswith(WEIGHT_SUFFIXES)


def _load_path(path: Path, overrides: Dict[str, Any], **model_kwargs: Any) -> LoadedModel:
    if path.is_dir():
        if (path / RUN_CHECKPOINT).is_file():
            path = path / RUN_CHECKPOINT
        elif (path / HUB_CONFIG).is_file():
            return _load_hub(f"local-dir:{path}", **model_kwargs)
        else:
            raise ValueError(
                f"{path} is a folder without {RUN_CHECKPOINT} (a run folder of timm-acsi train) or {HUB_CONFIG} + "
                f"model.safetensors (a Hub folder): pass the checkpoint file itself, or the run folder."
            )
    if not path.exists():
        raise FileNotFoundError(f"No such checkpoint or folder: {path}.")
    state_dict, meta = load_checkpoint(path)
    desc = resolve_description(meta, str(path), **overrides, state_dict=state_dict, arch_flag="--arch")
    model = build_model(desc, state_dict, str(path), arch_flag="--arch", **model_kwargs)
    return _loaded(
        model, desc.architecture, desc.label_names, desc.grayscale, str(path), path, {**(meta or {}), **desc.to_dict()}
    )


def _hub_files(source: str) -> Tuple[Dict[str, Any], Path]:
    """Raw ``config.json`` and the weights file of a ``hf-hub:``/``local-dir:`` source."""
    kind, _, ref = source.partition(":")
    if kind == "local-dir":
        folder = Path(ref)
        if not (folder / HUB_CONFIG).is_file():
            raise FileNotFoundError(f"{source}: no {HUB_CONFIG} in {folder} (a folder written by timm-acsi publish).")
        weights = next((folder / n for n in HUB_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{source}: {folder} holds {HUB_CONFIG} but no {' or '.join(HUB_WEIGHTS)}.")
        return json.loads((folder / HUB_CONFIG).read_text()), weights
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = ref.partition("@")
    config = Path(hf_hub_download(repo_id, HUB_CONFIG, revision=revision or None))
    weights = Path(hf_hub_download(repo_id, HUB_WEIGHTS[0], revision=revision or None))
    return json.loads(config.read_text()), weights


def _load_hub(source: str, **model_kwargs: Any) -> LoadedModel:
    """timm's Hub format, weights read here (strictly, with readable errors) rather than by timm."""
    raw, weights = _hub_files(source)
    kind, _, ref = source.partition(":")
    cfg, arch, model_args = load_model_config_from_path(ref) if kind == "local-dir" else load_model_config_from_hf(ref)
    flagged = bool(cfg.pop("grayscale", None) or raw.get("grayscale", False))
    if not cfg.get("label_names"):
        raise ValueError(f"{source}: its {HUB_CONFIG} lists no label_names, so its outputs cannot be named.")
    try:
        model = timm.create_model(arch, pretrained=False, pretrained_cfg=cfg, **{**model_args, **model_kwargs})
    except TypeError as e:
        raise ValueError(f"{source}: model_args {model_args} do not fit {arch} ({e}).") from e
    state_dict, _ = load_checkpoint(weights)
    load_weights(model, state_dict, source, arch, hint=_FIT_HINT)
    grayscale = model.grayscale = flagged or bool(getattr(model, "grayscale", False))
    facts = {"architecture": arch, "model_args": dict(model_args), "grayscale": grayscale, **model.pretrained_cfg}
    return _loaded(model, arch, tuple(cfg["label_names"]), grayscale, source, weights, facts)


def _load_tag(source: str, **model_kwargs: Any) -> LoadedModel:
    """A registered timm name or tag whose pretrained config has weights."""
    name, tag = split_model_name_tag(source)
    if not timm.is_model(name):
        raise ValueError(
            f"{source!r} is neither a file or folder nor a timm model name: pass a checkpoint, a run folder, "
            f"hf-hub:ORG/NAME, local-dir:PATH or a model tag with weights (timm-acsi: {', '.join(own_models())})."
        )
    try:
        cfg = resolve_pretrained_cfg(name, tag or None, model_kwargs.get("pretrained_cfg_overlay"))
    except RuntimeError as e:  # timm: "Invalid pretrained tag (...)"
        raise ValueError(f"{e} Tags of {name}: {', '.join(get_arch_pretrained_cfgs(name))}.") from e
    if not cfg.has_weights:
        usable = [t for t in timm.list_pretrained(f"{name}.*") if _is_expression_tag(name, t.split(".", 1)[1])]
        raise ValueError(
            f"{name}.{cfg.tag} has no weights published: pass a trained checkpoint or run folder, hf-hub:ORG/NAME"
            + (f", or a tag with expression weights ({', '.join(usable)})." if usable else ".")
        )
    if not cfg.label_names:  # checked before any download
        raise ValueError(
            f"{name}.{cfg.tag}'s pretrained config lists no label_names ({cfg.num_classes} classes): it is not an "
            "expression model (ImageNet tags initialise training only). Pass a trained FER model."
        )
    model = timm.create_model(source, pretrained=True, **model_kwargs)
    pcfg = dict(model.pretrained_cfg)
    grayscale = model.grayscale = bool(getattr(model, "grayscale", False) or pcfg.get("grayscale", False))
    facts = {"architecture": name, "tag": cfg.tag, **pcfg}
    return _loaded(model, name, tuple(pcfg["label_names"]), grayscale, source, _tag_weights_file(cfg), facts)


def _is_expression_tag(name: str, tag: str) -> bool:
    cfg = resolve_pretrained_cfg(name, tag)
    return bool(cfg.has_weights and cfg.label_names)


def _tag_weights_file(cfg: Any) -> Optional[Path]:
    """The local file a tag's weights came from: its ``file``, or the Hub cache entry (no download)."""
    if cfg.file:
        return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        found = try_to_load_from_cache(repo_id, cfg.hf_hub_filename or HUB_WEIGHTS[0], revision=revision or None)
        return Path(found) if isinstance(found, str) else None
    return None


def _loaded(
    model: nn.Module,
    architecture: str,
    label_names: Sequence[str],
    grayscale: bool,
    source: str,
    weights: Optional[Path],
    facts: Dict[str, Any],
) -> LoadedModel:
    if len(label_names) != model.num_classes:
        raise ValueError(f"{source}: {len(label_names)} label names for a {model.num_classes}-class head.")
    return LoadedModel(
        model=model,
        architecture=architecture,
        label_names=tuple(label_names),
        data_config=resolve_data_config(model=model),
        grayscale=grayscale,
        source=source,
        weights_sha256=file_sha256(weights) if weights is not None and weights.is_file() else None,
        description=facts,
    )
