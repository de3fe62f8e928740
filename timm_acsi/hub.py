"""Publish a trained checkpoint to the Hugging Face Hub in timm's format, after checking it.

A published repo holds what timm's own Hub models hold: ``model.safetensors`` (a state dict, never a
pickle), ``config.json`` (architecture, num_classes, label_names, model_args, pretrained_cfg with the
preprocessing) and a ``README.md`` model card generated from the checkpoint, the profiler and the
evaluation results. Once ``timm_acsi`` is imported, ``timm.create_model("hf-hub:ORG/NAME",
pretrained=True)`` rebuilds the model with identical outputs.

Nothing leaves the machine before the checkpoint has loaded strictly into the named architecture, its
label names fit the head, and a forward pass is finite. Errors name the problem and the fix.
"""

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
from huggingface_hub import EvalResult, HfApi, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HTTPError
from timm.models import get_pretrained_cfg, is_model, model_entrypoint, save_for_hf, split_model_name_tag
from torch import nn

from .checkpoint import compare_state_dicts, describe_state_dict, load_checkpoint
from .labels import canonical_label, check_label_names

__all__ = [
    "PublishSpec",
    "EvalMetrics",
    "PublishResult",
    "resolve_publish_spec",
    "describe_state_dict",
    "build_checked_model",
    "load_eval_metrics",
    "make_model_card",
    "write_hub_folder",
    "publish",
]

PathLike = Union[str, os.PathLike]

HUB_FILES = ("config.json", "model.safetensors", "README.md")
# The PyPI name once released; until then the card also says how to install from a checkout.
INSTALL_COMMAND = "pip install timm-acsi"
DEFAULT_CROP_PCT = 0.875  # the paper's test preprocessing: resize to 256, centre crop 224
CARD_TAGS = ("image-classification", "timm", "facial-expression-recognition", "emotion-recognition", "timm-acsi")
PAPER_CITATION = (
    'Li, X.; Zhu, C.; Zhou, F. "Facial Expression Recognition: One Attention-Modulated Contextual Spatial '
    'Information Network." *Entropy* **2022**, 24, 882. [doi:10.3390/e24070882](https://doi.org/10.3390/e24070882)'
)
PAPER_BIBTEX = """@article{li2022acsinet,
  title   = {Facial Expression Recognition: One Attention-Modulated Contextual Spatial Information Network},
  author  = {Li, Xue and Zhu, Chunhua and Zhou, Fei},
  journal = {Entropy},
  volume  = {24},
  number  = {7},
  pages   = {882},
  year    = {2022},
  doi     = {10.3390/e24070882}
}"""
# accepted spellings in a metrics file, first match wins
_ACC_KEYS = ("accuracy", "top1", "top1_acc", "acc", "overall_acc", "overall_accuracy")
_MCA_KEYS = ("mean_class_accuracy", "mean_class_acc", "balanced_acc", "balanced_accuracy")
_PER_CLASS_KEYS = ("per_class_accuracy", "per_class", "per_class_acc")


@dataclass(frozen=True)
class PublishSpec:
    """Everything needed to rebuild and describe the published model."""

    architecture: str
    num_classes: int
    label_names: Tuple[str, ...]
    model_args: Dict[str, Any] = field(default_factory=dict)
    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = DEFAULT_CROP_PCT
    dataset: Optional[str] = None
    license: str = "other"


@dataclass(frozen=True)
class EvalMetrics:
    """Evaluation results for the model card, in percent (``None`` where the file has no value)."""

    accuracy: Optional[float] = None
    mean_class_accuracy: Optional[float] = None
    per_class_accuracy: Dict[str, Optional[float]] = field(default_factory=dict)
    confusion_matrix: Optional[List[List[int]]] = None
    dataset: Optional[str] = None
    split: Optional[str] = None
    num_samples: Optional[int] = None


@dataclass(frozen=True)
class PublishResult:
    """What :func:`publish` did: the folder written (dry run) or the Hub commit made."""

    spec: PublishSpec
    params: int
    gflops: float
    files: Tuple[str, ...]
    commit_message: str
    metrics: Optional[EvalMetrics] = None
    folder: Optional[Path] = None
    commit_url: Optional[str] = None


