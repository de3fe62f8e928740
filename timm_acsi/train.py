"""Training and evaluation of FER models with the paper's recipe (Sec. 4.2), on one process or many (DDP).

A run lives in one folder::

    runs/NAME/
        config.yaml             every setting of the run (reload it with ``--config``)
        log.jsonl               one JSON object per epoch
        last.safetensors/.json  weights + description of the last epoch
        last_state.pt           resume state: model, optimizer, scheduler, scaler, RNG states, best metric
        best.safetensors/.json  weights + description of the best epoch
        metrics.json            best epoch evaluated on the validation split (schema: :mod:`timm_acsi.metrics`)
        confusion_matrix.png

The resume state holds only tensors and plain Python values, written with ``torch.save`` and read back with
``torch.load(weights_only=True)``: nothing is unpickled. That keeps the optimizer's nested state dict as it is,
where safetensors would need it flattened and rebuilt. Each epoch writes ``best.safetensors`` (if improved),
then ``last.safetensors``, then ``last_state.pt``: the resume state is the commit point, and it carries its
own copy of the model weights, so a run killed between two writes resumes from a consistent epoch.

Distributed runs are launched by ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); each process
trains on its shard, validation covers every image exactly once (unpadded shards, confusion matrices summed
across processes) and only rank 0 prints and writes.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from timm.models import get_arch_pretrained_cfgs, resolve_pretrained_cfg, split_model_name_tag
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from .checkpoint import atomic_write, compare_state_dicts, describe_state_dict, load_checkpoint, save_checkpoint
from .data import LAYOUTS, build_dataset, create_fer_transform, detect_layout
from .data.transforms import TRAIN_CROPS
from .labels import check_label_names, label_names_for
from .metrics import compute_metrics, confusion_matrix, plot_confusion_matrix, save_metrics
from .models.coresnet import CoResNet, checkpoint_filter_fn

__all__ = [
    "TrainConfig",
    "config_from_dict",
    "load_config_file",
    "save_config",
    "config_hash",
    "DistInfo",
    "RunError",
    "init_distributed",
    "DistributedWeightedSampler",
    "ShardSampler",
    "prepare_run_dir",
    "create_model",
    "create_optimizer_and_scheduler",
    "class_balanced_weights",
    "evaluate",
    "evaluate_checkpoint",
    "train",
    "RUN_FILES",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Files a run writes; ``overwrite=True`` removes exactly these (nothing else in the folder is touched).
RUN_FILES = (
    "config.yaml",
    "log.jsonl",
    "last.safetensors",
    "last.json",
    "last_state.pt",
    "best.safetensors",
    "best.json",
    "metrics.json",
    "confusion_matrix.png",
)
BEST_METRICS = ("val_acc", "val_mean_class_acc")
#: Errors rank 0 may hit while preparing the run folder or reading the resume state; they are shared with the
#: other ranks (which would otherwise wait forever in the next collective).
_SHARED_ERRORS = (OSError, ValueError, RuntimeError, KeyError)
DATASET_NAMES = {"rafdb": "RAF-DB", "affectnet": "AffectNet"}


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
    applies to all parameters as in plain PyTorch SGD (``filter_bias_and_bn=False``).
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
    sched: str = _opt("step", "timm scheduler name")
    epochs: int = _opt(60, "number of epochs")
    decay_epochs: float = _opt(20, "step scheduler: epochs between decays")
    decay_rate: float = _opt(0.1, "step scheduler: lr multiplier at each decay")
    warmup_epochs: int = _opt(0, "warm-up epochs")
    warmup_lr: float = _opt(1e-5, "warm-up start lr")
    min_lr: float = _opt(0.0, "lower lr bound (cosine and others)")
    batch_size: int = _opt(32, "batch size per process (paper: 32 AffectNet, 16 RAF-DB)")
    accum_steps: int = _opt(1, "gradient accumulation steps per optimizer step")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss")
    amp: bool = _opt(False, "mixed precision: fp16 + GradScaler on CUDA, bf16 on CPU")
    channels_last: bool = _opt(False, "channels-last memory format")
    # run
    output: Optional[str] = _opt(None, "run folder (default: runs/MODEL-TIMESTAMP)")
    best_metric: str = _opt("val_acc", "metric selecting the best checkpoint", choices=BEST_METRICS)
    seed: int = _opt(42, "random seed (process r uses seed + r)")
    deterministic: bool = _opt(False, "deterministic algorithms (slower on GPU)")
    workers: int = _opt(4, "data loading worker processes per training process")
    device: Optional[str] = _opt(None, "device (default: cuda:LOCAL_RANK if available, else cpu)")

    def __post_init__(self) -> None:
        self.scale = tuple(float(v) for v in self.scale)  # YAML and JSON give lists
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be two area fractions 0 < MIN <= MAX <= 1, got {list(self.scale)}.")
        if self.num_classes not in (7, 8):
            raise ValueError(f"num_classes must be 7 (FER-7) or 8 (FER-8 with contempt), got {self.num_classes}.")
        if self.best_metric not in BEST_METRICS:
            raise ValueError(f"best_metric must be one of {', '.join(BEST_METRICS)}, got {self.best_metric!r}.")
        if self.accum_steps < 1 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError("epochs, batch_size and accum_steps must be at least 1.")

    @property
    def architecture(self) -> str:
        """The timm model name without its tag (what checkpoints record)."""
        return self.model.split(".", 1)[0]

    def to_dict(self) -> Dict[str, Any]:
        """Plain values (tuples as lists), as YAML and JSON store them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def config_from_dict(values: Dict[str, Any], base: Optional[TrainConfig] = None) -> TrainConfig:
    """``base`` (default: the recipe's defaults) updated with ``values``; unknown keys raise."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"Unknown config key(s) {unknown}; valid keys: {', '.join(sorted(names))}.")
    return dataclasses.replace(base or TrainConfig(), **values)


def load_config_file(path: PathLike) -> Dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict of config values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys to values, got {type(values).__name__}.")
    return values


def save_config(cfg: TrainConfig, path: PathLike) -> Path:
    """Write ``cfg`` as YAML (or JSON for a ``.json`` path), atomically."""
    path = Path(path)
    values = cfg.to_dict()
    text = json.dumps(values, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(values, sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def config_hash(cfg: TrainConfig) -> str:
    """sha256 of the canonical JSON of the config, without ``output`` (a copied run keeps its hash)."""
    values = {k: v for k, v in cfg.to_dict().items() if k != "output"}
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (if any) and pick
    the device: nccl on CUDA, gloo on CPU. A single process needs no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
    return DistInfo(rank, world_size, local_rank, dev)


def _broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum over ranks (float64 / int64 on the process group's device)."""
    if not info.distributed:
        return values
    comm = values.to(info.device)
    dist.all_reduce(comm)
    return comm.cpu()


