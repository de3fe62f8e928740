"""Parameter, FLOP and activation counts, CoConv parity checks and latency for CoResNet / ACSI-Net.

Counting convention (fvcore's, the one the paper's GFLOPs use): one multiply-add = one flop; convolution,
linear, batch-norm (eval: 2 flops per element with affine) and adaptive average pooling (1 per input
element) are counted; elementwise ops (add, mul, sigmoid, hardswish, mean) and max-pooling are not. With
``count_elementwise=True`` add/mul/sigmoid/hardswish cost one flop per output element and mean one per
input element, which makes the cost of coordinate attention visible.

fvcore traces with TorchScript, which PyTorch is retiring, so every count can be cross-checked (or, when
fvcore cannot be imported or cannot trace a model, replaced) by ``torch.utils.flop_counter.FlopCounterMode``
with a small mapping for batch-norm, pooling and the elementwise ops, halved to fvcore's convention.
fvcore is imported lazily, inside the functions that need it.
"""

import statistics
import time
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cache
from math import prod
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .layers import CoConv2d

__all__ = [
    "PAPER_FIGURES",
    "PAPER_NUM_CLASSES",
    "PAPER_INPUT_SIZE",
    "PAPER_TIME_BASELINE",
    "PROFILE_SPECS",
    "MODEL_GROUPS",
    "COUNTING_CONVENTION",
    "COUNTING_CONVENTION_ELEMENTWISE",
    "PaperFigure",
    "ProfileSpec",
    "ModelProfile",
    "LayerParity",
    "ModelParity",
    "Latency",
    "LatencySettings",
    "ProfileReport",
    "LATENCY_BASELINE",
    "profile_model",
    "reference_conv",
    "parity_report",
    "compare_profiles",
    "resolve_specs",
    "build_model",
    "measure_latency",
    "profile_models",
]

COUNTING_CONVENTION = (
    "1 multiply-add = 1 flop (fvcore). Counted: conv, linear, batch-norm (eval), adaptive avg pooling. "
    "Not counted: max-pooling, relu, and elementwise ops (add, mul, sigmoid, hardswish, mean)"
)
COUNTING_CONVENTION_ELEMENTWISE = (
    "1 multiply-add = 1 flop (fvcore). Counted: conv, linear, batch-norm (eval), adaptive avg pooling, and "
    "elementwise ops (add/mul/sigmoid/hardswish: 1 per output element; mean: 1 per input element). "
    "Not counted: max-pooling, relu"
)

#: Elementwise ops counted with ``count_elementwise``: one flop per output element ...
_ELEMENTWISE_OUTPUT_OPS = ("add", "add_", "mul", "mul_", "sigmoid", "sigmoid_", "hardswish", "hardswish_")
#: ... and one per input element.
_ELEMENTWISE_INPUT_OPS = ("mean",)

#: Dispatcher-level ops that cost nothing in fvcore's convention (views, copies, concat, relu...).
_TORCH_FREE_OPS = frozenset(
    "aten::" + op
    for op in (
        "view _unsafe_view reshape t transpose permute expand slice select squeeze unsqueeze as_strided alias "
        "cat split split_with_sizes chunk empty zeros ones clone contiguous detach copy_ _to_copy lift_fresh "
        "relu relu_ dropout flatten device"
    ).split()
)
_ACTIVATION_OPS = ("convolution", "mm", "addmm", "bmm")


@dataclass(frozen=True)
class PaperFigure:
    """A row of the ACSI-Net paper's Tables 3/4 (Li et al., Entropy 2022): params (M), GFLOPs, seconds per image."""

    label: str
    params_m: float
    gflops: float
    time_s: float
    source: str


#: The paper's reported figures, keyed by the paper's model name (docs/design.md maps them to our placements).
PAPER_FIGURES: Dict[str, PaperFigure] = {
    f.label: f
    for f in (
        PaperFigure("ResNet-18", 11.69, 1.82, 1.32, "Table 3"),
        PaperFigure("CoResNet-18", 11.69, 1.82, 1.32, "Tables 3, 4"),
        PaperFigure("CoResNet_CA-a", 11.72, 1.82, 1.33, "Table 4"),
        PaperFigure("CoResNet_CA-b", 11.75, 1.82, 1.35, "Table 4"),
        PaperFigure("ACSI-Net-18", 11.78, 1.82, 1.38, "Table 4"),
    )
}
#: The setting of the paper's figures: 1000-class head, one 224x224 image; times compare against ResNet-18.
PAPER_NUM_CLASSES = 1000
PAPER_INPUT_SIZE = (1, 3, 224, 224)
PAPER_TIME_BASELINE = "ResNet-18"


