"""The settings of a training run: :class:`TrainConfig`, checked on creation, and its YAML/JSON files."""

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import yaml

from ..checkpoint import atomic_write
from ..data import LAYOUTS
from ..data.transforms import TRAIN_CROPS

__all__ = ["TrainConfig", "config_from_dict", "load_config_file", "save_config", "config_hash", "BEST_METRICS"]

PathLike = Union[str, os.PathLike]
BEST_METRICS = ("val_acc", "val_mean_class_acc")


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its command-line help text."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the paper's recipe (Sec. 4.2) for ACSI-Net-18.

    The paper uses batch 32 on AffectNet-7 and 16 on RAF-DB; the default is 32 (pass ``batch_size=16`` for
    RAF-DB). ``opt="momentum"`` is plain SGD with momentum (timm's ``"sgd"`` is Nesterov), and weight decay
    applies to all parameters as in plain PyTorch SGD (``filter_bias_and_bn=False``). Every value is checked
    on creation (type, range, choices): a bad setting fails here, before a run folder is touched.
    """

    # data
    data: str = _opt("", "dataset root")
    layout: str = _opt("auto", "dataset layout", choices=("auto", *LAYOUTS))
    num_classes: int = _opt(7, "7 (FER-7) or 8 (FER-7 + contempt)", choices=(7, 8))
    val_split: Optional[str] = _opt(None, "validation split (default: val, or test for RAF-DB which has no val)")
    dataset_name: Optional[str] = _opt(None, "dataset name for checkpoints and metrics (default: from the layout)")
    skip_unreadable: bool = _opt(False, "skip unreadable images instead of failing")
    balanced: bool = _opt(False, "class-balanced sampling (weights 1/class count, with replacement)")
    img_size: int = _opt(224, "crop size fed to the network")
    resize: int = _opt(256, "faces are resized to resize x resize before cropping")
    train_crops: str = _opt(
        "five_flip", "training crops: paper's five crops + flips, or timm RandomResizedCrop", choices=TRAIN_CROPS
    )
    scale: Tuple[float, float] = _opt((0.08, 1.0), "random crops: RandomResizedCrop area range (MIN MAX)")
    color_jitter: float = _opt(0.4, "random crops: colour-jitter strength")
    re_prob: float = _opt(0.0, "random crops: random-erasing probability")
    grayscale: bool = _opt(False, "faces are grayscale (FER-2013): feed every image as grayscale x 3 channels")
    # model
    model: str = _opt("acsinet18", "timm model name, optionally with a tag (acsinet18.tv_in1k)")
    model_args: Dict[str, Any] = _opt({}, "extra create_model kwargs, KEY=VALUE (e.g. attn_placement=stage)")
    pretrained: bool = _opt(False, "initialise from the model tag's weights (e.g. acsinet18.tv_in1k: ImageNet)")
    init_checkpoint: Optional[str] = _opt(
        None,
        "initialise from a local weights file (.safetensors, or .pth read with weights_only); a classifier "
        "of another size (e.g. ImageNet's) is re-initialised",
    )
    # optimisation
    opt: str = _opt("momentum", "timm optimizer name (momentum = SGD with momentum, sgd = Nesterov)")
    lr: float = _opt(0.01, "learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "weight decay")
    filter_bias_and_bn: bool = _opt(False, "exempt biases and norm weights from weight decay")
    sched: str = _opt("step", "timm scheduler name (the lr is updated after every optimizer step)")
    epochs: int = _opt(60, "number of epochs")
    decay_epochs: float = _opt(20, "step scheduler: epochs between decays")
    decay_rate: float = _opt(0.1, "step scheduler: lr multiplier at each decay")
    warmup_epochs: int = _opt(0, "warm-up epochs (the lr rises linearly over their optimizer steps)")
    warmup_lr: float = _opt(1e-5, "warm-up start lr")
    min_lr: float = _opt(0.0, "lower lr bound (cosine and others)")
    batch_size: int = _opt(32, "batch size per process (paper: 32 AffectNet, 16 RAF-DB)")
    accum_steps: int = _opt(1, "gradient accumulation steps per optimizer step")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss")
    teacher: Optional[str] = _opt(
        None,
        "distil from these trained models (comma-separated sources: tag, checkpoint, run folder or Hub folder): "
        "their mean probabilities on each training face and its mirror image, unaugmented, are its soft target",
    )
    distill_alpha: float = _opt(0.5, "with --teacher: weight of the soft targets in the loss (1 - it: the labels)")
    distill_temperature: float = _opt(1.0, "with --teacher: temperature softening teacher and student outputs")
    model_ema: bool = _opt(
        False,
        "keep an exponential moving average of the weights (timm's ModelEmaV3, updated after every optimizer step): "
        "the average is what is validated, selected and saved",
    )
    model_ema_decay: float = _opt(
        0.999, "with model_ema: decay per optimizer step (the average spans ~1/(1-decay) steps)"
    )
    amp: bool = _opt(False, "mixed precision: fp16 + GradScaler on CUDA, bf16 on CPU")
    channels_last: bool = _opt(False, "channels-last memory format")
    compile: bool = _opt(
        False,
        "torch.compile the model for the training forward + backward (inductor; on the CPU it needs a C compiler "
        "such as gcc; the first steps compile); checkpoints keep the plain model's names",
    )
    # run
    output: Optional[str] = _opt(None, "run folder (default: runs/MODEL-TIMESTAMP)")
    best_metric: str = _opt("val_acc", "metric selecting the best checkpoint", choices=BEST_METRICS)
    seed: int = _opt(42, "random seed (process r uses seed + r)")
    deterministic: bool = _opt(False, "deterministic algorithms (slower on GPU)")
    workers: int = _opt(4, "data loading worker processes per training process")
    device: Optional[str] = _opt(None, "device (default: cuda:LOCAL_RANK if available, else cpu)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f.name, getattr(self, f.name)))

    @property
    def architecture(self) -> str:
        """The timm model name without its tag (what checkpoints record)."""
        return self.model.split(".", 1)[0]

    def to_dict(self) -> Dict[str, Any]:
        """Plain values (tuples as lists), as YAML and JSON store them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a KEY: VALUE mapping",
}
#: Allowed ranges, as (test, what the value must be).
_LIMITS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "img_size": (lambda v: v >= 1, "at least 1 (e.g. 224)"),
    "resize": (lambda v: v >= 1, "at least 1 (e.g. 256)"),
    "scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "two area fractions 0 < MIN <= MAX <= 1"),
    "color_jitter": (lambda v: v >= 0, "at least 0"),
    "re_prob": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "lr": (lambda v: v > 0, "positive (e.g. 0.01)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "epochs": (lambda v: v >= 1, "at least 1"),
    "decay_epochs": (lambda v: v > 0, "positive"),
    "decay_rate": (lambda v: v > 0, "positive"),
    "warmup_epochs": (lambda v: v >= 0, "at least 0"),
    "warmup_lr": (lambda v: v >= 0, "at least 0"),
    "min_lr": (lambda v: v >= 0, "at least 0"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "accum_steps": (lambda v: v >= 1, "at least 1"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1) (e.g. 0.1)"),
    "teacher": (lambda v: bool(v.strip(" ,")), "one or more model sources, comma-separated (e.g. coresnet18.fer2013)"),
    "distill_alpha": (lambda v: 0 <= v <= 1, "in [0, 1] (e.g. 0.5)"),
    "distill_temperature": (lambda v: v > 0, "positive (e.g. 1 or 4)"),
    "model_ema_decay": (lambda v: 0 < v < 1, "in (0, 1) (e.g. 0.999)"),
    "workers": (lambda v: v >= 0, "at least 0"),
}


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def check_value(name: str, value: Any) -> Any:
    """``value`` as the field ``name`` holds it, or a ValueError naming the field, the expected type and the value.

    Integers are accepted for numbers, lists for pairs, and numeric strings for numbers (YAML reads ``1e-3``
    as a string).
    """
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    value = _as_type(name, typing.get_origin(hint) or hint, value)
    choices = _FIELDS[name].metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{_flag(name)} must be one of {', '.join(map(str, choices))}, got {value!r}.")
    test, rule = _LIMITS.get(name, (lambda v: True, ""))
    if not test(value):
        shown = list(value) if isinstance(value, tuple) else value
        raise ValueError(f"{_flag(name)} must be {rule}, got {shown!r}.")
    return value


def _as_type(name: str, kind: type, value: Any) -> Any:
    if kind is tuple:
        if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
            return tuple(float(v) for v in value)
        raise ValueError(f"{_flag(name)} must be a list of numbers, got {value!r}.")
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and _is_number(value):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str, dict) and isinstance(value, kind):
        return value
    raise ValueError(f"{_flag(name)} must be {_TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__}).")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_from_dict(values: Dict[str, Any], base: Optional[TrainConfig] = None) -> TrainConfig:
    """``base`` (default: the recipe's defaults) updated with ``values``; unknown keys and bad values raise."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"Unknown config key(s) {unknown}; valid keys: {', '.join(sorted(_FIELDS))}.")
    return dataclasses.replace(base or TrainConfig(), **values)


def load_config_file(path: PathLike) -> Dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict of checked config values.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed YAML/JSON (with line and column), not a mapping, an unknown key, or a value of the
            wrong type or range (with its key and, for YAML, its line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    text = path.read_text()
    values = _parse_config(path, text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys to values, got {type(values).__name__}.")
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {unknown}; valid keys: {', '.join(sorted(_FIELDS))}.")
    for key, value in values.items():
        try:
            check_value(key, value)
        except ValueError as e:
            line = "" if path.suffix == ".json" else _yaml_line(text, key)
            raise ValueError(f"{path}{line}: {e}") from None
    return values


def _parse_config(path: Path, text: str) -> Any:
    """The YAML or JSON document of a config file; a syntax error names the file, line and column."""
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}, column {e.colno}: malformed JSON ({e.msg}).") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{path}{where}: malformed YAML ({problem}).") from None


def _yaml_line(text: str, key: str) -> str:
    """`` line N`` of ``key`` in a YAML mapping document (empty if it cannot be found)."""
    node = yaml.compose(text)
    for key_node, _ in getattr(node, "value", []):
        if getattr(key_node, "value", None) == key:
            return f" line {key_node.start_mark.line + 1}"
    return ""


def save_config(cfg: TrainConfig, path: PathLike) -> Path:
    """Write ``cfg`` as YAML (or JSON for a ``.json`` path), atomically."""
    path = Path(path)
    values = cfg.to_dict()
    text = json.dumps(values, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(values, sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


#: Settings that change where or how a run is computed, not what it computes: left out of :func:`config_hash`.
_UNHASHED = ("output", "compile")
#: Settings that only matter with a teacher: hashed only then, so runs from before distillation keep their hash.
_DISTILL = ("teacher", "distill_alpha", "distill_temperature")
#: Likewise the weight average's settings, hashed only when it is on.
_EMA = ("model_ema", "model_ema_decay")


def config_hash(cfg: TrainConfig) -> str:
    """sha256 of the canonical JSON of the config, without ``output`` (a copied run keeps its hash),
    ``compile`` (the same run, compiled) and, without a teacher or weight average, their settings (runs from
    before these options keep their hash)."""
    unhashed = _UNHASHED + (() if cfg.teacher else _DISTILL) + (() if cfg.model_ema else _EMA)
    values = {k: v for k, v in cfg.to_dict().items() if k not in unhashed}
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