def _sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BN running stats drift apart: each rank updates them on its batches)."""
    if info.distributed:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


class RunError(RuntimeError):
    """A run cannot start or continue (raised on every rank of a distributed run)."""


def _raise_together(error: Optional[str], info: DistInfo) -> None:
    """Raise rank 0's error on every rank, so no process waits forever on the others."""
    error = _broadcast(error, info)
    if error:
        raise RunError(error)


# ----------------------------------------------------------------------------------------------- samplers


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement, sharded over ranks.

    Each epoch every rank draws the same ``num_samples`` indices from a generator seeded with
    ``seed + epoch`` and keeps every ``num_replicas``-th one from its rank: together the ranks draw one
    weighted sample of the whole set, as a single-process ``WeightedRandomSampler`` would.
    """

    def __init__(
        self,
        weights: Sequence[float],
        num_samples: Optional[int] = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        total = len(self.weights) if num_samples is None else num_samples
        self.num_samples = math.ceil(total / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(indices[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every sample on exactly one rank, no padding."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def class_balanced_weights(targets: Sequence[int], num_classes: int) -> List[float]:
    """Sample weights ``1 / count(class)``: every class is drawn equally often in expectation."""
    counts = torch.bincount(torch.as_tensor(targets), minlength=num_classes).tolist()
    return [1.0 / counts[t] for t in targets]


# ----------------------------------------------------------------------------------------------- run folder


def prepare_run_dir(path: PathLike, overwrite: bool = False, resume: bool = False) -> Path:
    """Check (and create) a run folder: a new run never writes into another run's folder.

    A folder holding run files is refused unless ``resume`` (continue it: needs ``last_state.pt``) or
    ``overwrite`` (remove the run files listed in :data:`RUN_FILES`, and nothing else).
    """
    path = Path(path)
    existing = [n for n in RUN_FILES if (path / n).exists()]
    if resume:
        if not (path / "last_state.pt").is_file():
            raise FileNotFoundError(
                f"Cannot resume: {path} holds no last_state.pt. Resume a run folder written by `timm-acsi train` "
                "(it saves after every epoch), or start a new run without --resume."
            )
        return path
    if existing and not overwrite:
        raise FileExistsError(
            f"{path} already holds a run ({', '.join(existing)}). Continue it with --resume, pick another "
            "--output, or pass --overwrite to replace it."
        )
    for name in existing:
        (path / name).unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_log(path: Path, before_epoch: int) -> List[Dict[str, Any]]:
    """The log entries of epochs up to ``before_epoch`` (later ones belong to an interrupted epoch)."""
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if e["epoch"] <= before_epoch]


def _write_log(path: Path, entries: List[Dict[str, Any]]) -> None:
    text = "".join(json.dumps(e) + "\n" for e in entries)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# -------------------------------------------------------------------------------------------- RNG states


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------- model


def _check_model_source(cfg: TrainConfig) -> None:
    """Fail before any data is read when the model name is unknown or its initial weights cannot exist."""
    name, tag = split_model_name_tag(cfg.model)
    if not timm.is_model(name):
        raise ValueError(f"Unknown model {cfg.model!r}: pick a timm model name (e.g. acsinet18, coresnet50, resnet18).")
    try:
        pretrained_cfg = resolve_pretrained_cfg(name, pretrained_cfg=tag or None)
    except RuntimeError as e:  # timm: "Invalid pretrained tag (...)"
        raise ValueError(f"{e} Its tags: {', '.join(get_arch_pretrained_cfgs(name))}.") from e
    if cfg.pretrained and cfg.init_checkpoint:
        raise ValueError("--pretrained and --init-checkpoint both set the initial weights: pass only one.")
    if cfg.pretrained and not (pretrained_cfg.has_weights or pretrained_cfg.state_dict is not None):
        tags = sorted(timm.list_pretrained(name + ".*"), key=lambda n: not n.endswith(".tv_in1k"))
        if tags:
            kind = "an ImageNet tag" if "_in1k" in tags[0] else "a tag with weights"
            hint = f"Use {kind} (--model {tags[0]}) or --init-checkpoint FILE."
        else:
            hint = "Use --init-checkpoint FILE."
        raise ValueError(f"--pretrained: {name}.{pretrained_cfg.tag} has no published weights. {hint}")


def _shorten(keys: Sequence[str], n: int = 3) -> str:
    """The first ``n`` keys, weights before BatchNorm's step counters (which say little about a mismatch)."""
    keys = sorted(keys, key=lambda k: k.endswith("num_batches_tracked"))
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _load_weights(
    model: nn.Module,
    state_dict: Dict[str, torch.Tensor],
    source: PathLike,
    arch: str,
    allow_missing: Tuple[str, ...] = (),
) -> None:
    """Load ``state_dict`` into ``model``. Missing keys (except under the ``allow_missing`` prefixes), unexpected
    keys and other shapes raise a short ValueError saying what the file's keys look like, not torch's key dump."""
    own = model.state_dict()
    missing, unexpected, mismatched = compare_state_dicts(own, state_dict)
    missing = [k for k in missing if not k.startswith(allow_missing) and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
    problems = [
        f"{len(keys)} {what} ({_shorten(keys)})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", shapes))
        if keys
    ]
    if problems:
        looks_like = describe_state_dict(state_dict)
        raise ValueError(f"{source} does not fit {arch}: {'; '.join(problems)}. Its keys look like {looks_like}.")
    model.load_state_dict(state_dict, strict=False)  # strict in effect: every mismatch was checked above