@dataclass(frozen=True, eq=False)
class ProfileSpec:
    """One row of the model table: a timm model name, its create_model kwargs, its paper row and its twin.

    ``reference`` names a plain model that must have exactly the same params and FLOPs (CoResNet vs ResNet).
    """

    name: str
    architecture: str
    model_args: Dict[str, Any] = field(default_factory=dict)
    paper: Optional[str] = None
    reference: Optional[str] = None


PROFILE_SPECS: Dict[str, ProfileSpec] = {
    s.name: s
    for s in (
        ProfileSpec("resnet18", "resnet18", paper="ResNet-18"),
        ProfileSpec("resnet34", "resnet34"),
        ProfileSpec("resnet50", "resnet50"),
        ProfileSpec("coresnet18", "coresnet18", paper="CoResNet-18", reference="resnet18"),
        ProfileSpec("coresnet34", "coresnet34", reference="resnet34"),
        ProfileSpec("coresnet50", "coresnet50", reference="resnet50"),
        ProfileSpec("acsinet18", "acsinet18", paper="ACSI-Net-18"),
        ProfileSpec("acsinet34", "acsinet34"),
        ProfileSpec("acsinet50", "acsinet50"),
        # CA placements of docs/design.md (the paper's CA-a / CA-b rows are matched by parameter count)
        ProfileSpec(
            "acsinet18:stage", "acsinet18", {"attn_placement": "stage", "final_attn": False}, paper="CoResNet_CA-a"
        ),
        ProfileSpec("acsinet18:stage+final", "acsinet18", {"attn_placement": "stage"}, paper="CoResNet_CA-b"),
        ProfileSpec("acsinet18:block", "acsinet18", {"final_attn": False}),
        ProfileSpec("acsinet18:final", "acsinet18", {"attn_placement": "none"}),
    )
}

#: Names ``resolve_specs`` expands: the 18-layer models and placements (default), or every spec.
MODEL_GROUPS: Dict[str, Tuple[str, ...]] = {
    "18": (
        "resnet18",
        "coresnet18",
        "acsinet18",
        "acsinet18:stage",
        "acsinet18:stage+final",
        "acsinet18:block",
        "acsinet18:final",
    ),
    "all": tuple(PROFILE_SPECS),
}


@dataclass
class ModelProfile:
    """Counts for one model at one input size (fvcore convention, see the module docstring).

    ``counter`` is ``'fvcore'`` or ``'torch'`` (FlopCounterMode fallback, explained in ``notice``);
    ``cross_check_flops`` is the FlopCounterMode total when fvcore counted and the cross-check ran;
    ``layer_parity`` the CoConv2d parity report when asked for (``parity=True``).
    """

    params: int
    flops: int
    activations: int
    unsupported_ops: Dict[str, int]
    counter: str
    input_size: Tuple[int, ...]
    count_elementwise: bool = False
    cross_check_flops: Optional[int] = None
    notice: Optional[str] = None
    layer_parity: Optional[List["LayerParity"]] = field(default=None, repr=False)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def counters_agree(self) -> Optional[bool]:
        """Whether FlopCounterMode reproduced fvcore's total (None when no cross-check ran)."""
        return None if self.cross_check_flops is None else self.cross_check_flops == self.flops


@dataclass
class LayerParity:
    """A CoConv2d layer against the ``nn.Conv2d`` it replaces, at the layer's input size in the real model."""

    name: str
    input_shape: Tuple[int, ...]
    stride: int
    splits: Tuple[int, ...]
    dilations: Tuple[int, ...]
    params: int
    reference_params: int
    flops: int
    reference_flops: int
    output_shape: Tuple[int, ...]
    reference_output_shape: Tuple[int, ...]

    @property
    def ok(self) -> bool:
        return (self.params, self.flops, self.output_shape) == (
            self.reference_params,
            self.reference_flops,
            self.reference_output_shape,
        )


@dataclass
class ModelParity:
    """A whole model against its plain twin (e.g. coresnet18 vs resnet18): params and flops must be equal."""

    name: str
    reference: str
    params: int
    reference_params: int
    flops: int
    reference_flops: int

    @property
    def ok(self) -> bool:
        return self.params == self.reference_params and self.flops == self.reference_flops


