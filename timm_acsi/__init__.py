"""timm-acsi: CoResNet and ACSI-Net facial expression recognition models for timm.

Importing this package registers ``coresnet18/34/50`` and ``acsinet18/34/50`` with timm, so that
``timm.create_model("acsinet18")`` and ``hf-hub:`` loading of published weights work.
"""

from .labels import FER7_LABELS, FER8_LABELS, canonical_label
from .layers import AcsiCoordAttn, CoConv2d
from .models import CoResNet

__version__ = "0.1.0"

__all__ = ["FER7_LABELS", "FER8_LABELS", "canonical_label", "AcsiCoordAttn", "CoConv2d", "CoResNet", "__version__"]