def create_model(cfg: TrainConfig, label_names: Optional[Sequence[str]] = None) -> nn.Module:
    """The model of ``cfg``, initialised from the tag's weights or from ``init_checkpoint`` if asked.

    ``init_checkpoint`` is read once, without unpickling (:func:`~timm_acsi.checkpoint.load_checkpoint`, which
    unwraps ``state_dict``/``model``/``model_state_dict`` and DDP's ``module.``). A classifier of another size
    than ``cfg.num_classes`` (ImageNet's 1000 classes) is re-initialised; one of the same size is kept, its rows
    put in the order of ``label_names`` (default: the canonical order) when the file's description records its
    own ``label_names``. A plain ResNet file loads into CoResNet/ACSI-Net with the attention modules left at
    their initialisation; any other missing, unexpected or reshaped tensor is an error.
    """
    _check_model_source(cfg)
    if cfg.init_checkpoint and not Path(cfg.init_checkpoint).is_file():
        raise FileNotFoundError(f"init_checkpoint {cfg.init_checkpoint} does not exist.")
    kwargs: Dict[str, Any] = dict(cfg.model_args)
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=cfg.num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"model_args {kwargs} do not fit {cfg.model} ({e}): fix --model-args.") from e
    if not cfg.init_checkpoint:
        return model
    state_dict, meta = load_checkpoint(cfg.init_checkpoint)
    head = (model.pretrained_cfg.get("classifier") or "fc") + "."
    head_weight = state_dict.get(head + "weight")
    if head_weight is not None and head_weight.shape[0] != cfg.num_classes:
        _logger.info(f"{cfg.init_checkpoint}: {head_weight.shape[0]}-class classifier dropped, {cfg.num_classes} new.")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head)}
    elif head_weight is not None:
        state_dict = _head_in_label_order(state_dict, head, meta, label_names or label_names_for(cfg.num_classes), cfg)
    if isinstance(model, CoResNet):
        state_dict = checkpoint_filter_fn(state_dict, model)
    _load_weights(model, state_dict, cfg.init_checkpoint, cfg.model, allow_missing=(head,))
    return model


