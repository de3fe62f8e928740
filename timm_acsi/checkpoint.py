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
import re
import secrets
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "sidecar_path",
    "atomic_write",
    "compare_state_dicts",
    "describe_state_dict",
    "load_weights",
]

PathLike = Union[str, os.PathLike]
META_KEY = "timm_acsi"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# ResNet stage layouts -> depth, keyed by (blocks per stage, bottleneck)
_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


def sidecar_path(path: PathLike) -> Path:
    """The JSON description written next to a checkpoint."""
    return Path(path).with_suffix(".json")


def atomic_write(path: PathLike, write_fn: Callable[[str], Any]) -> None:
    """Write ``path`` through ``write_fn(tmp_path)`` and rename it into place.

    An interrupted write leaves the previous file intact: the rename is atomic on POSIX and Windows. The file
    gets the permissions a plain ``open()`` gives (0666 less the umask), not ``mkstemp``'s owner-only 0600:
    run folders and reports stay readable to the other users of a shared machine.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_file(path)
    try:
        mode = os.stat(tmp).st_mode  # what the umask left of 0666
        write_fn(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) create it 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _create_temp_file(path: Path) -> str:
    """A new empty file next to ``path``, created with mode 0666 so that the umask applies as for ``open()``."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:  # another writer drew the same name: draw again
            continue


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
        PermissionError: the file cannot be read.
        ValueError: the file is corrupt, needs unpickling arbitrary objects, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path} exists but cannot be read (permission denied): fix its permissions (chmod +r).")
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


def compare_state_dicts(
    own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> Tuple[List[str], List[str], List[str]]:
    """Keys of ``own`` that ``state_dict`` lacks, keys ``own`` lacks, and keys whose shapes differ."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mismatched


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Say which timm-acsi architecture (and model_args) a state dict's keys look like, e.g. for error messages."""
    blocks = [{int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{i}\.(\d+)\.", k))} for i in range(1, 5)]
    layout = tuple(len(b) for b in blocks)
    if not all(layout):
        return "not a ResNet-family state dict (no layer1..layer4 blocks)"
    bottleneck = any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in state_dict)
    placement = (
        "block"
        if any(re.match(r"layer\d\.\d+\.se\.", k) for k in state_dict)
        else ("stage" if any(re.match(r"layer\d\.attn\.", k) for k in state_dict) else "none")
    )
    final = any(k.startswith("layer4.final_attn.") for k in state_dict)
    fc = state_dict.get("fc.weight")
    head = f"{fc.shape[0]}-class head" if fc is not None else "no classifier"
    block = "Bottleneck" if bottleneck else "BasicBlock"
    depth = _DEPTHS.get((layout, bottleneck))
    if depth is None:
        return f"a {block} ResNet with stages {'-'.join(map(str, layout))} (no timm-acsi depth), {head}"
    if placement == "none" and not final:
        return f"coresnet{depth} (or resnet{depth}: same weight layout), {head}"
    args = {k: v for k, v in (("attn_placement", placement), ("final_attn", final)) if v not in ("block", True)}
    return f"acsinet{depth}" + (f" with model_args {json.dumps(args)}" if args else "") + f", {head}"


def _shorten(keys: Sequence[str], n: int = 3) -> str:
    """The first ``n`` keys, weights before BatchNorm's step counters (which say little about a mismatch)."""
    keys = sorted(keys, key=lambda k: k.endswith("num_batches_tracked"))
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_weights(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: PathLike,
    architecture: str,
    allow_missing: Tuple[str, ...] = (),
    hint: str = "",
) -> None:
    """Load ``state_dict`` into ``model``, strictly but for keys under the ``allow_missing`` prefixes (and
    BatchNorm step counters). A mismatch raises a short ValueError saying what the file's keys look like
    (:func:`describe_state_dict`) instead of torch's key dump, a classifier of another size first and alone (it
    explains its keys' shapes); ``hint`` (what to do) ends the message."""
    own = model.state_dict()
    missing, unexpected, mismatched = compare_state_dicts(own, state_dict)
    missing = [k for k in missing if not k.startswith(allow_missing) and not k.endswith("num_batches_tracked")]
    head = _classifier_mismatch(model, own, state_dict)
    if head is not None:
        mismatched = [k for k in mismatched if not k.startswith(head[0])]  # explained by the head's size
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
    problems = [head[1]] if head is not None else []
    problems += [
        f"{len(keys)} {what} ({_shorten(keys)})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", shapes))
        if keys
    ]
    if problems:
        looks_like = describe_state_dict(state_dict)
        message = f"{source} does not fit {architecture}: {'; '.join(problems)}. Its keys look like {looks_like}."
        raise ValueError(message + (f" {hint}" if hint else ""))
    model.load_state_dict(state_dict, strict=False)  # strict in effect: every mismatch was checked above


def _classifier_mismatch(
    model: torch.nn.Module, own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> Optional[Tuple[str, str]]:
    """``(key prefix, explanation)`` when the file's classifier (timm's pretrained cfg names it) has another
    number of outputs than the model's: the usual cause is a wrong class count, not a wrong architecture."""
    prefix = ((getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc") + "."
    theirs, mine = state_dict.get(prefix + "weight"), own.get(prefix + "weight")
    if theirs is None or mine is None or theirs.ndim != 2 or mine.ndim != 2 or theirs.shape[0] == mine.shape[0]:
        return None
    n, m = theirs.shape[0], mine.shape[0]
    return prefix, (
        f"its classifier has {n} outputs but num_classes is {m} (pass --num-classes {n} with {n} label names, or "
        f"the checkpoint of the {m}-class model)"
    )
