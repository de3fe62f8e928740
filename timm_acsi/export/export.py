"""Export a model to ONNX with its labels and preprocessing in the file, and prove it computes what PyTorch does.

Every export is checked before it is kept: ``onnx.checker`` (full check), then onnxruntime against the PyTorch
model on random inputs and on a real face (scikit-image's astronaut photo, preprocessed as the metadata says):
max abs difference of the logits and of the softmax, and the same argmax. The file is written under a temporary
name in the output folder and renamed only when the check passes, so a failed export leaves no file behind.

The current exporter (``torch.onnx.export(..., dynamo=True)``, built on ``torch.export``) is tried first;
the TorchScript exporter is the fall-back when it fails, and the metadata says which one wrote the file.
"""

import copy
import dataclasses
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from .. import __version__
from ..checkpoint import atomic_write
from .metadata import OnnxMetadata, graph_sha256
from .ort_backend import OnnxBackend

__all__ = [
    "DEFAULT_TOLERANCE",
    "EXPORTERS",
    "ExportResult",
    "ParityCase",
    "ParityError",
    "ParityReport",
    "astronaut_face",
    "check_output",
    "check_parity",
    "export_onnx",
    "parity_inputs",
]

PathLike = Union[str, os.PathLike]
#: Largest allowed max abs difference of logits and of softmax, per exported dtype. A float16 graph is compared
#: with the float32 PyTorch model; float16 keeps ~3 significant digits, so its error grows with the logits
#: (measured: 1.6e-3 on logits of magnitude 1.4): 5e-2 leaves room for trained models' larger logits.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 5e-2}
EXPORTERS = ("auto", "dynamo", "torchscript")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: The face in ``skimage.data.astronaut()`` (512x512): a square crop (left, top, right, bottom), hair to chin.
ASTRONAUT_FACE_BOX = (155, 50, 295, 190)
_SEED = 0


class ParityError(ValueError):
    """The exported model does not compute what the PyTorch model computes (within tolerance)."""

    def __init__(self, message: str, report: "ParityReport"):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ParityCase:
    """One input batch run through PyTorch and onnxruntime."""

    name: str  # e.g. "random, batch 3" or "face: astronaut"
    shape: Tuple[int, ...]
    max_abs_logits: float
    max_abs_softmax: float
    argmax_mismatches: int  # rows whose argmax differs (a tie within tolerance in PyTorch's logits is no mismatch)


@dataclass(frozen=True)
class ParityReport:
    """All parity cases of one export, against one tolerance."""

    cases: Tuple[ParityCase, ...]
    tolerance: float

    @property
    def max_abs_logits(self) -> float:
        return max(c.max_abs_logits for c in self.cases)

    @property
    def max_abs_softmax(self) -> float:
        return max(c.max_abs_softmax for c in self.cases)

    @property
    def rows(self) -> int:
        return sum(c.shape[0] for c in self.cases)

    @property
    def argmax_mismatches(self) -> int:
        return sum(c.argmax_mismatches for c in self.cases)

    @property
    def passed(self) -> bool:
        return (
            self.max_abs_logits <= self.tolerance
            and self.max_abs_softmax <= self.tolerance
            and self.argmax_mismatches == 0
        )

    def summary(self) -> str:
        """One line: the worst differences, the argmax agreement and the verdict."""
        return (
            f"max |logits diff| {self.max_abs_logits:.2e}, max |softmax diff| {self.max_abs_softmax:.2e}, "
            f"same argmax {self.rows - self.argmax_mismatches}/{self.rows} "
            f"(tolerance {self.tolerance:.0e}: {'passed' if self.passed else 'FAILED'})"
        )

    def to_dict(self) -> Dict[str, Any]:
        """The figures stored in the exported file's metadata."""
        return dict(
            tolerance=self.tolerance,
            max_abs_logits=self.max_abs_logits,
            max_abs_softmax=self.max_abs_softmax,
            argmax_same=self.rows - self.argmax_mismatches,
            rows=self.rows,
            inputs=[c.name for c in self.cases],
        )


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how it was checked."""

    path: Path
    metadata: OnnxMetadata
    parity: ParityReport
    fallback_reason: Optional[str] = None  # why the dynamo exporter failed, when the TorchScript one was used

    @property
    def exporter(self) -> str:
        return self.metadata.exporter


# ------------------------------------------------------------------------------------------------ inputs


def astronaut_face() -> Image.Image:
    """The face of scikit-image's astronaut photo (public-domain NASA portrait), a real face for parity checks.

    Raises:
        ModuleNotFoundError: scikit-image is not installed (it comes with ``pip install "timm-acsi[onnx]"``).
    """
    try:
        from skimage import data
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "The parity check's real face is scikit-image's astronaut photo: pip install scikit-image "
            '(or "timm-acsi[onnx]"), or pass your own face images.'
        ) from e
    return Image.fromarray(data.astronaut()).crop(ASTRONAUT_FACE_BOX)


def preprocess(img: Image.Image, data_config: Mapping[str, Any], grayscale: bool = False) -> torch.Tensor:
    """``[3, H, W]`` input of a face image, through timm's eval transform of ``data_config``."""
    img = img.convert("L").convert("RGB") if grayscale else img.convert("RGB")
    return create_transform(**data_config, is_training=False)(img)