def _head_in_label_order(
    state_dict: Dict[str, torch.Tensor],
    head: str,
    meta: Optional[Dict[str, Any]],
    label_names: Sequence[str],
    cfg: TrainConfig,
) -> Dict[str, torch.Tensor]:
    """A kept classifier with its rows in the run's label order (matched by name, never by index)."""
    names = (meta or {}).get("label_names")
    if not names:
        _logger.warning(
            f"{cfg.init_checkpoint} keeps its {cfg.num_classes}-class classifier but records no label_names: its "
            f"outputs are taken to be in the order {list(label_names)}."
        )
        return state_dict
    ckpt_names, run_names = check_label_names(names, cfg.num_classes), tuple(label_names)
    if ckpt_names == run_names:
        return state_dict
    if set(ckpt_names) != set(run_names):
        raise ValueError(
            f"{cfg.init_checkpoint} classifies {list(ckpt_names)}, the run {list(run_names)}: the classifier cannot "
            "be kept. Use a checkpoint of the same classes, or remove its classifier tensors from the file."
        )
    order = [ckpt_names.index(n) for n in run_names]
    _logger.info(f"{cfg.init_checkpoint}: classifier rows reordered from {list(ckpt_names)} to {list(run_names)}.")
    return {k: (v[order] if k.startswith(head) else v) for k, v in state_dict.items()}


def create_optimizer_and_scheduler(model: nn.Module, cfg: TrainConfig) -> Tuple[torch.optim.Optimizer, Any]:
    """timm's optimizer and epoch-stepped scheduler (recipe: SGD momentum 0.9, wd 5e-4, lr 0.01 x0.1 / 20 epochs)."""
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.opt,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=cfg.filter_bias_and_bn,
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        decay_epochs=cfg.decay_epochs,
        decay_rate=cfg.decay_rate,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
    )
    return optimizer, scheduler


