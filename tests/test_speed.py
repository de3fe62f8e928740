"""Issue 12's speed work changes no numbers: CoConv2d's forward against the one it replaced (kept here as the
reference), in layers, whole models and the shipped weights; and the ``compile`` option of the predictor."""

from typing import Dict, List

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_acsi
from timm_acsi.inference import ExpressionRecognizer
from timm_acsi.inference.torch_backend import TorchBackend
from timm_acsi.layers import CoConv2d
from timm_acsi.sources import LoadedModel

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_coconv_forward(self: CoConv2d, x: torch.Tensor) -> torch.Tensor:
    """CoConv2d.forward before issue 12: one conv per weight slice, concatenated."""
    if len(self.splits) == 1:
        return self._conv_forward(x, self.weight, self.bias)
    k = self.kernel_size[0]
    outs: List[torch.Tensor] = []
    start = 0
    for split, d in zip(self.splits, self.dilations):
        bias = self.bias
        if bias is not None:
            bias = bias[start : start + split]
        outs.append(F.conv2d(x, self.weight[start : start + split], bias, self.stride, d * (k // 2), d))
        start += split
    return torch.cat(outs, dim=1)


@pytest.fixture
def reference_forwards(monkeypatch):
    """Call it to swap CoConv2d's forward for the reference one."""
    return lambda: monkeypatch.setattr(CoConv2d, "forward", reference_coconv_forward)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 rounding: 1e-5 of the tensor's scale (different summation orders are allowed)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-3))


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm statistics of a sensible scale (conv and linear weights ~ 1/sqrt(fan-in)),
    so that no slice or channel can be mixed up unseen; timm's zero-init of each block's last batch-norm would
    hide the residual branches otherwise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if t.dim() > 1:
                t.copy_(noise * t[0].numel() ** -0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight"):  # batch-norm scale
                t.copy_(1 + 0.2 * noise)
            else:  # biases, running means
                t.copy_(0.2 * noise)
    return module


def _run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Output, input gradient, every parameter gradient and every buffer after one forward + backward."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    result = {"out": out.detach(), "x.grad": x.grad}
    result.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
    result.update({n: b.clone() for n, b in module.named_buffers()})
    return result


@pytest.mark.parametrize("level", [2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_coconv_equals_reference_forward_and_backward(level, bias):
    co = _randomize(CoConv2d(6, 16, 3, stride=2, level=level, bias=bias), seed=level)
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2, 6, 9, 11, generator=g), torch.randn(2, 16, 5, 6, generator=g)
    actual = _run(co, x, grad)
    co.forward = reference_coconv_forward.__get__(co)
    expected = _run(co, x, grad)
    for key in expected:
        _assert_close(actual[key], expected[key])


@pytest.mark.parametrize("name", ["coresnet18", "acsinet18"])
@pytest.mark.parametrize("training", [True, False])
def test_models_equal_reference_forwards(name, training, reference_forwards):
    """Whole models, train and eval mode: logits, input and parameter gradients, batch-norm statistics."""
    model = _randomize(timm.create_model(name, num_classes=7), seed=5).train(training)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2, 3, 48, 40, generator=g), torch.randn(2, 7, generator=g)
    actual = _run(model, x, grad)
    model.load_state_dict(state)
    reference_forwards()
    expected = _run(model, x, grad)
    for key in expected:
        _assert_close(actual[key], expected[key])


def test_shipped_weights_give_the_reference_logits(reference_forwards):
    """The shipped FER-2013 acsinet18 loads strictly (names and shapes unchanged) and predicts as before."""
    model = timm.create_model("acsinet18", pretrained=True).eval()
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        actual = model(x)
        reference_forwards()
        expected = model(x)
    _assert_close(actual, expected)


# ----------------------------------------------------------------------------------------- torch.compile


class _FakeCompile:
    """Stands in for torch.compile (a real compile takes minutes on a CPU): records what it was given and
    counts the forwards that go through the 'compiled' function."""

    def __init__(self) -> None:
        self.models: List[nn.Module] = []
        self.calls = 0

    def __call__(self, model: nn.Module, **kwargs):
        self.models.append(model)

        def forward(x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return model(x)

        return forward


def _loaded() -> LoadedModel:
    model = timm.create_model("acsinet18", num_classes=7).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = (3, 32, 32)
    return LoadedModel(model, "acsinet18", timm_acsi.FER7_LABELS, cfg, False, "acsinet18 (random init)")


def test_torch_backend_compile(monkeypatch):
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    loaded = _loaded()
    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    plain = TorchBackend(loaded)
    assert fake.models == []  # off by default
    compiled = TorchBackend(loaded, compile=True)
    assert fake.models == [loaded.model]
    np.testing.assert_array_equal(compiled(batch), plain(batch))
    assert fake.calls == 1
    logits, _, _ = compiled.attention(batch, "cam")  # attention maps need the plain model's hooks
    assert fake.calls == 1
    np.testing.assert_allclose(logits, plain(batch), rtol=1e-5, atol=1e-5)


def test_recognizer_compile_option(monkeypatch):
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    loaded = _loaded()
    rec = ExpressionRecognizer(loaded, detector="none", compile=True)
    assert fake.models == [loaded.model]
    face = np.full((40, 40, 3), 128, dtype=np.uint8)
    assert len(rec(face).faces) == 1 and fake.calls == 1

    class Backend:  # any object with the backend interface, e.g. onnxruntime's
        label_names, data_config, grayscale = loaded.label_names, loaded.data_config, False

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            return np.zeros((len(batch), 7), dtype=np.float32)

    with pytest.raises(ValueError, match=r"^compile=True compiles a torch model; Backend is already a backend\.$"):
        ExpressionRecognizer(Backend(), detector="none", compile=True)
    assert len(fake.models) == 1
