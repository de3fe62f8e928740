"""Checkpoint files: safetensors weights plus a JSON description, written atomically, read safely.

A timm-acsi checkpoint is ``NAME.safetensors`` (the model's state dict) whose header metadata carries a
JSON description under the key ``"timm_acsi"`` (architecture, num_classes, label_names, model_args and
whatever the writer adds: epoch, metric, config hash...). The same description is written next to it as
``NAME.json`` for people to read. Other weight files (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) are read
with ``torch.load(weights_only=True)``: nothing is ever unpickled.
"""

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "sidecar_path", "atomic_write"]

PathLike = Union[str, os.PathLike]
META_KEY = "timm_acsi"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def sidecar_path(path: PathLike) -> Path:
    """The JSON description written next to a checkpoint."""
    return Path(path).with_suffix(".json")


def atomic_write(path: PathLike, write_fn) -> None:
    """Write ``path`` through ``write_fn(tmp_path)`` and rename it into place.

    An interrupted write leaves the previous file intact: the rename is atomic on POSIX and Windows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path: PathLike, state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Path:
    """Save ``state_dict`` as safetensors with ``meta`` in its header and in a JSON sidecar.

    Both files are replaced atomically. Tensors are made contiguous CPU copies (safetensors requires
    it), and shared storage is not an issue since each tensor is written on its own.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"Checkpoints are written as safetensors: {path} must end in .safetensors.")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta_json = json.dumps(meta, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: meta_json}))
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text))
    return path


def read_checkpoint_meta(path: PathLike) -> Optional[Dict[str, Any]]:
    """The description of a checkpoint: its safetensors header, else its JSON sidecar, else ``None``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}).") from e
        if META_KEY in header:
            return json.loads(header[META_KEY])
    side = sidecar_path(path)
    if side.is_file():
        return json.loads(side.read_text())
    return None


def _unwrap_state_dict(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    """Find the state dict in a training checkpoint dict, without DDP's ``module.`` prefix."""
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict of tensors (found {type(obj).__name__}).")
    return _strip_ddp_prefix(obj)


def _strip_ddp_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix DistributedDataParallel adds to every key."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_checkpoint(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """Load ``(state_dict, meta)`` from a safetensors file, or from a ``.pth``-style file without unpickling.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupt, needs unpickling arbitrary objects, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.suffix == ".safetensors":
        meta = read_checkpoint_meta(path)
        try:
            return _strip_ddp_prefix(load_file(str(path))), meta
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}).") from e
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"Unknown checkpoint type {path.suffix!r}: use .safetensors (or .pth/.pt/.bin/.ckpt).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only raises for anything but tensors and plain values
        raise ValueError(
            f"{path} holds pickled objects, which timm-acsi never unpickles (torch.load(weights_only=True) refused "
            "it). Re-save its state dict as safetensors in the environment that made it: "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
        ) from e
    except Exception as e:  # a truncated zip (OSError, RuntimeError), or not a torch file at all (KeyError...)
        raise ValueError(
            f"{path} is not a readable torch file ({type(e).__name__}: {e}): it is corrupt, truncated or of another "
            "format; re-download or re-save it."
        ) from e
    side = sidecar_path(path)
    return _unwrap_state_dict(obj, path), (json.loads(side.read_text()) if side.is_file() else None)
