"""Coordinate attention configured as in ACSI-Net (Hou et al., CVPR 2021, official module settings)."""

from typing import Optional

from timm.layers.coord_attn import CoordAttn

__all__ = ["AcsiCoordAttn"]


class AcsiCoordAttn(CoordAttn):
    """timm's ``CoordAttn`` with the official module's reduction: ``max(8, C // 32)`` channels, no conv bias.

    This setting reproduces the parameter counts of the paper (timm's defaults differ). Accepts the
    ``(channels, device=None, dtype=None)`` signature of timm's ``attn_layer`` slot; other
    ``CoordAttn`` kwargs may override the defaults.
    """

    def __init__(self, channels: int, rd_channels: Optional[int] = None, bias: bool = False, **kwargs) -> None:
        super().__init__(channels, rd_channels=rd_channels or max(8, channels // 32), bias=bias, **kwargs)
