"""The run folder: creating it, its per-epoch log, the resume state (with RNG states) and reading it back."""

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from ..checkpoint import atomic_write, load_checkpoint
from .config import TrainConfig, load_config_file

try:
    import fcntl as _fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded against each other
    _fcntl: Optional[ModuleType] = None

__all__ = ["RUN_FILES", "RunFolderBusyError", "RunFolderLock", "prepare_run_dir"]

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
#: Settings that shape the weights: a run cannot be resumed with other values.
_WEIGHT_SETTINGS = ("architecture", "num_classes", "model_args")


def prepare_run_dir(path: PathLike, overwrite: bool = False, resume: bool = False, create: bool = True) -> Path:
    """Check (and with ``create``, clear and create) a run folder: a new run never writes into another run's folder.

    A folder holding run files is refused unless ``resume`` (continue it: needs ``last_state.pt``, which the
    first completed epoch writes) or ``overwrite`` (remove the run files listed in :data:`RUN_FILES`, and
    nothing else). :func:`~timm_acsi.train.train` checks with ``create=False`` and clears the folder only when
    its first epoch completes: a run that fails earlier leaves the folder as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file: pass a folder path to --output.")
    existing = [n for n in RUN_FILES if (path / n).exists()]
    completed = "last_state.pt" in existing
    if resume:
        if not completed:
            hint = "start it again with --overwrite" if existing else "start a new run without --resume"
            raise FileNotFoundError(
                f"Cannot resume: {path} holds no last_state.pt (the run completed no epoch there): {hint}."
            )
        return path
    if existing and not overwrite:
        hint = (
            "Continue it with --resume, pick another --output, or pass --overwrite to replace it."
            if completed
            else "It completed no epoch: pass --overwrite to start it again, or pick another --output."
        )
        raise FileExistsError(f"{path} already holds a run ({', '.join(existing)}). {hint}")
    if create:
        clear_run_dir(path)
    return path


class RunFolderBusyError(FileExistsError):
    """Another process is training into the run folder."""


class RunFolderLock:
    """An exclusive lock on a run folder while this process trains into it, so that a second ``timm-acsi train``
    on the same folder (a second ``--resume``, an ``--overwrite``) is refused instead of interleaving its writes
    with the first one's. It is the operating system's advisory lock on the folder (``flock``): released when the
    process ends, however it ends, so a killed run leaves nothing stale behind. Not available on Windows."""

    def __init__(self) -> None:
        self._fd: Optional[int] = None

    def acquire(self, path: Path) -> None:
        """Lock ``path`` if it is a folder and this lock holds none yet; raise :class:`RunFolderBusyError` if
        another process holds it."""
        if self._fd is not None or _fcntl is None or not path.is_dir():
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusyError(
                f"{path} is in use: another timm-acsi train is writing to it. Wait for that run to end (or stop "
                "it), or pick another --output."
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def clear_run_dir(path: Path) -> None:
    """Create ``path`` if needed and remove the run files in it (nothing else)."""
    for name in RUN_FILES:
        if (path / name).exists():
            (path / name).unlink()
    path.mkdir(parents=True, exist_ok=True)


def read_log(path: Path, before_epoch: int) -> List[Dict[str, Any]]:
    """The log entries of epochs up to ``before_epoch`` (later ones belong to an interrupted epoch)."""
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if e["epoch"] <= before_epoch]


def write_log(path: Path, entries: List[Dict[str, Any]]) -> None:
    """One JSON object per line; strict JSON (a NaN is an error, never written)."""
    text = "".join(json.dumps(e, allow_nan=False) + "\n" for e in entries)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> Dict[str, Any]:
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


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_resume_state(path: Path, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_resume_state(path: Path) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        raise ValueError(
            f"{path} cannot be read ({type(e).__name__}: {e}). Start the run again with --overwrite."
        ) from e


@dataclass
class ResumePoint:
    """A run's last completed epoch: its resume state, log, and best epoch (weights and metric value)."""

    state: Dict[str, Any]
    log: List[Dict[str, Any]]
    best: float
    best_epoch: int
    best_weights: Optional[Dict[str, torch.Tensor]]

    @property
    def epoch(self) -> int:
        return self.state["epoch"]