@dataclass
class Latency:
    """Forward latency of one model: median and minimum over rounds of the mean time per forward (ms)."""

    median_ms: float
    min_ms: float
    rounds: int
    iters: int
    compiled: bool = False  # timed as torch.compile made it


#: The model every latency is compared with, measured in the same run (timm's resnet18).
LATENCY_BASELINE = "resnet18"


@dataclass(frozen=True)
class LatencySettings:
    """How :func:`profile_models` times the models on each device (see :func:`measure_latency`)."""

    devices: Tuple[str, ...]
    channels_last: bool = False
    warmup: int = 3
    rounds: int = 7
    iters: int = 5
    compile: bool = False


@dataclass
class ProfileReport:
    """Everything one profiling run found: counts per model, parity checks and latencies, in table order."""

    specs: List[ProfileSpec]
    input_size: Tuple[int, ...]
    num_classes: int
    count_elementwise: bool
    profiles: Dict[str, ModelProfile]
    parity_checked: bool
    model_parity: List[ModelParity] = field(default_factory=list)
    latency: Optional[Dict[str, Dict[str, Latency]]] = None  # device -> model name -> latency
    latency_settings: Optional[LatencySettings] = None

    @property
    def layer_parity(self) -> Dict[str, List[LayerParity]]:
        """The CoConv2d parity of each model that has CoConv2d layers."""
        return {n: p.layer_parity for n, p in self.profiles.items() if p.layer_parity}

    @property
    def parity_passed(self) -> Optional[bool]:
        """Whether every CoConv2d layer and every CoResNet equals its twin (``None`` when not checked)."""
        if not self.parity_checked:
            return None
        layers = all(lp.ok for ls in self.layer_parity.values() for lp in ls)
        return layers and all(mp.ok for mp in self.model_parity)

    @property
    def cross_checked(self) -> List[str]:
        """The models fvcore counted, whose FLOPs FlopCounterMode checked."""
        return [n for n, p in self.profiles.items() if p.counter == "fvcore"]