def parity_inputs(
    data_config: Mapping[str, Any],
    grayscale: bool = False,
    batch_size: Optional[int] = None,
    dynamic_size: bool = False,
    images: Optional[Mapping[str, Image.Image]] = None,
) -> Dict[str, torch.Tensor]:
    """Named input batches for the parity check, reproducible (fixed seed).

    Random normal batches at the input size (batches of 1 and 3 for a dynamic batch axis, else ``batch_size``),
    one of another height and width for ``dynamic_size``, and each face image (default: the astronaut's face)
    preprocessed as ``data_config`` and ``grayscale`` say.
    """
    gen = torch.Generator().manual_seed(_SEED)
    c, h, w = data_config["input_size"]
    batches = [1, 3] if batch_size is None else [batch_size]
    inputs = {f"random, batch {n}": torch.randn(n, c, h, w, generator=gen) for n in batches}
    if dynamic_size:
        inputs[f"random, {h + 32}x{w + 16}"] = torch.randn(batches[-1], c, h + 32, w + 16, generator=gen)
    faces = images if images is not None else {"astronaut": astronaut_face()}
    for name, img in faces.items():
        face = preprocess(img, data_config, grayscale).unsqueeze(0)
        inputs[f"face: {name}"] = face.expand(batches[0], -1, -1, -1).contiguous()
    return inputs


# ------------------------------------------------------------------------------------------------ parity


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _compare(name: str, shape: Tuple[int, ...], ref: np.ndarray, out: np.ndarray, tolerance: float) -> ParityCase:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    rows = np.arange(len(ref))
    # ORT's pick counts as a mismatch only when PyTorch scores it lower than its own pick by more than the tolerance
    gap = ref[rows, ref.argmax(-1)] - ref[rows, out.argmax(-1)]
    return ParityCase(
        name=name,
        shape=shape,
        max_abs_logits=float(np.abs(ref - out).max()),
        max_abs_softmax=float(np.abs(_softmax(ref) - _softmax(out)).max()),
        argmax_mismatches=int((gap > tolerance).sum()),
    )


@torch.inference_mode()
def check_parity(
    model: nn.Module, backend: OnnxBackend, inputs: Mapping[str, torch.Tensor], tolerance: float
) -> ParityReport:
    """Run every input batch through ``model`` and ``backend`` and compare logits, softmax and argmax."""
    device = next(model.parameters()).device
    cases = []
    for name, x in inputs.items():
        ref = model(x.to(device)).float().cpu().numpy()
        out = backend(x.numpy())
        cases.append(_compare(name, tuple(x.shape), ref, out, tolerance))
    return ParityReport(tuple(cases), tolerance)


# ----------------------------------------------------------------------------------------------- export


def _dynamic_axes(dynamic_batch: bool, dynamic_size: bool) -> Dict[int, str]:
    """Input axis -> name of each free axis."""
    return {**({0: "batch"} if dynamic_batch else {}), **({2: "height", 3: "width"} if dynamic_size else {})}


