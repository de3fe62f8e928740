"""Contextual convolution (CoConv), Duta et al., "Contextual Convolutional Neural Networks", ICCVW 2021.

A CoConv layer is ``n`` parallel KxK convolutions over the same input (groups=1), branch ``i`` with
dilation ``d_i`` and padding ``d_i * (K - 1) // 2`` so every branch keeps the spatial size, all with the
layer's stride; their outputs are concatenated in branch order. The output channels are split between
the branches, so weights and FLOPs equal those of one standard KxK convolution.

This implementation keeps one ``weight`` of shape ``[out, in, K, K]`` whose output-channel slices use
different dilations, so its state dict is the one of the ``nn.Conv2d`` it replaces: ResNet checkpoints
load into CoResNet unchanged, and anything that initialises ``nn.Conv2d`` initialises it too.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CoConv2d", "coconv_splits"]


def coconv_splits(out_channels: int, level: int) -> Tuple[int, ...]:
    """Output channels per branch for a CoConv ``level``, as in the official CoConv code.

    Level 1: one plain conv; level 2: C/2, C/2; level 3: C/2, C/4, C/4; level 4: C/4 each.
    """
    if level == 1:
        return (out_channels,)
    divisor = {2: 2, 3: 4, 4: 4}.get(level)
    if divisor is None:
        raise ValueError(f"CoConv level {level} has no split rule; use level 1-4 or pass splits=... explicitly.")
    if out_channels % divisor:
        raise ValueError(
            f"CoConv level {level} splits out_channels by {divisor}, but {out_channels} is not divisible by "
            f"{divisor}; pass splits=... explicitly."
        )
    if level == 3:
        return (out_channels // 2, out_channels // 4, out_channels // 4)
    return (out_channels // divisor,) * level


class CoConv2d(nn.Conv2d):
    """Drop-in replacement for a KxK ``nn.Conv2d`` whose output-channel groups see different dilations.

    Args:
        in_channels: Input channels (every branch sees all of them).
        out_channels: Output channels, split between the branches.
        kernel_size: Odd kernel size K >= 3 (the paper uses 3).
        stride: Stride of every branch.
        level: Number of branches; picks the default splits (:func:`coconv_splits`) and dilations 1..level.
        splits: Output channels per branch, overriding ``level``'s rule; must sum to ``out_channels``.
        dilations: Dilation per branch (default ``1..n``), multiplied by ``dilation``.
        dilation: Base dilation, for dilated (output-stride < 32) networks.
        bias: Add a learnable bias (one per output channel, as ``nn.Conv2d``).

    It subclasses ``nn.Conv2d`` so that the weight layout, ``from_conv`` and timm's weight loading stay those of
    the conv it replaces, but its ``dilation``/``padding`` attributes are the base ones (branch 0): tools that
    rebuild any ``nn.Conv2d`` from its attributes (``torch.utils.mkldnn.to_mkldnn``, some fusers) would turn it
    into a plain conv. Its ``forward`` is the only correct reading of the layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        level: int = 1,
        splits: Optional[Sequence[int]] = None,
        dilations: Optional[Sequence[int]] = None,
        dilation: int = 1,
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(
                f"CoConv2d supports odd square kernels of size >= 3, got kernel_size={kernel_size!r}: an even "
                "kernel cannot keep the spatial size of every dilated branch, and a 1x1 kernel has no context."
            )
        splits = tuple(splits) if splits is not None else coconv_splits(out_channels, level)
        if any(s <= 0 for s in splits) or sum(splits) != out_channels:
            raise ValueError(f"CoConv splits {list(splits)} must be positive and sum to out_channels={out_channels}.")
        dilations = tuple(dilations) if dilations is not None else tuple(range(1, len(splits) + 1))
        if len(dilations) != len(splits) or any(d <= 0 for d in dilations):
            raise ValueError(
                f"CoConv needs one positive dilation per branch: {len(splits)} splits {list(splits)}, "
                f"dilations {list(dilations)}."
            )
        dilations = tuple(d * dilation for d in dilations)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilations[0] * (kernel_size // 2),
            dilation=dilations[0],
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.splits: List[int] = list(splits)
        self.dilations: List[int] = list(dilations)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, level: int = 1, **kwargs) -> "CoConv2d":
        """A CoConv that shares (not copies) the parameters of ``conv``, a plain square-kernel conv."""
        k = conv.kernel_size[0]
        if (
            type(conv) is not nn.Conv2d
            or conv.kernel_size != (k, k)
            or conv.groups != 1
            or conv.padding_mode != "zeros"
            or conv.padding != (conv.dilation[0] * (k // 2),) * 2
            or conv.dilation[0] != conv.dilation[1]
            or conv.stride[0] != conv.stride[1]
        ):
            raise ValueError(f"Only a plain, 'same'-padded, ungrouped square conv can become a CoConv2d, got {conv}.")
        co = cls(
            conv.in_channels,
            conv.out_channels,
            k,
            stride=conv.stride[0],
            level=level,
            dilation=conv.dilation[0],
            bias=conv.bias is not None,
            device="meta",
            **kwargs,
        )
        co.weight = conv.weight
        co.bias = conv.bias
        return co

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"splits={self.splits}, dilations={self.dilations}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.splits) == 1:
            return self._conv_forward(x, self.weight, self.bias)
        k = self.kernel_size[0]
        # One split of the weight, not a slice per branch: its backward concatenates the branch gradients,
        # where slices would each scatter theirs into a zero tensor of the full weight's size, then add up.
        # The last chunk holds the rows no branch uses: none, unless splits was changed after construction.
        weights = self.weight.split(self.splits + [self.out_channels - sum(self.splits)])
        outs: List[torch.Tensor] = []
        start = 0
        for i, (split, d) in enumerate(zip(self.splits, self.dilations)):
            bias = self.bias
            if bias is not None:
                bias = bias[start : start + split]
            outs.append(F.conv2d(x, weights[i], bias, self.stride, d * (k // 2), d))
            start += split
        return torch.cat(outs, dim=1)