def _autocast(device: torch.device, enabled: bool):
    """Mixed precision context: fp16 on CUDA, bf16 elsewhere."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


# ---------------------------------------------------------------------------------------------- evaluate


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
    for x, y in loader:
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(info.device, amp):
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
    cm = _all_sum(cm, info)
    loss_sum = _all_sum(loss_sum, info)
    return cm, float(loss_sum) / max(int(cm.sum()), 1)


def _eval_loader(dataset, batch_size: int, workers: int, info: DistInfo) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), info.world_size, info.rank),
        num_workers=workers,
        pin_memory=info.device.type == "cuda",
    )


def _resolve_layout(data: PathLike, layout: str) -> str:
    return detect_layout(data) if layout == "auto" else layout


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

    Architecture (with its ``model_args``), classes, label names and preprocessing come from the checkpoint's
    description; arguments that contradict it raise. A checkpoint without one needs ``model_name`` (and the
    ``model_args`` of a variant, e.g. ``{"attn_placement": "stage"}``) and ``label_names`` (the classes in
    the order of the model's outputs; their count is the classifier's unless ``num_classes`` says otherwise).
    Outputs are matched to the dataset's classes by label *name*. ``resize`` defaults to
    ``round(img_size / crop_pct)`` with the checkpoint's ``crop_pct`` (the recipe's 224 / 256 if it has none).
    """
    state_dict, meta = load_checkpoint(checkpoint)
    meta = meta or {}
    arch = meta.get("architecture")
    if model_name and arch and model_name.split(".", 1)[0] != arch:
        raise ValueError(f"{checkpoint} says architecture {arch}, not {model_name}: drop the model name (--model).")
    arch = arch or model_name
    if model_args is not None and meta.get("model_args") is not None and dict(model_args) != meta["model_args"]:
        raise ValueError(
            f"{checkpoint} says model_args {meta['model_args']}, not {dict(model_args)}: drop --model-args."
        )
    model_args = dict(meta.get("model_args") or model_args or {})
    if not arch:
        raise ValueError(f"{checkpoint} has no description naming its architecture: pass the model name (--model).")
    if not timm.is_model(arch):
        raise ValueError(f"Unknown model {arch!r}: pass a timm model name (--model), e.g. acsinet18.")
    meta_classes = meta.get("num_classes") or len(meta.get("label_names") or []) or None
    if num_classes and meta_classes not in (None, num_classes):
        raise ValueError(
            f"{checkpoint} says it has {meta_classes} classes, not {num_classes}: drop num_classes (--num-classes)."
        )
    head = state_dict.get("fc.weight")
    n_out = num_classes or meta_classes or (len(label_names) if label_names else None)
    n_out = n_out or (head.shape[0] if head is not None and head.ndim == 2 else None)
    if n_out is None:
        raise ValueError(f"{checkpoint} does not say how many classes it has: pass num_classes (--num-classes 7 or 8).")
    if meta.get("label_names"):
        ckpt_names = check_label_names(meta["label_names"], n_out)
        if label_names and check_label_names(label_names, n_out) != ckpt_names:
            raise ValueError(
                f"{checkpoint} says its outputs are {list(ckpt_names)}, not {list(label_names)}: drop label_names "
                "(--label-names)."
            )
    elif label_names:
        ckpt_names = check_label_names(label_names, n_out)
    else:
        raise ValueError(
            f"{checkpoint} does not record the order of its {n_out} outputs (no label_names in its description): "
            "pass label_names, one per output in the order of the model's outputs (e.g. --label-names "
            "anger,disgust,fear,happiness,sadness,surprise,neutral; RAF-DB's own order starts with surprise)."
        )
    img_size = img_size or (meta.get("input_size") or [3, 224, 224])[-1]
    resize = resize or round(img_size / meta.get("crop_pct", 224 / 256))

    info = init_distributed(device)
    try:
        model = timm.create_model(arch, num_classes=n_out, **model_args)
    except TypeError as e:
        raise ValueError(f"model_args {model_args} do not fit {arch} ({e}): fix --model-args.") from e
    _load_weights(model, state_dict, checkpoint, arch)
    model.to(info.device)

    transform = create_fer_transform(False, img_size=img_size, resize=resize)
    dataset = build_dataset(data, split, layout, n_out, transform=transform, skip_unreadable=skip_unreadable)
    missing = sorted(set(dataset.label_names) - set(ckpt_names))
    if missing:
        raise ValueError(f"The checkpoint has no output for dataset class(es) {missing}; its labels are {ckpt_names}.")
    output_index = [ckpt_names.index(n) for n in dataset.label_names]
    loader = _eval_loader(dataset, batch_size, workers, info)
    cm, _ = evaluate(
        model,
        loader,
        len(dataset.label_names),
        info,
        amp=amp,
        tta_flip=tta_flip,
        output_index=None if output_index == list(range(n_out)) else output_index,
        progress=progress and info.is_main,
    )
    name = dataset_name or DATASET_NAMES.get(_resolve_layout(data, layout)) or Path(data).resolve().name
    return compute_metrics(cm, dataset.label_names, name, split)


# ------------------------------------------------------------------------------------------------- train


