"""CoConv2d against a reference built from separate dilated ``nn.Conv2d``s (the paper's definition)."""

from typing import Sequence

import pytest
import torch
from torch import nn

from timm_acsi.layers import CoConv2d, coconv_splits

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_conv(co: CoConv2d) -> nn.ModuleList:
    """One plain ``nn.Conv2d`` per branch (dilation d_i, padding d_i * (K // 2), the layer's stride) holding
    the same weight (and bias) slice as ``co``: CoConv as the paper and the official code define it."""
    k = co.kernel_size[0]
    branches = nn.ModuleList()
    start = 0
    for split, d in zip(co.splits, co.dilations):
        conv = nn.Conv2d(
            co.in_channels, split, k, stride=co.stride, padding=d * (k // 2), dilation=d, bias=co.bias is not None
        )
        with torch.no_grad():
            conv.weight.copy_(co.weight[start : start + split])
            if co.bias is not None:
                conv.bias.copy_(co.bias[start : start + split])
        branches.append(conv)
        start += split
    return branches


def reference_forward(branches: Sequence[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([conv(x) for conv in branches], dim=1)


def _randomize(co: CoConv2d) -> CoConv2d:
    """Random weights (and bias) so that every slice differs and a mix-up of slices cannot go unnoticed."""
    with torch.no_grad():
        co.weight.normal_()
        if co.bias is not None:
            co.bias.normal_()
    return co


@pytest.mark.parametrize("level", [1, 2, 3, 4])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 9), (13, 13), (2, 3), (1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_separate_dilated_convs(level, stride, size, bias):
    torch.manual_seed(level * 100 + stride * 10 + size[0])
    co = _randomize(CoConv2d(5, 16, 3, stride=stride, level=level, bias=bias))
    assert co.dilations == list(range(1, level + 1))
    x = torch.randn(2, 5, *size)
    out = co(x)
    expected = reference_forward(reference_conv(co), x)
    # 'same' padding for every branch: out = floor((H - 1) / stride) + 1 for every dilation
    assert out.shape == (2, 16, (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "splits, dilations, dilation, kernel_size",
    [
        ((4, 12), (1, 3), 1, 3),
        ((2, 2, 2, 2, 8), (1, 2, 3, 4, 5), 1, 3),
        ((6, 10), None, 2, 3),  # base dilation multiplies the branch dilations: (2, 4)
        ((3, 5, 8), (2, 1, 5), 1, 3),  # dilations in any order
        ((8, 8), (1, 2), 1, 5),  # 5x5 kernel, padding 2 * d
    ],
)
@pytest.mark.parametrize("stride", [1, 2])
def test_custom_splits_and_dilations_match_reference(splits, dilations, dilation, kernel_size, stride):
    torch.manual_seed(0)
    co = _randomize(
        CoConv2d(4, 16, kernel_size, stride=stride, splits=splits, dilations=dilations, dilation=dilation, bias=True)
    )
    base = dilations or tuple(range(1, len(splits) + 1))
    assert co.splits == list(splits)
    assert co.dilations == [d * dilation for d in base]
    x = torch.randn(1, 4, 11, 6)
    torch.testing.assert_close(co(x), reference_forward(reference_conv(co), x), rtol=1e-5, atol=1e-5)


def test_input_smaller_than_dilation():
    """A 2x3 input under a dilation-4 branch: that branch sees only the centre tap (the rest is padding)."""
    torch.manual_seed(1)
    co = _randomize(CoConv2d(3, 8, 3, splits=(4, 4), dilations=(1, 4)))
    x = torch.randn(1, 3, 2, 3)
    out = co(x)
    torch.testing.assert_close(out, reference_forward(reference_conv(co), x), rtol=1e-5, atol=1e-5)
    # dilation 4 > every offset inside a 2x3 map: only the centre weight contributes, a 1x1 conv
    centre = torch.nn.functional.conv2d(x, co.weight[4:, :, 1:2, 1:2])
    torch.testing.assert_close(out[:, 4:], centre, rtol=1e-5, atol=1e-5)


def test_branches_really_differ_from_plain_conv():
    """Guard for the reference: with level > 1 the output is not the one of a plain 3x3 conv."""
    torch.manual_seed(2)
    co = _randomize(CoConv2d(4, 8, 3, level=2))
    x = torch.randn(1, 4, 9, 9)
    plain = torch.nn.functional.conv2d(x, co.weight, padding=1)
    out = co(x)
    torch.testing.assert_close(out[:, :4], plain[:, :4], rtol=1e-5, atol=1e-5)  # d=1 branch is a plain conv
    assert not torch.allclose(out[:, 4:], plain[:, 4:], atol=1e-3)  # d=2 branch is not


@pytest.mark.parametrize(
    "channels, level, expected",
    [
        (64, 4, (16, 16, 16, 16)),  # layer1
        (128, 3, (64, 32, 32)),  # layer2
        (256, 2, (128, 128)),  # layer3
        (512, 1, (512,)),  # layer4: a plain conv
    ],
)
def test_paper_table1_splits(channels, level, expected):
    assert coconv_splits(channels, level) == expected
    co = CoConv2d(channels, channels, 3, level=level, device="meta")
    assert co.splits == list(expected)
    assert co.dilations == list(range(1, level + 1))


def test_split_rule_other_sizes():
    assert coconv_splits(8, 4) == (2, 2, 2, 2)
    assert coconv_splits(12, 3) == (6, 3, 3)
    assert coconv_splits(6, 2) == (3, 3)
    assert coconv_splits(7, 1) == (7,)


@pytest.mark.parametrize("level", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_and_params_identical_to_conv2d(level, bias):
    co = CoConv2d(32, 64, 3, stride=2, level=level, bias=bias)
    conv = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=bias)
    assert {k: v.shape for k, v in co.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}
    assert list(co.state_dict()) == list(conv.state_dict())
    assert sum(p.numel() for p in co.parameters()) == sum(p.numel() for p in conv.parameters())
    assert sum(p.numel() for p in co.parameters()) == 64 * 32 * 9 + (64 if bias else 0)
    # a plain conv's state dict loads strictly, and at level 1 gives the plain conv's output
    co.load_state_dict(conv.state_dict(), strict=True)
    assert torch.equal(co.weight, conv.weight)
    if level == 1:
        x = torch.randn(1, 32, 7, 7)
        torch.testing.assert_close(co(x), conv(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(splits=(8, 4)), r"splits \[8, 4\] must be positive and sum to out_channels=16"),
        (dict(splits=(16, 0)), r"must be positive"),
        (dict(splits=(20, -4)), r"must be positive"),
        (dict(level=0), r"level 0 has no split rule; use level 1-4 or pass splits"),
        (dict(level=5), r"level 5 has no split rule; use level 1-4 or pass splits"),
        (dict(level=-1), r"level -1 has no split rule"),
        (dict(level=2, dilations=(1, 2, 3)), r"one positive dilation per branch: 2 splits"),
        (dict(splits=(8, 8), dilations=(1,)), r"one positive dilation per branch"),
        (dict(level=2, dilations=(1, 0)), r"one positive dilation per branch"),
    ],
)
def test_bad_branch_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoConv2d(4, 16, 3, **kwargs)


@pytest.mark.parametrize(
    "out_channels, level, divisor",
    [(66, 4, 4), (18, 3, 4), (7, 2, 2)],
)
def test_non_divisible_channels_raise(out_channels, level, divisor):
    msg = rf"level {level} splits out_channels by {divisor}, but {out_channels} is not divisible.*pass splits="
    with pytest.raises(ValueError, match=msg):
        coconv_splits(out_channels, level)
    with pytest.raises(ValueError, match=msg):
        CoConv2d(4, out_channels, 3, level=level)
    # explicit splits are the documented way out
    assert CoConv2d(4, out_channels, 3, splits=(out_channels - 1, 1)).splits == [out_channels - 1, 1]


@pytest.mark.parametrize("kernel_size", [1, 2, 4, 3.0, (3, 3), "3", True])
def test_bad_kernel_raises(kernel_size):
    with pytest.raises(ValueError, match=r"odd square kernels of size >= 3"):
        CoConv2d(4, 8, kernel_size, level=2)


@pytest.mark.parametrize("level", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_from_conv_shares_parameters(level, bias):
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=bias)
    co = CoConv2d.from_conv(conv, level=level)
    assert type(co) is CoConv2d
    assert co.weight is conv.weight
    assert (co.bias is conv.bias) if bias else co.bias is None
    assert co.weight.device.type == "cpu"
    assert co.stride == (2, 2) and co.splits == list(coconv_splits(16, level))
    x = torch.randn(1, 8, 9, 7)
    torch.testing.assert_close(co(x), reference_forward(reference_conv(co), x), rtol=1e-5, atol=1e-5)
    # shared, not copied: an in-place update of the conv is seen by the CoConv
    with torch.no_grad():
        conv.weight.mul_(2)
    torch.testing.assert_close(co(x), reference_forward(reference_conv(co), x), rtol=1e-5, atol=1e-5)
    assert torch.equal(co.weight, conv.weight)


def test_from_conv_keeps_base_dilation():
    conv = nn.Conv2d(4, 8, 3, padding=2, dilation=2)
    co = CoConv2d.from_conv(conv, level=2)
    assert co.dilations == [2, 4]
    x = torch.randn(1, 4, 10, 10)
    torch.testing.assert_close(co(x), reference_forward(reference_conv(co), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 16, 3, padding=1, groups=2),  # grouped
        nn.Conv2d(8, 16, 3, padding=1, stride=(1, 2)),  # asymmetric stride
        nn.Conv2d(8, 16, (3, 5), padding=(1, 2)),  # non-square kernel
        nn.Conv2d(8, 16, 3, padding=0),  # not 'same'-padded
        nn.Conv2d(8, 16, 3, padding=1, dilation=(1, 2)),  # asymmetric dilation
        nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"),  # non-zero padding mode
        CoConv2d(8, 16, 3, level=2),  # already contextual
    ],
    ids=["grouped", "asym-stride", "non-square", "valid-pad", "asym-dilation", "reflect", "coconv"],
)
def test_from_conv_rejects(conv):
    with pytest.raises(ValueError, match=r"Only a plain, 'same'-padded, ungrouped square conv"):
        CoConv2d.from_conv(conv, level=2)


def test_from_conv_rejects_1x1():
    with pytest.raises(ValueError, match=r"odd square kernels of size >= 3"):
        CoConv2d.from_conv(nn.Conv2d(8, 16, 1), level=2)


@pytest.mark.parametrize("level", [2, 3, 4])
def test_gradient_reaches_every_weight_slice(level):
    torch.manual_seed(4)
    co = _randomize(CoConv2d(3, 16, 3, stride=2, level=level, bias=True))
    ref = reference_conv(co)
    x = torch.randn(2, 3, 9, 11)
    target = torch.randn(2, 16, 5, 6)
    ((co(x) - target) ** 2).sum().backward()
    ((reference_forward(ref, x) - target) ** 2).sum().backward()
    start = 0
    for split, conv in zip(co.splits, ref):
        grad = co.weight.grad[start : start + split]
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, conv.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(co.bias.grad[start : start + split], conv.bias.grad, rtol=1e-4, atol=1e-4)
        start += split


@pytest.mark.parametrize("level", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_torchscript_same_output(level, bias):
    torch.manual_seed(5)
    co = _randomize(CoConv2d(4, 12 if level == 3 else 8, 3, stride=2, level=level, bias=bias)).eval()
    scripted = torch.jit.script(co)
    x = torch.randn(1, 4, 9, 8)
    torch.testing.assert_close(scripted(x), co(x), rtol=0, atol=0)
    torch.testing.assert_close(scripted(x), reference_forward(reference_conv(co), x), rtol=1e-5, atol=1e-5)


def test_extra_repr_names_branches():
    r = repr(CoConv2d(8, 16, 3, stride=2, level=3))
    assert "splits=[8, 4, 4]" in r and "dilations=[1, 2, 3]" in r and "stride=(2, 2)" in r