def _differs(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a != b


def resolve_publish_spec(
    meta: Optional[Mapping[str, Any]],
    model: Optional[str] = None,
    num_classes: Optional[int] = None,
    label_names: Optional[Sequence[str]] = None,
    model_args: Optional[Mapping[str, Any]] = None,
    dataset: Optional[str] = None,
    license: Optional[str] = None,
) -> PublishSpec:
    """Merge a checkpoint's meta with explicit arguments; an argument that contradicts the meta is an error.

    Architecture and label names are required (from the meta or the arguments); ``num_classes`` defaults
    to the number of label names. Label names are canonicalised (``happy`` -> ``happiness``), never reordered.
    ``crop_pct`` (the eval crop size over the resize size) comes from the meta; checkpoints without it get
    the paper's 224/256.
    """
    meta = dict(meta or {})
    names = tuple(label_names) if label_names is not None else None
    meta_names = tuple(meta["label_names"]) if meta.get("label_names") is not None else None
    conflicts = [
        f"{flag} {given!r} (checkpoint meta: {known!r})"
        for flag, given, known in (
            ("--model", model, meta.get("architecture")),
            ("--num-classes", num_classes, meta.get("num_classes")),
            ("--model-args", dict(model_args) if model_args is not None else None, meta.get("model_args")),
            ("--dataset", dataset, meta.get("dataset")),
        )
        if _differs(given, known)
    ]
    if (
        names is not None
        and meta_names is not None
        and check_label_names(names, len(names)) != tuple(check_label_names(meta_names, len(meta_names)))
    ):
        conflicts.append(f"--label-names {list(names)} (checkpoint meta: {list(meta_names)})")
    if conflicts:
        raise ValueError(
            "Arguments contradict the checkpoint's own description: " + "; ".join(conflicts) + ". The meta was "
            "written with the weights: drop the contradicting options (or fix the checkpoint's meta if it is wrong)."
        )

    architecture = model or meta.get("architecture")
    if not architecture:
        raise ValueError("The checkpoint has no meta naming its architecture: pass --model (e.g. acsinet18).")
    base, tag = split_model_name_tag(architecture)
    if tag:
        raise ValueError(f"Pass the architecture without a pretrained tag: {base!r}, not {architecture!r}.")
    if not is_model(architecture) or not model_entrypoint(architecture).__module__.startswith("timm_acsi."):
        known = ", ".join(timm.list_models(module="coresnet"))
        raise ValueError(f"{architecture!r} is not a timm-acsi architecture; use one of: {known}.")

    names = names if names is not None else meta_names
    if names is None:
        raise ValueError(
            "No label names: the checkpoint has no meta listing them. Pass --label-names with one name per "
            "output, in the order of the model's outputs (e.g. anger,disgust,fear,happiness,sadness,surprise,neutral)."
        )
    n = num_classes or meta.get("num_classes") or len(names)
    crop_pct = meta["crop_pct"] if meta.get("crop_pct") is not None else DEFAULT_CROP_PCT
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not crop_pct > 0:
        raise ValueError(
            f"The checkpoint meta's crop_pct {crop_pct!r} is not a positive number (eval crop size / resize size, "
            "e.g. 0.875 for 224/256): fix the checkpoint's meta."
        )
    return PublishSpec(
        architecture=architecture,
        num_classes=int(n),
        label_names=check_label_names(names, int(n)),
        model_args=dict(model_args if model_args is not None else meta.get("model_args") or {}),
        input_size=tuple(meta.get("input_size") or (3, 224, 224)),
        crop_pct=float(crop_pct),
        dataset=dataset or meta.get("dataset"),
        license=license or "other",
    )


def build_checked_model(spec: PublishSpec, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build ``spec``'s model, load ``state_dict`` strictly, and check a forward pass in eval mode is finite.

    The model carries a FER pretrained_cfg (preprocessing of the architecture's FER tags, the published
    label names and input size), which is what ``config.json`` records.

    Raises:
        ValueError: keys, shapes or class count do not fit, with what the checkpoint looks like instead,
            or the forward pass gives NaN/inf.
    """
    try:
        model = timm.create_model(
            spec.architecture, num_classes=spec.num_classes, pretrained_cfg=_fer_pretrained_cfg(spec), **spec.model_args
        )
    except TypeError as e:
        raise ValueError(
            f"{spec.architecture} does not accept model_args {json.dumps(spec.model_args)} ({e}): pass only "
            "timm_acsi.CoResNet / timm ResNet arguments in --model-args."
        ) from e
    missing, unexpected, mismatched = compare_state_dicts(model.state_dict(), state_dict)
    if missing or unexpected or mismatched:
        target = f"{spec.architecture}" + (f" with model_args {json.dumps(spec.model_args)}" if spec.model_args else "")
        problems = []
        classifier = model.pretrained_cfg.get("classifier") or "fc"
        weight = state_dict.get(f"{classifier}.weight")
        head = int(weight.shape[0]) if weight is not None and weight.ndim else None
        if head is not None and head != spec.num_classes:
            problems.append(
                f"its classifier has {head} outputs but num_classes is {spec.num_classes} "
                f"(pass --num-classes {head} with {head} label names, or publish the checkpoint of the "
                f"{spec.num_classes}-class model)"
            )
            mismatched = [k for k in mismatched if not k.startswith(f"{classifier}.")]  # explained above
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if keys:
                problems.append(f"{len(keys)} {what} keys ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
        raise ValueError(
            f"The checkpoint does not load strictly into {target} ({spec.num_classes} classes): "
            + "; ".join(problems)
            + f". Its keys look like {describe_state_dict(state_dict)}. Pass the architecture it was trained as "
            "(--model, --model-args), or publish the right checkpoint."
        )
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    x = torch.randn((1, *spec.input_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    if not torch.isfinite(out).all():
        raise ValueError(
            f"The checkpoint's forward pass on a {list(x.shape)} input gives NaN/inf logits: the weights are "
            "broken (diverged training or a bad cast). Publish an earlier or re-exported checkpoint."
        )
    return model


def _fer_pretrained_cfg(spec: PublishSpec) -> Dict[str, Any]:
    """The architecture's FER-tag preprocessing with the published classes, input size, crop and licence."""
    fer = get_pretrained_cfg(f"{spec.architecture}.rafdb").to_dict()
    keep = ("crop_mode", "interpolation", "mean", "std", "first_conv", "classifier", "paper_ids")
    cfg = {k: fer[k] for k in keep}
    trained = f" trained on {spec.dataset}" if spec.dataset else ""
    cfg.update(
        num_classes=spec.num_classes,
        label_names=list(spec.label_names),
        input_size=tuple(spec.input_size),
        crop_pct=spec.crop_pct,
        pool_size=(spec.input_size[1] // 32, spec.input_size[2] // 32),
        license=spec.license,
        description=(
            f"{spec.architecture} facial expression recognition model{trained}, {spec.num_classes} classes in "
            "label_names order. Needs `import timm_acsi` before timm.create_model."
        ),
    )
    return cfg


def _pick(data: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((data[k] for k in keys if data.get(k) is not None), None)


def load_eval_metrics(path: PathLike, label_names: Sequence[str]) -> EvalMetrics:
    """Read evaluation results for the model card from a JSON file.

    Accepted schema (the ``metrics.json`` that ``timm-acsi evaluate``/``train`` write, or similar)::

        {"accuracy" | "top1" | "top1_acc" | "acc" | "overall_acc" | "overall_accuracy": float,
         "mean_class_accuracy" | "mean_class_acc" | "balanced_acc" | "balanced_accuracy": float,
         "per_class_accuracy" | "per_class" | "per_class_acc": {label name: float or null},
         "confusion_matrix": [[int]] (rows = true class, columns = prediction, in label_names order),
         "label_names": [...], "dataset": str, "split": str, "num_samples": int}

    Accuracies are fractions (0..1) or percentages: if any overall/mean/per-class value exceeds 1 all are
    taken as percent. Class names may use any spelling :func:`~timm_acsi.labels.canonical_label` knows.

    Raises:
        ValueError: no accuracy in the file, or its classes / label order differ from the published ones.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"Cannot read the metrics file {path} ({e}); pass a JSON file (see the accepted schema)."
        ) from e
    labels = tuple(label_names)
    acc, mca = _pick(data, _ACC_KEYS), _pick(data, _MCA_KEYS)
    per_class_raw = _pick(data, _PER_CLASS_KEYS) or {}
    if acc is None and mca is None and not per_class_raw:
        raise ValueError(
            f"{path} has no accuracy: expected one of {', '.join(_ACC_KEYS + _MCA_KEYS + _PER_CLASS_KEYS)}."
        )
    if (
        data.get("label_names") is not None
        and check_label_names(data["label_names"], len(data["label_names"])) != labels
    ):
        raise ValueError(
            f"{path} was computed with label order {list(data['label_names'])}, but the model publishes "
            f"{list(labels)}: evaluate the published checkpoint again, with its own label order."
        )
    per_class = {canonical_label(k): v for k, v in per_class_raw.items()}
    if not set(per_class) <= set(labels):
        raise ValueError(f"{path} reports classes {sorted(set(per_class) - set(labels))} the model does not have.")
    values = [v for v in (acc, mca, *per_class.values()) if v is not None]
    scale = 1.0 if any(v > 1 for v in values) else 100.0
    cm = data.get("confusion_matrix")
    if cm is not None and (len(cm) != len(labels) or any(len(row) != len(labels) for row in cm)):
        raise ValueError(f"{path}: the confusion matrix is not {len(labels)}x{len(labels)} like the label names.")
    return EvalMetrics(
        accuracy=None if acc is None else acc * scale,
        mean_class_accuracy=None if mca is None else mca * scale,
        per_class_accuracy={n: (None if per_class.get(n) is None else per_class[n] * scale) for n in per_class},
        confusion_matrix=cm,
        dataset=data.get("dataset") or None,
        split=data.get("split") or None,
        num_samples=data.get("num_samples"),
    )


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def make_model_card(
    spec: PublishSpec,
    repo_id: str,
    params: int,
    flops: int,
    metrics: Optional[EvalMetrics] = None,
) -> str:
    """A model card (``README.md`` with timm's YAML front matter) built from the spec, profile and results."""
    name = repo_id.split("/")[-1]
    dataset = spec.dataset or (metrics.dataset if metrics else None)
    eval_results = None
    if metrics is not None:
        ds = metrics.dataset or dataset or "unknown"
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=ds,
                dataset_name=ds,
                dataset_split=metrics.split,
                metric_type="accuracy",
                metric_name=metric_name,
                metric_value=round(value, 2),
            )
            for metric_name, value in (
                ("Top-1 accuracy (%)", metrics.accuracy),
                ("Mean class accuracy (%)", metrics.mean_class_accuracy),
            )
            if value is not None
        ] or None
    card_data = ModelCardData(
        library_name="timm",
        license=spec.license,
        tags=list(CARD_TAGS),
        datasets=[dataset] if dataset else None,
        metrics=["accuracy"] if metrics is not None else None,
        pipeline_tag="image-classification",
        model_name=name,
        eval_results=eval_results,
    )
    c, h, w = spec.input_size
    pcfg = _fer_pretrained_cfg(spec)
    what = (model_entrypoint(spec.architecture).__doc__ or spec.architecture).strip().splitlines()[0]
    args = f"`{json.dumps(spec.model_args)}`" if spec.model_args else "none (registry defaults)"
    lines = [
        f"---\n{card_data.to_yaml()}\n---",
        f"# Model card for {name}",
        "",
        f"A facial expression recognition model for [timm](https://github.com/huggingface/pytorch-image-models), "
        f"published with timm-acsi. **{what}**",
        "",
        "CoResNet replaces a ResNet's 3x3 convolutions with contextual convolutions (parallel 3x3 branches "
        "with dilations 1..4 over the same input, levels 4/3/2/1 in the four stages; same weights and FLOPs as "
        "the plain convolution). ACSI-Net adds coordinate attention inside every residual block and once more "
        "on the final feature map, whose mask multiplies the features before pooling.",
        "",
        f"Paper: {PAPER_CITATION}",
        "",
        "## Model details",
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | `{spec.architecture}` |",
        f"| Model args | {args} |",
        f"| Classes | {spec.num_classes} (order below) |",
        f"| Params (M) | {params / 1e6:.2f} ({params:,}) |",
        f"| GFLOPs | {flops / 1e9:.2f} at {h}x{w} (fvcore convention: one multiply-add = one FLOP) |",
        f"| Input size | {c}x{h}x{w} |",
        f"| Preprocessing | resize + {pcfg['crop_mode']} crop (crop_pct {pcfg['crop_pct']}), "
        f"{pcfg['interpolation']} interpolation, mean {list(pcfg['mean'])}, std {list(pcfg['std'])} |",
        f"| Training data | {dataset or 'not stated'} |",
        f"| License | {spec.license} |",
        "",
        "Weights trained on RAF-DB or AffectNet are bound by those datasets' research-only terms.",
        "",
        "## Label order",
        "",
        "Output index `i` is class `label_names[i]` (also in `config.json` and `model.pretrained_cfg`). "
        "Datasets ship other orders: map predictions by name, never by a dataset's raw index.",
        "",
        "| index | label |",
        "|---|---|",
        *[f"| {i} | {n} |" for i, n in enumerate(spec.label_names)],
        "",
    ]
    if metrics is not None:
        where = ", ".join(
            s
            for s in (
                metrics.dataset or dataset,
                f"split `{metrics.split}`" if metrics.split else None,
                f"{metrics.num_samples:,} images" if metrics.num_samples else None,
            )
            if s
        )
        lines += [
            "## Evaluation results",
            "",
            f"Measured on {where or 'the evaluation set'}.",
            "",
            "| metric | value (%) |",
            "|---|---|",
            f"| Top-1 accuracy | {_pct(metrics.accuracy)} |",
            f"| Mean class accuracy | {_pct(metrics.mean_class_accuracy)} |",
            *[
                f"| {n} accuracy | {_pct(metrics.per_class_accuracy[n])} |"
                for n in spec.label_names
                if n in metrics.per_class_accuracy
            ],
            "",
        ]
        if metrics.confusion_matrix is not None:
            lines += [
                "Confusion matrix (rows: true class, columns: predicted class):",
                "",
                "| true \\ pred | " + " | ".join(spec.label_names) + " |",
                "|---" * (len(spec.label_names) + 1) + "|",
                *[
                    f"| {n} | " + " | ".join(map(str, row)) + " |"
                    for n, row in zip(spec.label_names, metrics.confusion_matrix)
                ],
                "",
            ]
    lines += [
        "## Usage",
        "",
        "```bash",
        INSTALL_COMMAND,
        "```",
        "",
        "(or `pip install .` from a checkout of timm-acsi)",
        "",
        "timm has no plugin discovery: `import timm_acsi` registers the architecture with timm and is required "
        "before `timm.create_model`.",
        "",
        "```python",
        "import timm",
        "import timm_acsi  # registers coresnet*/acsinet* with timm",
        "import torch",
        "from PIL import Image",
        "",
        f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)",
        "",
        'img = Image.open("face.jpg").convert("RGB")  # an aligned face crop',
        "with torch.no_grad():",
        "    probs = model(transform(img).unsqueeze(0)).softmax(dim=-1)[0]",
        'labels = model.pretrained_cfg["label_names"]',
        "print(labels[int(probs.argmax())], float(probs.max()))",
        "```",
        "",
        'From a downloaded copy of this repo: `timm.create_model("local-dir:/path/to/folder", pretrained=True)`.',
        "",
        "## Citation",
        "",
        "```bibtex",
        PAPER_BIBTEX,
        "```",
        "",
    ]
    return "\n".join(lines)


def _profile(model: nn.Module, input_size: Sequence[int]) -> Tuple[int, int]:
    """``(params, flops)`` for one image of ``input_size`` (C, H, W), fvcore convention."""
    from .profiling import profile_model  # fvcore import is slow: only when publishing

    prof = profile_model(model, input_size=(1, *input_size), cross_check=False)
    return prof.params, prof.flops


def _check_out_dir(out_dir: PathLike, overwrite: bool) -> None:
    """Refuse a folder holding anything but Hub files, and Hub files unless ``overwrite``.

    Replacing touches only :data:`HUB_FILES`, so nothing else the user had (a training run, the checkpoint
    being published, the current directory) can be lost, whatever the flags.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file: choose a folder path for the Hub files.")
    if not out_dir.is_dir():
        return
    entries = sorted(out_dir.iterdir())
    foreign = [p.name for p in entries if p.name not in HUB_FILES or p.is_symlink() or not p.is_file()]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"The output folder {out_dir} holds {shown}, which are not Hub files ({', '.join(HUB_FILES)}): pass "
            "a new or empty folder to --dry-run (dry_run_dir). Nothing was changed; --overwrite only replaces "
            "Hub files from an earlier dry run."
        )
    if entries and not overwrite:
        raise FileExistsError(
            f"The output folder {out_dir} already holds {', '.join(p.name for p in entries)} from an earlier dry "
            "run: pass --overwrite (overwrite=True) to replace them, or choose a new folder."
        )


def write_hub_folder(
    out_dir: PathLike,
    model: nn.Module,
    spec: PublishSpec,
    repo_id: str,
    metrics: Optional[EvalMetrics] = None,
    overwrite: bool = False,
) -> Tuple[int, int]:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` for ``repo_id`` into ``out_dir``.

    ``out_dir`` must be new, empty, or hold only these files; they are replaced only with ``overwrite=True``,
    each by an atomic rename once all three are complete, and nothing else in ``out_dir`` is touched.
    Returns ``(params, flops)`` from the profiler.

    Raises:
        FileExistsError: ``out_dir`` holds other files, or Hub files and ``overwrite`` is not set.
    """
    _check_out_dir(out_dir, overwrite)
    params, flops = _profile(model, spec.input_size)
    out_dir, resolved = Path(out_dir), Path(out_dir).resolve()  # resolved: '.' has no name and no usable parent
    resolved.parent.mkdir(parents=True, exist_ok=True)
    # next to out_dir, so each os.replace is a rename on one filesystem
    tmp = Path(tempfile.mkdtemp(prefix=f".{resolved.name}.", suffix=".tmp", dir=resolved.parent))
    try:
        model_config = {"label_names": list(spec.label_names), "pretrained_cfg": _fer_pretrained_cfg(spec)}
        save_for_hf(model, tmp, model_config=model_config, model_args=spec.model_args, safe_serialization=True)
        (tmp / "README.md").write_text(make_model_card(spec, repo_id, params, flops, metrics))
        _check_out_dir(out_dir, overwrite)  # again: the folder may have changed while profiling and writing
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in HUB_FILES:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return params, flops


def _default_commit_message(spec: PublishSpec, metrics: Optional[EvalMetrics]) -> str:
    msg = f"Upload {spec.architecture} ({spec.num_classes} classes"
    msg += f", {spec.dataset})" if spec.dataset else ")"
    if metrics is not None and metrics.accuracy is not None:
        msg += f": top-1 {metrics.accuracy:.2f}%"
    from . import __version__

    return msg + f" with timm-acsi {__version__}"


def publish(
    checkpoint: PathLike,
    repo_id: str,
    *,
    model: Optional[str] = None,
    num_classes: Optional[int] = None,
    label_names: Optional[Sequence[str]] = None,
    model_args: Optional[Mapping[str, Any]] = None,
    dataset: Optional[str] = None,
    license: Optional[str] = None,
    metrics: Optional[PathLike] = None,
    private: bool = False,
    revision: str = "main",
    commit_message: Optional[str] = None,
    dry_run_dir: Optional[PathLike] = None,
    overwrite: bool = False,
    api: Optional[HfApi] = None,
) -> PublishResult:
    """Check ``checkpoint`` and publish it as ``repo_id`` in timm's Hub format (or write it to ``dry_run_dir``).

    The upload is one ``upload_folder`` commit to ``revision`` (a missing branch is created). Files already
    at that revision are replaced only with ``overwrite=True``. The token comes from huggingface_hub's
    usual sources (``HF_TOKEN``, ``hf auth login``) and is never read or shown here.

    Raises:
        ValueError: the checkpoint, its meta, the arguments or the metrics file do not fit together.
        FileExistsError: ``dry_run_dir`` holds files other than the Hub files (or the checkpoint), or the Hub
            files are already in ``dry_run_dir`` or at the Hub revision and ``overwrite`` is not set.
        PermissionError: the Hub refused the credentials.
        ConnectionError: the Hub could not be reached.
    """
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"repo_id must be 'ORG/NAME' (e.g. my-org/acsinet18.rafdb), got {repo_id!r}.")
    if dry_run_dir is not None:
        if Path(checkpoint).exists() and Path(checkpoint).resolve().parent == Path(dry_run_dir).resolve():
            raise FileExistsError(
                f"The checkpoint {checkpoint} lies in the --dry-run folder {dry_run_dir}: pass a new or empty "
                "folder to --dry-run (dry_run_dir), so that nothing next to the checkpoint is replaced."
            )
        _check_out_dir(dry_run_dir, overwrite)  # fail before the slow checks
    state_dict, meta = load_checkpoint(checkpoint)
    spec = resolve_publish_spec(meta, model, num_classes, label_names, model_args, dataset, license)
    eval_metrics = load_eval_metrics(metrics, spec.label_names) if metrics is not None else None
    net = build_checked_model(spec, state_dict)
    message = commit_message or _default_commit_message(spec, eval_metrics)

    if dry_run_dir is not None:
        params, flops = write_hub_folder(dry_run_dir, net, spec, repo_id, eval_metrics, overwrite=overwrite)
        files = tuple(sorted(p.name for p in Path(dry_run_dir).iterdir()))
        return PublishResult(spec, params, flops / 1e9, files, message, eval_metrics, folder=Path(dry_run_dir))

    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        existing = sorted(set(api.list_repo_files(repo_id, revision=revision, repo_type="model")) & set(HUB_FILES))
        if existing and not overwrite:
            raise FileExistsError(
                f"{repo_id}@{revision} already holds {', '.join(existing)}: pass --overwrite (overwrite=True) "
                "to replace them in a new commit (the Hub keeps the old one in the history), or publish to "
                "another --revision or --repo-id."
            )
        with tempfile.TemporaryDirectory(prefix="timm-acsi-publish-") as tmp:
            folder = Path(tmp) / "repo"
            params, flops = write_hub_folder(folder, net, spec, repo_id, eval_metrics)
            files = tuple(sorted(p.name for p in folder.iterdir()))
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=message, revision=revision, repo_type="model"
            )
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code in (401, 403):
            raise PermissionError(
                f"The Hub refused access to {repo_id} (HTTP {e.response.status_code}): log in with "
                "`hf auth login` or set HF_TOKEN to a token with write access to that namespace."
            ) from e
        raise
    except (HTTPError, ConnectionError) as e:  # no HTTP response: network down, offline mode
        raise ConnectionError(
            f"Could not reach the Hub to publish {repo_id} ({type(e).__name__}: {e}). Check the connection (and "
            "HF_HUB_OFFLINE), or write the files with --dry-run OUT_DIR and upload them later with "
            f"`hf upload {repo_id} OUT_DIR`."
        ) from e
    url = getattr(info, "commit_url", None)
    return PublishResult(spec, params, flops / 1e9, files, message, eval_metrics, commit_url=url)