def _train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    info: DistInfo,
    desc: str,
    progress: bool,
) -> Dict[str, float]:
    """One pass over ``loader``; returns loss, accuracy and images/s over all ranks.

    Loss and accuracy accumulate on the device: the host waits for the device only when the progress bar
    redraws and at the end of the epoch, not at every batch.
    """
    model.train()
    num_batches = len(loader)
    loss_sum = torch.zeros((), device=info.device)
    correct = torch.zeros((), dtype=torch.int64, device=info.device)
    count = 0
    total = num_batches * cfg.batch_size * info.world_size
    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress, leave=False)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        group_start = (i // cfg.accum_steps) * cfg.accum_steps
        group_size = min(cfg.accum_steps, num_batches - group_start)
        step_now = i + 1 == group_start + group_size
        sync = model.no_sync() if info.distributed and not step_now else nullcontext()
        with sync:
            with _autocast(info.device, cfg.amp):
                logits = model(x)
                loss = criterion(logits, y)
            scaler.scale(loss / group_size).backward()
        if step_now:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        count += len(y)
        if bar.update(len(y) * info.world_size):  # True when the bar redrew (never when disabled)
            bar.set_postfix(loss=f"{float(loss_sum) / count:.4f}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(count, dtype=torch.float64)])
    totals = _all_sum(totals.cpu(), info)
    return {
        "train_loss": float(totals[0] / totals[2]),
        "train_acc": float(totals[1] / totals[2]),
        "images_per_s": float(totals[2]) / elapsed,
    }


def _save_resume_state(path: Path, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_resume_state(path: Path) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        raise ValueError(
            f"{path} cannot be read ({type(e).__name__}: {e}). Start the run again with --overwrite."
        ) from e


def _load_resume(run_dir: Path) -> Tuple[Dict[str, Any], Optional[Dict[str, torch.Tensor]], float, int]:
    """The resume state of ``run_dir``, the best epoch's weights, its metric and its epoch, checked together.

    ``last_state.pt`` is written last and holds the model weights of its epoch, so it is consistent on its own.
    ``best.safetensors`` is written first: a run killed after writing it and before the state holds a best
    checkpoint one epoch newer than the state; that checkpoint (and the metric in its description) is the best.
    """
    path = run_dir / "last_state.pt"
    state = _load_resume_state(path)
    try:
        epoch, best, best_epoch = state["epoch"], state["best"], state["best_epoch"]
        if "model" not in state:  # written before the state carried the weights: last.safetensors must match
            state["model"], meta = load_checkpoint(run_dir / "last.safetensors")
            if (meta or {}).get("epoch") != epoch:
                raise ValueError(
                    f"{run_dir}: last.safetensors (epoch {(meta or {}).get('epoch')}) and last_state.pt (epoch "
                    f"{epoch}) disagree: the run stopped while saving them. Start it again with --overwrite."
                )
    except KeyError as e:
        raise ValueError(f"{path} lacks {e}: it is damaged. Start the run again with --overwrite.") from e
    best_path, best_weights = run_dir / "best.safetensors", None
    if best_path.is_file():
        best_weights, meta = load_checkpoint(best_path)
        saved = (meta or {}).get("epoch")
        if saved == epoch + 1 and saved != best_epoch:  # killed between best.safetensors and last_state.pt
            best, best_epoch = meta["metric"]["value"], saved
        elif saved != best_epoch:
            raise ValueError(
                f"Cannot resume: {best_path} is from epoch {saved}, but last_state.pt (epoch {epoch}) says the best "
                f"epoch is {best_epoch}: the file was replaced. Put back the run's best.safetensors, or start the "
                "run again with --overwrite."
            )
    elif best_epoch:
        raise FileNotFoundError(
            f"Cannot resume: {best_path} (epoch {best_epoch}) is missing. Put it back, or start again with --overwrite."
        )
    return state, best_weights, best, best_epoch


def _log_config_changes(cfg: TrainConfig, path: Path) -> None:
    """Say which settings differ from the run's saved ``config.yaml`` (they apply from the resumed epoch on)."""
    if not path.is_file():
        return
    saved, now = load_config_file(path), cfg.to_dict()
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k != "output" and k in saved and saved[k] != v]
    if changed:
        _logger.warning(f"Resuming with changed settings (config.yaml is updated): {', '.join(changed)}.")


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Train ``cfg`` and return the metrics of the best epoch on the validation split (``metrics.json``).

    Args:
        cfg: the run's settings.
        resume: continue the run in ``cfg.output`` from its last completed epoch, exactly as if it had
            not stopped (same batches, augmentations and optimizer state). Settings that differ from the
            run's ``config.yaml`` (logged) apply from there on: the lr schedule and the optimizer's
            hyper-parameters are those of ``cfg``, e.g. a longer ``epochs`` stretches a cosine schedule.
        overwrite: replace the run files of an existing folder (otherwise it is refused).
        progress: show progress bars (rank 0 only).

    Raises:
        FileExistsError / FileNotFoundError / ValueError (single process) or RunError (all ranks of a
        distributed run) for an occupied run folder, missing data, a damaged resume state or an invalid setting.
    """
    if not cfg.data:
        raise ValueError("No dataset: set data to the dataset root (--data ROOT).")
    _check_model_source(cfg)
    owns_group = dist.is_available() and not dist.is_initialized()
    info = init_distributed(cfg.device)
    was_deterministic, was_benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        return _train(cfg, info, resume, overwrite, progress)
    finally:  # leave the process's global settings (and process group) as they were
        torch.use_deterministic_algorithms(was_deterministic)
        torch.backends.cudnn.benchmark = was_benchmark
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, info: DistInfo, resume: bool, overwrite: bool, progress: bool) -> Dict[str, Any]:
    # run folder: rank 0 decides, every rank learns the outcome
    error, run_dir = None, None
    if info.is_main:
        output = cfg.output or f"runs/{cfg.architecture}-{datetime.now():%Y%m%d-%H%M%S}"
        try:
            run_dir = prepare_run_dir(output, overwrite=overwrite, resume=resume)
        except _SHARED_ERRORS as e:
            error = str(e)
            if not info.distributed:
                raise
    _raise_together(error, info)
    run_dir = Path(_broadcast(str(run_dir), info))
    cfg = dataclasses.replace(cfg, output=str(run_dir))

    # data
    layout = _resolve_layout(cfg.data, cfg.layout)
    val_split = cfg.val_split or ("test" if layout == "rafdb" else "val")
    dataset_name = cfg.dataset_name or DATASET_NAMES.get(layout) or Path(cfg.data).resolve().name
    train_tf = create_fer_transform(
        True,
        img_size=cfg.img_size,
        resize=cfg.resize,
        train_crops=cfg.train_crops,
        scale=cfg.scale,
        color_jitter=cfg.color_jitter,
        re_prob=cfg.re_prob,
        grayscale=cfg.grayscale,
    )
    eval_tf = create_fer_transform(False, img_size=cfg.img_size, resize=cfg.resize, grayscale=cfg.grayscale)
    train_set = build_dataset(cfg.data, "train", layout, cfg.num_classes, train_tf, cfg.skip_unreadable)
    val_set = build_dataset(cfg.data, val_split, layout, cfg.num_classes, eval_tf, cfg.skip_unreadable)
    label_names = tuple(train_set.label_names)
    if tuple(val_set.label_names) != label_names:
        raise ValueError(f"Train labels {label_names} and {val_split} labels {val_set.label_names} differ.")
    if cfg.balanced:
        weights = class_balanced_weights(train_set.targets, cfg.num_classes)
        sampler = DistributedWeightedSampler(weights, len(train_set), info.world_size, info.rank, seed=cfg.seed)
    else:
        sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"{len(sampler)} training images per process is less than one batch of {cfg.batch_size}: "
            "lower --batch-size."
        )
    val_loader = _eval_loader(val_set, cfg.batch_size, cfg.workers, info)

    # model, optimizer, schedule
    _seed_everything(cfg.seed)  # same initial weights on every rank
    model = create_model(cfg, label_names).to(info.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = create_optimizer_and_scheduler(model, cfg)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp and info.device.type == "cuda")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    _seed_everything(cfg.seed + info.rank)  # distinct augmentation streams per rank

    meta_base = {
        "architecture": cfg.architecture,
        "num_classes": cfg.num_classes,
        "label_names": list(label_names),
        "model_args": dict(cfg.model_args),
        "input_size": [3, cfg.img_size, cfg.img_size],
        "crop_pct": cfg.img_size / cfg.resize,
        "grayscale": cfg.grayscale,
        "config_hash": config_hash(cfg),
        "dataset": dataset_name,
    }
    start_epoch, best, best_epoch, best_state, log = 0, -math.inf, 0, None, []
    if resume:
        loaded = None
        if info.is_main:
            try:
                loaded = _load_resume(run_dir)
            except _SHARED_ERRORS as e:
                error = str(e)
                if not info.distributed:
                    raise
        _raise_together(error, info)
        state, best_state, best, best_epoch = _broadcast(loaded, info)
        model.load_state_dict(state["model"])
        # Optimizer: the saved buffers (momentum...), with cfg's hyper-parameters. Scheduler: rebuilt from cfg
        # (timm's epoch schedules are functions of their arguments and the epoch; a saved one would bring back
        # the old epochs, decay...), only a plateau scheduler's state (best metric so far) carries over.
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(optimizer.param_groups, hyper):
            group.update(values)
        if cfg.sched == "plateau" and state.get("sched") == "plateau":
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        rng = state["rng"]
        if len(rng) == info.world_size:
            _set_rng_state(rng[info.rank], info.device)
        elif info.is_main:
            _logger.warning(f"Resuming on {info.world_size} processes, saved on {len(rng)}: RNG streams restart.")
        log = _read_log(run_dir / "log.jsonl", start_epoch) if info.is_main else []
        if info.is_main:
            _log_config_changes(cfg, run_dir / "config.yaml")
            _logger.info(f"Resuming {run_dir} after epoch {start_epoch}/{cfg.epochs}.")
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        _write_log(run_dir / "log.jsonl", log)
        _logger.info(
            f"Training {cfg.model} on {dataset_name} ({len(train_set)} train / {len(val_set)} {val_split} images, "
            f"{cfg.num_classes} classes) on {info.world_size} x {info.device} -> {run_dir}"
        )

    train_model = model
    if info.distributed:
        device_ids = [info.device] if info.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    scheduler.step(start_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        stats = _train_one_epoch(
            train_model, train_loader, criterion, optimizer, scaler, cfg, info, desc, progress and info.is_main
        )
        scheduler.step(epoch + 1)
        _sync_buffers(model, info)
        cm, val_loss = evaluate(
            model, val_loader, cfg.num_classes, info, cfg.amp, channels_last=cfg.channels_last, progress=False
        )
        val = compute_metrics(cm, label_names)
        entry = {
            "epoch": epoch + 1,
            "lr": lr,
            **{k: stats[k] for k in ("train_loss", "train_acc")},
            "val_loss": val_loss,
            "val_acc": val["accuracy"],
            "val_mean_class_acc": val["mean_class_accuracy"],
            "images_per_s": stats["images_per_s"],
            "time": time.perf_counter() - t0,
        }
        improved = entry[cfg.best_metric] > best
        if improved:
            best, best_epoch = entry[cfg.best_metric], epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        rng = [_rng_state(info.device)]
        if info.distributed:
            rng = [None] * info.world_size
            dist.all_gather_object(rng, _rng_state(info.device))
        if info.is_main:
            log.append(entry)
            _write_log(run_dir / "log.jsonl", log)
            meta = {
                **meta_base,
                "epoch": epoch + 1,
                "metric": {"name": cfg.best_metric, "value": entry[cfg.best_metric]},
            }
            resume_state = {
                "epoch": epoch + 1,
                "best": best,
                "best_epoch": best_epoch,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "sched": cfg.sched,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,
            }
            # resume state last: it is the commit point (see _load_resume for a kill between these writes)
            if improved:
                save_checkpoint(run_dir / "best.safetensors", best_state, meta)
            save_checkpoint(run_dir / "last.safetensors", model.state_dict(), meta)
            _save_resume_state(run_dir / "last_state.pt", resume_state)
            _logger.info(
                f"{desc}: lr {lr:.2e} | train loss {entry['train_loss']:.4f} acc {100 * entry['train_acc']:.2f}% | "
                f"{val_split} loss {val_loss:.4f} acc {100 * entry['val_acc']:.2f}% mean-class "
                f"{100 * entry['val_mean_class_acc']:.2f}% | {entry['images_per_s']:.0f} img/s, {entry['time']:.1f}s"
                + (" *" if improved else "")
            )

    # the best epoch, evaluated on the validation split
    model.load_state_dict(best_state)
    cm, _ = evaluate(model, val_loader, cfg.num_classes, info, cfg.amp, channels_last=cfg.channels_last)
    metrics = compute_metrics(cm, label_names, dataset_name, val_split)
    if info.is_main:
        save_metrics(run_dir / "metrics.json", metrics)
        title = f"{cfg.architecture} on {dataset_name} {val_split}, epoch {best_epoch}"
        plot_confusion_matrix(cm, label_names, run_dir / "confusion_matrix.png", title=title)
        _logger.info(
            f"Best epoch {best_epoch}: {val_split} accuracy {100 * metrics['accuracy']:.2f}%, mean-class "
            f"{100 * metrics['mean_class_accuracy']:.2f}% -> {run_dir / 'best.safetensors'}"
        )
    return metrics