def _export_dynamo(
    model: nn.Module, example: torch.Tensor, axes: Mapping[int, str], opset: Optional[int]
) -> onnx.ModelProto:
    dims = {i: torch.export.Dim(name, min=1 if i == 0 else 32) for i, name in axes.items()}
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        verbose=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=(dims,) if dims else None,
        opset_version=opset,
    )
    return program.model_proto


def _export_torchscript(
    model: nn.Module, example: torch.Tensor, axes: Mapping[int, str], opset: Optional[int]
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: dict(axes), **({OUTPUT_NAME: {0: axes[0]}} if 0 in axes else {})}
    with warnings.catch_warnings():  # the deprecation of this exporter is known: it is the reported fall-back
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes or None,
            opset_version=opset,
        )
    return onnx.load_from_string(buffer.getvalue())


def _export_graph(
    model: nn.Module, example: torch.Tensor, axes: Mapping[int, str], opset: Optional[int], exporter: str
) -> Tuple[onnx.ModelProto, str, Optional[str]]:
    """The ONNX model, the exporter that wrote it, and why dynamo failed when the fall-back was used."""
    reason = None
    if exporter in ("auto", "dynamo"):
        try:
            return _export_dynamo(model, example, axes, opset), "dynamo", None
        except Exception as e:  # torch.export fails in many ways (graph breaks, guards, ops): all mean "fall back"
            if exporter == "dynamo":
                raise ValueError(f"The dynamo exporter failed: {type(e).__name__}: {e}") from e
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return _export_torchscript(model, example, axes, opset), "torchscript", reason


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _set_metadata(model: onnx.ModelProto, meta: OnnxMetadata) -> None:
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta.to_props())
    model.producer_name, model.producer_version = "timm-acsi", __version__
    model.doc_string = f"{meta.architecture} ({len(meta.label_names)} classes: {', '.join(meta.label_names)})"


