"""ONNX export with a parity check (:mod:`.export`, needs torch) and an onnxruntime backend (:mod:`.ort_backend`,
numpy and onnxruntime only).

Importing this package imports no torch: the export functions load on first use, so a deployment with
onnxruntime alone can ``from timm_acsi.export import OnnxBackend``.
"""

import importlib
from typing import Any

from .metadata import METADATA_FORMAT, OnnxMetadata, read_metadata
from .ort_backend import OnnxBackend

__all__ = [
    "METADATA_FORMAT",
    "OnnxBackend",
    "OnnxMetadata",
    "read_metadata",
    "DEFAULT_TOLERANCE",
    "ExportResult",
    "ParityError",
    "ParityReport",
    "check_parity",
    "export_onnx",
]

_TORCH_API = ("DEFAULT_TOLERANCE", "ExportResult", "ParityError", "ParityReport", "check_parity", "export_onnx")


def __getattr__(name: str) -> Any:
    """The torch side (:mod:`.export`), imported when one of its names is first used."""
    if name in _TORCH_API:
        return getattr(importlib.import_module(f"{__name__}.export"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