def load_resume_point(run_dir: Path, cfg: TrainConfig) -> ResumePoint:
    """Read ``run_dir``'s last completed epoch and check that ``cfg`` can continue it.

    ``last_state.pt`` is written last and holds the model weights of its epoch, so it is consistent on its own.
    ``best.safetensors`` is written first: a run killed after writing it and before the state holds a best
    checkpoint one epoch newer than the state; that checkpoint (and the metric in its description) is the best.
    A changed ``best_metric`` is applied to the kept best epoch (its value of the new metric, from the log).

    Raises:
        ValueError / FileNotFoundError: damaged or inconsistent files, or ``cfg`` changes the model (architecture,
            classes, model_args) or asks for fewer epochs than the run has completed.
    """
    state = _load_resume_state(run_dir / "last_state.pt")
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
        path = run_dir / "last_state.pt"
        raise ValueError(f"{path} lacks {e}: it is damaged. Start the run again with --overwrite.") from e
    _check_continuable(run_dir, cfg, epoch)
    best_weights, best, best_epoch, metric = _read_best(run_dir, epoch, best, best_epoch)
    log = read_log(run_dir / "log.jsonl", max(epoch, best_epoch))
    if metric not in (None, cfg.best_metric):
        best = _metric_of_epoch(log, best_epoch, cfg.best_metric, run_dir)
        _logger.warning(
            f"best_metric {metric} -> {cfg.best_metric}: later epochs must beat the kept best epoch {best_epoch} "
            f"({cfg.best_metric} {best:.4f})."
        )
    return ResumePoint(state, [e for e in log if e["epoch"] <= epoch], best, best_epoch, best_weights)


def _check_continuable(run_dir: Path, cfg: TrainConfig, epoch: int) -> None:
    """Refuse settings that cannot continue the run: another model (the weights would not load), fewer epochs."""
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = TrainConfig(**{**load_config_file(saved_path), "data": ""})
        ours = {k: getattr(cfg, k) for k in _WEIGHT_SETTINGS}
        theirs = {k: getattr(saved, k) for k in _WEIGHT_SETTINGS}
        if ours != theirs:
            raise ValueError(
                f"Cannot resume {run_dir}: the run was {_describe(theirs)}, not {_describe(ours)}. Drop --model, "
                "--num-classes and --model-args to continue it, or start a new run in another --output."
            )
    if cfg.epochs < epoch:
        raise ValueError(
            f"Cannot resume {run_dir}: it has completed {epoch} epochs, more than --epochs {cfg.epochs}. Pass "
            f"--epochs above {epoch} to train on; the run is left as it is."
        )


def _describe(settings: Dict[str, Any]) -> str:
    args = f" with model_args {json.dumps(settings['model_args'])}" if settings["model_args"] else ""
    return f"{settings['architecture']}{args}, {settings['num_classes']} classes"


def _read_best(run_dir: Path, epoch: int, best: float, best_epoch: int):
    """The best epoch's weights, metric value, epoch and metric name (``None`` if unknown), checked against the
    resume state."""
    best_path = run_dir / "best.safetensors"
    if not best_path.is_file():
        if best_epoch:
            raise FileNotFoundError(
                f"Cannot resume: {best_path} (epoch {best_epoch}) is missing. Put it back, or start again with "
                "--overwrite."
            )
        return None, best, best_epoch, None
    weights, meta = load_checkpoint(best_path)
    meta = meta or {}
    saved = meta.get("epoch")
    if saved == epoch + 1 and saved != best_epoch:  # killed between best.safetensors and last_state.pt
        best, best_epoch = meta["metric"]["value"], saved
    elif saved != best_epoch:
        raise ValueError(
            f"Cannot resume: {best_path} is from epoch {saved}, but last_state.pt (epoch {epoch}) says the best "
            f"epoch is {best_epoch}: the file was replaced. Put back the run's best.safetensors, or start the "
            "run again with --overwrite."
        )
    return weights, best, best_epoch, (meta.get("metric") or {}).get("name")


def _metric_of_epoch(log: List[Dict[str, Any]], epoch: int, metric: str, run_dir: Path) -> float:
    entry = next((e for e in log if e["epoch"] == epoch), None)
    if entry is None or not isinstance(entry.get(metric), (int, float)) or not math.isfinite(entry[metric]):
        raise ValueError(
            f"Cannot resume {run_dir} with best_metric {metric}: log.jsonl has no {metric} for the best epoch "
            f"{epoch}. Resume with the run's own --best-metric."
        )
    return float(entry[metric])


def log_config_changes(cfg: TrainConfig, path: Path) -> None:
    """Say which settings differ from the run's saved ``config.yaml`` (they apply from the resumed epoch on)."""
    if not path.is_file():
        return
    saved, now = load_config_file(path), cfg.to_dict()
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k != "output" and k in saved and saved[k] != v]
    if changed:
        _logger.warning(f"Resuming with changed settings (config.yaml is updated): {', '.join(changed)}.")
