"""What an exported ONNX file says about itself: the ``metadata_props`` timm-acsi writes and reads back.

Every value is a string, as ONNX requires: text fields as they are, everything else as JSON (numbers, ``true`` /
``false``, arrays), so a consumer in any language reads them with its JSON parser. ``graph_sha256`` is the
sha256 of the serialized graph (weights included) at export time: a file whose graph was changed afterwards is
refused. This module needs ``onnx`` and no torch, so the onnxruntime backend can use it.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import onnx
from google.protobuf.message import DecodeError

__all__ = [
    "METADATA_FORMAT",
    "OnnxMetadata",
    "graph_sha256",
    "load_onnx",
    "parse_metadata",
    "read_metadata",
]

PathLike = Union[str, os.PathLike]
#: Version of the metadata layout below; a reader refuses a newer one.
METADATA_FORMAT = 1
#: The key that marks a file as written by timm-acsi.
FORMAT_KEY = "timm_acsi_format"
DTYPES = ("float32", "float16")
EXPORTERS = ("dynamo", "torchscript")
# field -> (JSON-encoded?, required?)
_FIELDS = {
    "timm_acsi_version": (False, True),
    "architecture": (False, True),
    "label_names": (True, True),
    "input_size": (True, True),
    "mean": (True, True),
    "std": (True, True),
    "interpolation": (False, True),
    "crop_pct": (True, True),
    "crop_mode": (False, True),
    "grayscale": (True, True),
    "source": (False, True),
    "weights_sha256": (False, False),
    "exporter": (False, True),
    "opset": (True, True),
    "dtype": (False, True),
    "dynamic_size": (True, True),
    "graph_sha256": (False, True),
    "parity": (True, False),
}


@dataclass(frozen=True)
class OnnxMetadata:
    """The facts a consumer needs to feed an exported model and name its outputs."""

    architecture: str  # e.g. "acsinet18"
    label_names: Tuple[str, ...]  # output i is label_names[i]
    input_size: Tuple[int, int, int]  # (channels, height, width) the model was trained at
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str  # resize interpolation, e.g. "bilinear"
    crop_pct: float  # centre crop = input size / resize size
    crop_mode: str  # timm's crop mode, e.g. "center"
    grayscale: bool  # faces are converted to grayscale and replicated to 3 channels before the transform
    source: str  # the model source that was exported
    timm_acsi_version: str
    exporter: str  # "dynamo" (torch.export) or "torchscript" (the fall-back)
    opset: int
    dtype: str  # "float32" or "float16": the input and output type of the graph
    dynamic_size: bool  # height and width are free (else fixed to input_size)
    graph_sha256: str = ""
    weights_sha256: Optional[str] = None  # sha256 of the source's weights file, when there is one
    parity: Optional[Dict[str, Any]] = field(default=None, compare=False)  # the check this file passed

    @property
    def data_config(self) -> Dict[str, Any]:
        """The preprocessing as timm's ``resolve_data_config`` gives it for the exported model."""
        return dict(
            input_size=self.input_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
        )

    def to_props(self) -> Dict[str, str]:
        """The ``metadata_props`` entries, all strings (absent optional fields are left out)."""
        props = {FORMAT_KEY: str(METADATA_FORMAT)}
        for name, (as_json, _) in _FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                props[name] = json.dumps(list(value) if isinstance(value, tuple) else value) if as_json else value
        return props