def _data_config(model: nn.Module, data_config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """timm's data config of ``model`` (or the one given), with tuples where timm has them."""
    cfg = dict(resolve_data_config(model=model) if data_config is None else data_config)
    for key in ("input_size", "mean", "std"):
        cfg[key] = tuple(cfg[key])
    return cfg


def check_output(output: PathLike, overwrite: bool = False) -> None:
    """Refuse an output that is no ``.onnx`` file name, or that exists without ``overwrite``."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"{output} must end in .onnx.")
    if output.is_dir():
        raise ValueError(f"{output} is a folder: pass a file name ending in .onnx.")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists: pass another output, or overwrite=True (--overwrite) to replace it.")


def export_onnx(
    model: nn.Module,
    output: PathLike,
    *,
    label_names: Sequence[str],
    architecture: Optional[str] = None,
    data_config: Optional[Mapping[str, Any]] = None,
    grayscale: bool = False,
    source: Optional[str] = None,
    weights_sha256: Optional[str] = None,
    dynamic_size: bool = False,
    batch_size: Optional[int] = None,
    opset: Optional[int] = None,
    fp16: bool = False,
    exporter: str = "auto",
    tolerance: Optional[float] = None,
    images: Optional[Mapping[str, Image.Image]] = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model`` to ``output`` (``.onnx``) with its metadata, after a parity check against PyTorch.

    Args:
        model: the model in eval mode; its outputs are named by ``label_names`` (in output order).
        output: the ``.onnx`` file to write; an existing one is replaced only with ``overwrite``.
        architecture: default ``model.pretrained_cfg["architecture"]``.
        data_config: the preprocessing (timm's ``resolve_data_config`` keys); default: resolved from ``model``.
        grayscale: the model was trained on grayscale faces (replicated to 3 channels).
        source, weights_sha256: where the model came from, recorded in the metadata.
        dynamic_size: free height and width (the batch axis is free unless ``batch_size`` fixes it).
        opset: ONNX opset (default: the exporter's).
        fp16: export a float16 graph (float16 input and logits); checked against the float32 PyTorch model
            with the float16 tolerance (:data:`DEFAULT_TOLERANCE`).
        exporter: ``"auto"`` (dynamo, TorchScript if it fails), ``"dynamo"`` or ``"torchscript"``.
        tolerance: largest allowed max abs difference of logits and of softmax (default per dtype).
        images: name -> face image for the parity check (default: the astronaut's face, from scikit-image).

    Raises:
        ParityError: onnxruntime's results differ from PyTorch's beyond ``tolerance`` (no file is left).
        FileExistsError: ``output`` exists and ``overwrite`` is false.
        ValueError: bad arguments, label names that do not fit the model's outputs, or a failed export.
    """
    output = Path(output)
    check_output(output, overwrite)
    if exporter not in EXPORTERS:
        raise ValueError(f"Unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}.")
    if model.training:
        raise ValueError("The model is in training mode (batch statistics, dropout): call model.eval() first.")
    architecture = architecture or getattr(model, "pretrained_cfg", {}).get("architecture")
    if not architecture:
        raise ValueError("The model has no pretrained_cfg naming its architecture: pass architecture=.")
    data_config = _data_config(model, data_config)
    dtype = "float16" if fp16 else "float32"
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    inputs = parity_inputs(data_config, grayscale, batch_size, dynamic_size, images)
    _check_label_names(model, label_names, next(iter(inputs.values())))

    graph, used, reason = _export(model, data_config, batch_size, dynamic_size, opset, exporter, fp16)
    meta = OnnxMetadata(
        architecture=architecture,
        label_names=tuple(label_names),
        input_size=data_config["input_size"],
        mean=data_config["mean"],
        std=data_config["std"],
        interpolation=data_config["interpolation"],
        crop_pct=float(data_config["crop_pct"]),
        crop_mode=data_config.get("crop_mode", "center"),
        grayscale=bool(grayscale),
        source=source or architecture,
        timm_acsi_version=__version__,
        exporter=used,
        opset=_opset(graph),
        dtype=dtype,
        dynamic_size=dynamic_size,
        graph_sha256=graph_sha256(graph),
        weights_sha256=weights_sha256,
    )
    _set_metadata(graph, meta)
    onnx.checker.check_model(graph, full_check=True)
    report = _write_checked(graph, meta, output, model, inputs, tolerance)
    return ExportResult(output, dataclasses.replace(meta, parity=report.to_dict()), report, reason)


def _check_label_names(model: nn.Module, label_names: Sequence[str], x: torch.Tensor) -> None:
    with torch.inference_mode():
        n = model(x[:1].to(next(model.parameters()).device)).shape[-1]
    if len(label_names) != n:
        raise ValueError(f"{len(label_names)} label names for a model with {n} outputs: pass one name per output.")


def _export(
    model: nn.Module,
    data_config: Mapping[str, Any],
    batch_size: Optional[int],
    dynamic_size: bool,
    opset: Optional[int],
    exporter: str,
    fp16: bool,
) -> Tuple[onnx.ModelProto, str, Optional[str]]:
    """The ONNX graph of a CPU copy of ``model`` (float16 for ``fp16``), exported with an example batch."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    dtype = torch.float16 if fp16 else torch.float32
    model = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()
    # an example batch of 1 would make torch.export fix the batch axis: use 2 when it is free
    example = torch.zeros(batch_size or 2, *data_config["input_size"], dtype=dtype)
    return _export_graph(model, example, _dynamic_axes(batch_size is None, dynamic_size), opset, exporter)


def _write_checked(
    graph: onnx.ModelProto,
    meta: OnnxMetadata,
    output: Path,
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    tolerance: float,
) -> ParityReport:
    """Write ``graph`` to a temporary file next to ``output``, check parity through :class:`OnnxBackend` (the
    consumer's path, metadata included), record the figures and rename it into place; a failure removes it."""
    result: List[ParityReport] = []

    def write(tmp: str) -> None:
        onnx.save_model(graph, tmp)
        report = check_parity(model, OnnxBackend(tmp), inputs, tolerance)
        if not report.passed:
            raise ParityError(
                f"onnxruntime does not reproduce {meta.architecture}: {report.summary()}. No file was written; "
                "try the other exporter (--exporter), or report the model.",
                report,
            )
        _set_metadata(graph, dataclasses.replace(meta, parity=report.to_dict()))
        onnx.save_model(graph, tmp)
        result.append(report)

    atomic_write(output, write)
    return result[0]
