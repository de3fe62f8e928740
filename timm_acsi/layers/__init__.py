from .coconv import CoConv2d, coconv_splits
from .coord_attn import AcsiCoordAttn

__all__ = ["CoConv2d", "coconv_splits", "AcsiCoordAttn"]