def _import_fvcore():
    """``fvcore.nn``, hiding only the FutureWarning its focal_loss module raises at import on recent torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import fvcore.nn

    return fvcore.nn


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode while counting (fvcore counts training-mode batch-norm differently); restores every module."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _unwrap(model: nn.Module) -> nn.Module:
    """The original module of a ``torch.compile``d model (fvcore cannot trace the compiled wrapper)."""
    return getattr(model, "_orig_mod", model)


def _dummy_input(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), torch.empty(0))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    return torch.zeros(tuple(input_size), device=ref.device, dtype=dtype)


_FVCORE_ACTIVATIONS = "__activations__"  # counter key of activations inside the FLOP analysis


@dataclass
class _Counts:
    flops: int
    activations: int
    unsupported: Dict[str, int]
    counter: str
    flops_by_module: Optional[Dict[str, int]] = None  # fvcore only: in-place FLOPs of every submodule
    notice: Optional[str] = None


def _fvcore_counts(model: nn.Module, x: torch.Tensor, count_elementwise: bool) -> _Counts:
    """FLOPs, activations and FLOPs per module from one fvcore (TorchScript) trace.

    Activations are counted as fvcore's ActivationCountAnalysis does (output elements of conv, addmm, bmm,
    einsum, matmul, linear), by handles added to the FLOP analysis: one trace instead of two.
    """
    fvnn = _import_fvcore()
    from fvcore.nn import jit_handles as jh

    def with_activations(op: str, flop_handle: Callable) -> Callable:
        def handle(inputs: List[Any], outputs: List[Any]) -> Counter:
            flops = flop_handle(inputs, outputs)
            counts = flops if isinstance(flops, Counter) else Counter({op.split("::")[-1]: flops})
            return counts + Counter({_FVCORE_ACTIVATIONS: prod(jh.get_shape(outputs[0]))})

        return handle

    activation_ops = {
        "aten::_convolution": jh.conv_flop_jit,
        "aten::addmm": jh.addmm_flop_jit,
        "aten::bmm": jh.bmm_flop_jit,
        "aten::einsum": jh.einsum_flop_jit,
        "aten::matmul": jh.matmul_flop_jit,
        "aten::linear": jh.linear_flop_jit,
    }
    handles = {op: with_activations(op, h) for op, h in activation_ops.items()}
    if count_elementwise:
        handles.update({f"aten::{op}": jh.elementwise_flop_counter(0, 1) for op in _ELEMENTWISE_OUTPUT_OPS})
        handles.update({f"aten::{op}": jh.elementwise_flop_counter(1, 0) for op in _ELEMENTWISE_INPUT_OPS})
    analysis = fvnn.FlopCountAnalysis(model, x).set_op_handle(**handles)
    # unsupported ops are returned (and listed by the CLI) instead of logged
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = analysis.by_module_and_operator()
    flops_by_module = {
        name: int(sum(n for key, n in ops.items() if key != _FVCORE_ACTIVATIONS)) for name, ops in by_module.items()
    }
    return _Counts(
        flops=flops_by_module[""],
        activations=int(by_module[""].get(_FVCORE_ACTIVATIONS, 0)),
        unsupported=dict(analysis.unsupported_ops()),
        counter="fvcore",
        flops_by_module=flops_by_module,
    )


def _numel(shape: Optional[Sequence[int]]) -> int:
    return prod(shape) if shape is not None else 0


def _torch_flop_mapping(count_elementwise: bool, uncounted: Counter) -> Dict[Any, Callable[..., int]]:
    """FlopCounterMode formulas (in its 2-flops-per-multiply-add scale) reproducing fvcore's extra handles.

    ``uncounted`` collects the means that are not global pooling (fvcore lists them as unsupported) when
    ``count_elementwise`` is off. An explicit ``x.mean((2, 3))`` counts as pooling here but not in fvcore:
    the cross-check then reports the difference.
    """
    aten = torch.ops.aten

    def batch_norm(x, weight, bias, *args, training: bool = False, out_shape=None, **kwargs) -> int:
        if training:  # fvcore: 4 (5 with affine) flops per element in training mode
            return 2 * _numel(x) * (5 if weight is not None else 4)
        return 2 * _numel(x) * (2 if weight is not None else 1)

    def native_batch_norm(x, weight, bias, running_mean, running_var, training, *args, out_shape=None, **kw) -> int:
        return batch_norm(x, weight, bias, training=training)

    def adaptive_avg_pool(x, *args, out_shape=None, **kwargs) -> int:
        return 2 * _numel(x)

    def mean(x, dim=None, *args, out_shape=None, **kwargs) -> int:
        # adaptive_avg_pool2d to 1x1 reaches the dispatcher as mean over H and W: fvcore counts that pooling
        dims = {d % len(x) for d in dim} if dim else set()
        if count_elementwise or (len(x) == 4 and dims == {2, 3}):
            return 2 * _numel(x)
        uncounted["aten::mean"] += 1
        return 0

    def per_output(*args, out_shape=None, **kwargs) -> int:
        return 2 * _numel(out_shape)

    mapping: Dict[Any, Callable[..., int]] = {
        aten.native_batch_norm: native_batch_norm,
        aten._native_batch_norm_legit_no_training: batch_norm,
        aten.cudnn_batch_norm: native_batch_norm,
        aten._adaptive_avg_pool2d: adaptive_avg_pool,
        aten.mean: mean,
    }
    if count_elementwise:
        mapping.update({getattr(aten, op): per_output for op in _ELEMENTWISE_OUTPUT_OPS})
    return mapping


class _OpRecorder(TorchDispatchMode):
    """Counts dispatched ops (to list those without a formula) and conv/matmul output elements (activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.activations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[f"aten::{name}"] += 1
        if name in _ACTIVATION_OPS:
            self.activations += out.numel()
        return out


def _shapes_only() -> TorchDispatchMode:
    """Fake tensors: shapes propagate through the model without computing anything (real params allowed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _torch_counts(model: nn.Module, x: torch.Tensor, count_elementwise: bool) -> _Counts:
    """FLOPs, activations and unsupported ops by ``FlopCounterMode``: no TorchScript, fvcore's convention.

    Runs on fake tensors: only shapes matter, so nothing is computed.
    """
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    uncounted: Counter = Counter()
    mapping = _torch_flop_mapping(count_elementwise, uncounted)
    recorder = _OpRecorder()
    with torch.no_grad(), _shapes_only():
        x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter, recorder:
            model(x)
    twice = counter.get_total_flops()
    if twice % 2:
        raise RuntimeError(f"FlopCounterMode counted an odd number of flops ({twice}); a formula is not 2x scaled.")
    counted = {f"aten::{op.__name__}" for op in (*flop_registry, *mapping)}
    unsupported = {op: n for op, n in recorder.ops.items() if op not in counted and op not in _TORCH_FREE_OPS}
    unsupported.update(uncounted)
    return _Counts(twice // 2, recorder.activations, unsupported, "torch")


def _count(model: nn.Module, x: torch.Tensor, count_elementwise: bool = False, counter: str = "auto") -> _Counts:
    """Counts by fvcore, or by FlopCounterMode when fvcore cannot import or trace (with a notice) or when asked."""
    if counter not in ("auto", "fvcore", "torch"):
        raise ValueError(f"counter must be 'auto', 'fvcore' or 'torch', got {counter!r}.")
    if counter == "torch":
        return _torch_counts(model, x, count_elementwise)
    try:
        return _fvcore_counts(model, x, count_elementwise)
    except Exception as e:  # import or TorchScript trace failure: any of them means "use the fallback"
        if counter == "fvcore":
            raise
        counts = _torch_counts(model, x, count_elementwise)
        counts.notice = (
            f"fvcore could not count this model ({type(e).__name__}: {e}); counted with "
            "torch.utils.flop_counter.FlopCounterMode instead (same convention, no TorchScript)."
        )
        return counts


def reference_conv(layer: CoConv2d) -> nn.Conv2d:
    """The standard ``nn.Conv2d`` a CoConv2d replaces: same channels, kernel, stride, bias and base dilation."""
    return nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )


@cache
def _reference_flops(
    conv_args: Tuple[Any, ...], input_shape: Tuple[int, ...], count_elementwise: bool, counter: str
) -> int:
    """FLOPs of a plain ``nn.Conv2d(*conv_args)`` at ``input_shape`` by ``counter``, the one that counted the
    CoConv it is compared with (cached: many layers share a shape)."""
    return _count(nn.Conv2d(*conv_args).eval(), torch.zeros(input_shape), count_elementwise, counter).flops


def _coconv_shapes(model: nn.Module, x: torch.Tensor) -> Dict[str, Tuple[CoConv2d, Tuple[int, ...], Tuple[int, ...]]]:
    """``{name: (layer, input shape, output shape)}`` of every CoConv2d, from forward hooks on one (fake) forward."""
    shapes = {}

    def capture(name: str):
        def hook(module: nn.Module, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            shapes[name] = (module, tuple(args[0].shape), tuple(output.shape))

        return hook

    layers = {name: m for name, m in model.named_modules() if isinstance(m, CoConv2d)}
    handles = [m.register_forward_hook(capture(name)) for name, m in layers.items()]
    try:
        with torch.no_grad(), _shapes_only():
            model(torch.empty(x.shape, dtype=x.dtype, device=x.device))
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in layers if name not in shapes]
    if missing:
        raise RuntimeError(f"CoConv2d layers {missing} are not called in the forward pass: no input size to compare.")
    return shapes


def _layer_parity(
    name: str, layer: CoConv2d, in_shape, out_shape, flops: int, count_elementwise: bool, counter: str
) -> LayerParity:
    reference = reference_conv(layer)
    with torch.no_grad(), _shapes_only():
        ref_out_shape = tuple(reference(torch.empty(in_shape, dtype=layer.weight.dtype)).shape)
    conv_args = (
        reference.in_channels,
        reference.out_channels,
        reference.kernel_size,
        reference.stride,
        reference.padding,
        reference.dilation,
        reference.groups,
        reference.bias is not None,
    )
    return LayerParity(
        name=name,
        input_shape=in_shape,
        stride=layer.stride[0],
        splits=tuple(layer.splits),
        dilations=tuple(layer.dilations),
        params=sum(p.numel() for p in layer.parameters()),
        reference_params=sum(p.numel() for p in reference.parameters()),
        flops=flops,
        reference_flops=_reference_flops(conv_args, in_shape, count_elementwise, counter),
        output_shape=out_shape,
        reference_output_shape=ref_out_shape,
    )


def profile_model(
    model: nn.Module,
    input_size: Sequence[int] = (1, 3, 224, 224),
    count_elementwise: bool = False,
    cross_check: bool = True,
    counter: str = "auto",
    parity: bool = False,
) -> ModelProfile:
    """Params, FLOPs (fvcore convention), activations and unsupported ops of ``model`` at ``input_size``.

    Counts in eval mode (restoring each module's mode after) on the device of the model's parameters,
    with one fvcore trace; the cross-check and the parity shapes use fake tensors (no compute).
    A ``torch.compile``d model is profiled through ``model._orig_mod``.

    Args:
        model: The model.
        input_size: Full input shape, batch included (FLOPs scale with the batch size).
        count_elementwise: Also count add/mul/sigmoid/hardswish (per output element) and mean (per input element).
        cross_check: With fvcore, also count with FlopCounterMode (no TorchScript) into ``cross_check_flops``.
        counter: ``'auto'`` (fvcore, falling back to FlopCounterMode with a notice), ``'fvcore'`` or ``'torch'``.
        parity: Also compare every CoConv2d layer with its standard conv, into ``layer_parity``
            (see :func:`parity_report`).
    """
    model = _unwrap(model)
    params = sum(p.numel() for p in model.parameters())
    layer_parity = None
    with _eval_mode(model):
        x = _dummy_input(model, input_size)
        shapes = _coconv_shapes(model, x) if parity else {}
        counts = _count(model, x, count_elementwise, counter)
        check = None
        if cross_check:
            check = counts.flops if counts.counter == "torch" else _torch_counts(model, x, count_elementwise).flops
        if parity:
            layer_parity = []
            for name, (layer, in_shape, out_shape) in shapes.items():
                if counts.flops_by_module is not None:  # counted in place, inside the model
                    flops = counts.flops_by_module[name]
                else:
                    flops = _torch_counts(layer, x.new_zeros(in_shape), count_elementwise).flops
                layer_parity.append(
                    _layer_parity(name, layer, in_shape, out_shape, flops, count_elementwise, counts.counter)
                )
    return ModelProfile(
        params=params,
        flops=counts.flops,
        activations=counts.activations,
        unsupported_ops=dict(sorted(counts.unsupported.items())),
        counter=counts.counter,
        input_size=tuple(input_size),
        count_elementwise=count_elementwise,
        cross_check_flops=check,
        notice=counts.notice,
        layer_parity=layer_parity,
    )


def parity_report(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> List[LayerParity]:
    """Compare every CoConv2d of ``model`` with the ``nn.Conv2d`` it replaces: params, FLOPs and output shape.

    Each layer's input and output shapes are captured with forward hooks during one forward of the whole
    model at ``input_size``; the layer's FLOPs are counted in place in the model (fvcore, per module), the
    reference conv's alone at the captured input size. A model without CoConv2d layers gives an empty list.
    """
    return profile_model(model, input_size, cross_check=False, parity=True).layer_parity


def compare_profiles(name: str, profile: ModelProfile, reference: str, reference_profile: ModelProfile) -> ModelParity:
    """Whole-model parity of two profiles taken at the same input size."""
    if profile.input_size != reference_profile.input_size:
        raise ValueError(
            f"{name} was profiled at {profile.input_size} but {reference} at {reference_profile.input_size}; "
            "profile both at the same input size."
        )
    return ModelParity(
        name, reference, profile.params, reference_profile.params, profile.flops, reference_profile.flops
    )


def resolve_specs(names: Sequence[str]) -> List[ProfileSpec]:
    """Expand group names (``18``, ``all``), table names and any other timm model name into specs, in order.

    The plain twin (``reference``) of each selected model is added too, so whole-model parity can be checked.
    """
    import timm

    from . import models  # noqa: F401  (registers coresnet/acsinet with timm)

    selected: Dict[str, ProfileSpec] = {}
    for name in names:
        for n in MODEL_GROUPS.get(name, (name,)):
            if n in PROFILE_SPECS:
                selected[n] = PROFILE_SPECS[n]
            elif timm.is_model(n):
                selected[n] = ProfileSpec(n, n)
            else:
                raise ValueError(
                    f"Unknown model {n!r}: use a group ({', '.join(MODEL_GROUPS)}), one of "
                    f"{', '.join(PROFILE_SPECS)}, or any timm model name."
                )
    for spec in list(selected.values()):
        if spec.reference and spec.reference not in selected:
            selected[spec.reference] = PROFILE_SPECS[spec.reference]
    order = {n: i for i, n in enumerate(PROFILE_SPECS)}
    return sorted(selected.values(), key=lambda s: order.get(s.name, len(order)))


def build_model(spec: ProfileSpec, num_classes: int = 1000) -> nn.Module:
    """A randomly initialised model for ``spec`` (no weights are downloaded)."""
    import timm

    from . import models  # noqa: F401  (registers coresnet/acsinet with timm)

    return timm.create_model(spec.architecture, pretrained=False, num_classes=num_classes, **spec.model_args)


#: Compiled graphs dynamo may keep per code object while compiled models are timed: every model (on every
#: device) is one more graph of the same ``ResNet.forward``, past dynamo's default of 8 (then it runs eager).
_COMPILED_GRAPHS_LIMIT = 1024


def measure_latency(
    models: Dict[str, nn.Module],
    input_size: Sequence[int] = (1, 3, 224, 224),
    device: str = "cpu",
    channels_last: bool = False,
    warmup: int = 3,
    rounds: int = 7,
    iters: int = 5,
    compile: bool = False,
) -> Dict[str, Latency]:
    """Forward latency of each model, interleaved so that every model sees the same machine load.

    Each round times ``iters`` forwards of every model in turn (the starting model rotates between rounds);
    the result per model is the median over rounds. Models are moved to ``device`` and put in eval mode.
    With ``compile`` each model is timed as ``torch.compile`` makes it (inductor: needs a C compiler on CPU);
    one more warm-up forward per model, the first, compiles it: compilation is never timed.
    """
    device_ = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(tuple(input_size), device=device_).contiguous(memory_format=memory_format)
    for m in models.values():
        m.to(device_, memory_format=memory_format).eval()
    runners = {n: torch.compile(m) if compile else m for n, m in models.items()}
    warmup += int(compile)  # the first forward of a compiled model compiles it

    def sync() -> None:
        if device_.type == "cuda":
            torch.cuda.synchronize(device_)

    names = list(models)
    times: Dict[str, List[float]] = {n: [] for n in names}
    any_compiled = compile or any(_unwrap(m) is not m for m in models.values())  # or compiled by the caller
    with torch.inference_mode(), _compiled_graphs_limit(any_compiled):
        for name in names:
            for _ in range(warmup):
                runners[name](x)
        sync()
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                sync()
                start = time.perf_counter()
                for _ in range(iters):
                    runners[name](x)
                sync()
                times[name].append((time.perf_counter() - start) * 1e3 / iters)
    return {n: Latency(statistics.median(t), min(t), rounds, iters, compile) for n, t in times.items()}


def _compiled_graphs_limit(compile: bool) -> ContextManager[Any]:
    """Room for one compiled graph per model while compiled models are timed (nothing when none is)."""
    if not compile:
        return nullcontext()
    from torch._dynamo import config

    limit = _COMPILED_GRAPHS_LIMIT
    return config.patch(recompile_limit=limit, accumulated_recompile_limit=limit)


def profile_models(
    specs: Sequence[ProfileSpec],
    input_size: Sequence[int] = PAPER_INPUT_SIZE,
    num_classes: int = PAPER_NUM_CLASSES,
    count_elementwise: bool = False,
    parity: bool = True,
    latency: Optional[LatencySettings] = None,
) -> ProfileReport:
    """Build and profile every model of ``specs`` (randomly initialised, no download), check the parity of each
    CoConv2d layer and of each model with a plain twin (``parity``), and time them all (``latency``: timm's
    resnet18 is added as the baseline, CPU is timed first)."""
    specs = list(specs)
    if latency is not None and LATENCY_BASELINE not in {s.name for s in specs}:
        specs.insert(0, PROFILE_SPECS[LATENCY_BASELINE])
    models = {s.name: build_model(s, num_classes) for s in specs}
    profiles = {n: profile_model(m, input_size, count_elementwise, parity=parity) for n, m in models.items()}
    model_parity = [
        compare_profiles(s.name, profiles[s.name], s.reference, profiles[s.reference])
        for s in specs
        if parity and s.reference
    ]
    report = ProfileReport(specs, tuple(input_size), num_classes, count_elementwise, profiles, parity, model_parity)
    if latency is not None:
        devices = sorted(latency.devices, key=lambda d: torch.device(d).type != "cpu")  # models move to each in turn
        times = dict(warmup=latency.warmup, rounds=latency.rounds, iters=latency.iters, compile=latency.compile)
        report.latency = {d: measure_latency(models, input_size, d, latency.channels_last, **times) for d in devices}
        report.latency_settings = latency
    return report
