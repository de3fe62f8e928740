"""timm-acsi: CoResNet and ACSI-Net facial expression recognition models for timm.

Importing this package registers ``coresnet18/34/50`` and ``acsinet18/34/50`` with timm, so that
``timm.create_model("acsinet18")`` and ``hf-hub:`` loading of published weights work. Without torch and timm
installed (an onnxruntime-only deployment) nothing is registered and the package still imports.
``ExpressionRecognizer`` is imported on first use.
"""

from importlib.util import find_spec

from .labels import FER7_LABELS, FER8_LABELS, canonical_label

__version__ = "0.1.0"


def _installed(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # blocked by an import hook, or sys.modules[name] set to None
        return False


HAS_TORCH = _installed("torch") and _installed("timm")
_TORCH_NAMES = ("AcsiCoordAttn", "CoConv2d", "CoResNet")
if HAS_TORCH:  # a broken torch install still fails loudly here; only an absent one is skipped
    from .layers import AcsiCoordAttn as AcsiCoordAttn
    from .layers import CoConv2d as CoConv2d
    from .models import CoResNet as CoResNet

__all__ = [
    "FER7_LABELS",
    "FER8_LABELS",
    "canonical_label",
    *(_TORCH_NAMES if HAS_TORCH else ()),
    "ExpressionRecognizer",
    "__version__",
]


def __getattr__(name: str):
    """``ExpressionRecognizer`` on first use (PEP 562), so ``import timm_acsi`` does not load the predictor."""
    if name == "ExpressionRecognizer":
        from .inference import ExpressionRecognizer

        return ExpressionRecognizer
    if name in _TORCH_NAMES:
        raise ImportError(f"timm_acsi.{name} needs torch and timm: pip install torch timm.")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