def graph_sha256(model: onnx.ModelProto) -> str:
    """sha256 of the serialized graph: operators and weights, not the metadata."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def _decode(props: Mapping[str, str], where: str) -> Dict[str, Any]:
    """The typed fields of ``props``; a missing required or unreadable field raises."""
    fmt = props.get(FORMAT_KEY)
    if fmt is None:
        raise ValueError(
            f"{where} carries no timm-acsi metadata (no {FORMAT_KEY!r} entry): it was not written by "
            "`timm-acsi export`. Export the model with `timm-acsi export --model SRC --output FILE.onnx`."
        )
    if not fmt.isdigit() or int(fmt) > METADATA_FORMAT:
        raise ValueError(
            f"{where} has timm-acsi metadata format {fmt!r}; this timm-acsi reads format {METADATA_FORMAT} and "
            "older: upgrade timm-acsi, or export the model again with this version."
        )
    missing = [n for n, (_, required) in _FIELDS.items() if required and n not in props]
    if missing:
        raise ValueError(
            f"{where}: its timm-acsi metadata lacks {', '.join(missing)}: the file was edited or "
            "truncated; export the model again."
        )
    values = {}
    for name, (as_json, _) in _FIELDS.items():
        if name not in props:
            continue
        try:
            values[name] = json.loads(props[name]) if as_json else props[name]
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: metadata entry {name}={props[name]!r} is not valid JSON ({e}).") from e
    return values


def _check_values(v: Dict[str, Any], where: str) -> None:
    """Refuse values no export writes, naming the entry."""

    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"{where}: metadata entry {name}={v[name]!r} is not {expected}; export the model again.")

    names = v["label_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise bad("label_names", "a non-empty list of class names")
    if len(set(names)) != len(names):
        raise bad("label_names", "a list of distinct names")
    size = v["input_size"]
    if not isinstance(size, list) or len(size) != 3 or not all(type(s) is int and s > 0 for s in size):
        raise bad("input_size", "[channels, height, width]")
    for name in ("mean", "std"):
        values = v[name]
        if not isinstance(values, list) or len(values) != size[0] or not all(_number(x) for x in values):
            raise bad(name, f"a list of {size[0]} numbers (one per channel)")
    if not all(x > 0 for x in v["std"]):
        raise bad("std", "positive")
    if not _number(v["crop_pct"]) or not 0 < v["crop_pct"] <= 1:
        raise bad("crop_pct", "a number in (0, 1]")
    for name in ("grayscale", "dynamic_size"):
        if not isinstance(v[name], bool):
            raise bad(name, "true or false")
    if type(v["opset"]) is not int:
        raise bad("opset", "an integer")
    if v["dtype"] not in DTYPES:
        raise bad("dtype", " or ".join(DTYPES))
    if v["exporter"] not in EXPORTERS:
        raise bad("exporter", " or ".join(EXPORTERS))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_metadata(props: Mapping[str, str], where: str = "The ONNX file") -> OnnxMetadata:
    """Typed, validated metadata from ``metadata_props`` entries; anything missing or malformed raises ValueError."""
    v = _decode(props, where)
    _check_values(v, where)
    return OnnxMetadata(
        architecture=v["architecture"],
        label_names=tuple(v["label_names"]),
        input_size=tuple(v["input_size"]),
        mean=tuple(float(x) for x in v["mean"]),
        std=tuple(float(x) for x in v["std"]),
        interpolation=v["interpolation"],
        crop_pct=float(v["crop_pct"]),
        crop_mode=v["crop_mode"],
        grayscale=v["grayscale"],
        source=v["source"],
        timm_acsi_version=v["timm_acsi_version"],
        exporter=v["exporter"],
        opset=v["opset"],
        dtype=v["dtype"],
        dynamic_size=v["dynamic_size"],
        graph_sha256=v["graph_sha256"],
        weights_sha256=v.get("weights_sha256"),
        parity=v.get("parity"),
    )


def load_onnx(path: PathLike) -> Tuple[bytes, onnx.ModelProto, OnnxMetadata]:
    """Read an exported file: its bytes, the parsed model and its checked metadata.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ONNX file (truncated, corrupt), no or malformed timm-acsi metadata, or a graph that
            differs from the one exported (``graph_sha256``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such ONNX file: {path}.")
    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable ONNX file ({type(e).__name__}: {e}); it may be truncated or corrupt: "
            "copy or export it again."
        ) from e
    if not model.graph.node:
        raise ValueError(f"{path} holds no ONNX graph (empty or not an ONNX file): copy or export it again.")
    meta = parse_metadata({p.key: p.value for p in model.metadata_props}, str(path))
    if graph_sha256(model) != meta.graph_sha256:
        raise ValueError(
            f"{path}: its graph (operators or weights) differs from the one timm-acsi exported (graph_sha256 "
            "mismatch): the file was modified or damaged after export. Export the model again."
        )
    return data, model, meta


def read_metadata(path: PathLike) -> OnnxMetadata:
    """The checked timm-acsi metadata of an exported ONNX file (see :func:`load_onnx` for the errors)."""
    return load_onnx(path)[2]
