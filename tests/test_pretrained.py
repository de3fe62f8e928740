"""Offline pretrained loading: timm ResNet checkpoints into CoResNet / ACSI-Net, FER tags, errors.

Every checkpoint here is written by the test (random weights) and loaded through timm's own path,
``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``: nothing touches the network.
"""

from pathlib import Path
from typing import Dict

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg
from torch import nn

import timm_acsi  # noqa: F401  (registers the models)
from timm_acsi import FER7_LABELS, CoConv2d
from timm_acsi.models.coresnet import FER2013_SHIPPED

MODEL_NAMES = timm.list_models(["coresnet*", "acsinet*"])
FER_TAGS = [f"{n}.{t}" for n in MODEL_NAMES for t in ("rafdb", "affectnet7")]
IN1K_TAGS = [f"{n}.{t}" for n in MODEL_NAMES for t in ("tv_in1k", "a1_in1k")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and no zero-init residual branches, so that outputs depend on every weight."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory) -> Path:
    """timm's resnet18 (random init, 1000 classes) saved as safetensors."""
    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model("resnet18", num_classes=1000))
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def resnet18_sd(resnet18_ckpt) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(resnet18_ckpt))


def _load(name: str, path: Path, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def _load_in1k(name: str, path: Path, **kwargs) -> nn.Module:
    """Load an ImageNet (1000-class) checkpoint through the model's ``tv_in1k`` tag, as users must."""
    return _load(f"{name}.tv_in1k", path, **kwargs)


def _is_attn_key(key: str) -> bool:
    return ".se." in key or ".final_attn." in key


def test_resnet18_loads_strictly_into_coresnet18(resnet18_ckpt, resnet18_sd):
    model = _load_in1k("coresnet18", resnet18_ckpt)
    sd = model.state_dict()
    assert set(sd) == set(resnet18_sd)
    for k, v in resnet18_sd.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    assert sum(isinstance(m, CoConv2d) for m in model.modules()) == 12


@pytest.mark.parametrize("tag", ["tv_in1k", "a1_in1k"])
def test_resnet18_loads_into_acsinet18_except_attention(tag, resnet18_ckpt, resnet18_sd):
    torch.manual_seed(0)
    model = _load(f"acsinet18.{tag}", resnet18_ckpt)
    assert model.num_classes == 1000 and model.pretrained_cfg["tag"] == tag
    sd = model.state_dict()
    fresh = set(sd) - set(resnet18_sd)
    assert not set(resnet18_sd) - set(sd)
    assert fresh and all(_is_attn_key(k) for k in fresh)
    assert len(fresh) == 9 * 8  # 8 block CAs + the final one, 8 tensors each
    assert {k for k in sd if _is_attn_key(k)} == fresh
    for k, v in resnet18_sd.items():
        assert torch.equal(sd[k], v), k
    # the attention keeps a real (not empty / zero) initialisation
    for k in fresh:
        if k.endswith("conv1.weight") or k.endswith("conv_h.weight"):
            assert torch.isfinite(sd[k]).all() and sd[k].std() > 0, k


def test_resnet18_loads_into_stage_attention_variant(resnet18_ckpt, resnet18_sd):
    model = _load_in1k("acsinet18", resnet18_ckpt, attn_placement="stage", final_attn=False)
    fresh = set(model.state_dict()) - set(resnet18_sd)
    assert len(fresh) == 4 * 8 and all(".attn." in k for k in fresh)


def test_seven_class_head_reinitialised(resnet18_ckpt, resnet18_sd):
    torch.manual_seed(0)
    model = _load_in1k("acsinet18", resnet18_ckpt, num_classes=7)
    sd = model.state_dict()
    assert sd["fc.weight"].shape == (7, 512) and sd["fc.bias"].shape == (7,)
    assert sd["fc.weight"].std() > 0
    loaded = [k for k in resnet18_sd if not k.startswith("fc.")]
    for k in loaded:
        assert torch.equal(sd[k], resnet18_sd[k]), k
    assert set(sd) - set(loaded) == {k for k in sd if _is_attn_key(k)} | {"fc.weight", "fc.bias"}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_in1k_checkpoint_into_fer_default_fails_loudly(resnet18_ckpt):
    """The default (FER-7) config with a 1000-class file is a size mismatch, never a silently dropped head."""
    with pytest.raises(RuntimeError, match=r"size mismatch for fc\.weight"):
        _load("acsinet18", resnet18_ckpt)


def test_fer_checkpoint_roundtrip_into_fer_tag(tmp_path):
    """A 7-class ACSI-Net checkpoint (what training writes) loads into the FER tag strictly, attention included."""
    torch.manual_seed(0)
    src = _randomize_bn(timm.create_model("acsinet18", num_classes=7)).eval()
    path = tmp_path / "acsinet18_rafdb.safetensors"
    save_file(src.state_dict(), str(path))
    model = _load("acsinet18.rafdb", path)
    assert model.num_classes == 7 and model.pretrained_cfg["label_names"] == FER7_LABELS
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)


def test_wrong_architecture_checkpoint_fails(tmp_path):
    with torch.device("meta"):
        resnet50 = timm.create_model("resnet50", device="meta")
    path = tmp_path / "resnet50.safetensors"
    save_file({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in resnet50.state_dict().items()}, str(path))
    with pytest.raises(RuntimeError, match=r"(?s)Error\(s\) in loading state_dict for CoResNet.*Unexpected key") as e:
        _load("coresnet18", path)
    assert "size mismatch for layer1.0.conv1.weight" in str(e.value)
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict"):
        _load("acsinet18", path)


@pytest.mark.parametrize("tag", FER_TAGS)
def test_fer_tag_without_weights_raises(tag):
    name = tag.split(".")[0]
    with pytest.raises(RuntimeError, match=rf"No weights are published for {tag.replace('.', '[.]')} yet") as e:
        timm.create_model(tag, pretrained=True)
    msg = str(e.value)
    # the error names the ways out: tags that have weights, hf-hub:, a local file
    assert f"{name}.tv_in1k" in msg and f"{name}.a1_in1k" in msg
    assert "pretrained=False" in msg and "hf-hub:" in msg and "pretrained_cfg_overlay=dict(file=" in msg


@pytest.mark.parametrize("tag", FER_TAGS)
def test_fer_tag_cfg(tag):
    cfg = get_pretrained_cfg(tag)
    assert cfg.label_names == FER7_LABELS
    assert cfg.num_classes == 7
    assert cfg.crop_pct == 0.875
    assert cfg.input_size == (3, 224, 224)
    assert cfg.has_weights is None or not cfg.has_weights
    assert cfg.first_conv == "conv1" and cfg.classifier == "fc"
    with torch.device("meta"):
        model = timm.create_model(tag, device="meta")
    assert model.num_classes == 7 and model.fc.out_features == 7
    assert tuple(model.pretrained_cfg["label_names"]) == FER7_LABELS
    # timm's data config for the tag: 224 centre crop of a 256 resize, as the paper evaluates
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg["input_size"] == (3, 224, 224) and data_cfg["crop_pct"] == 0.875
    assert round(224 / data_cfg["crop_pct"]) == 256


@pytest.mark.parametrize("tag", IN1K_TAGS)
def test_in1k_tags_point_at_timm_resnet_weights(tag):
    name, pretrained_tag = tag.split(".")
    resnet = f"resnet{name[-2:]}.{pretrained_tag}"
    cfg = get_pretrained_cfg(tag)
    ref = get_pretrained_cfg(resnet)
    assert cfg.hf_hub_id == f"timm/{resnet}"
    assert cfg.has_weights
    assert cfg.num_classes == 1000 and cfg.label_names is None
    for field in ("input_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier"):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.architecture == name and cfg.tag == pretrained_tag


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_tag(name):
    with torch.device("meta"):
        model = timm.create_model(name, device="meta")
    assert model.pretrained_cfg["tag"] == ("fer2013" if name in FER2013_SHIPPED else "rafdb")
    assert model.num_classes == 7 and tuple(model.pretrained_cfg["label_names"]) == FER7_LABELS


def test_plain_levels_equal_resnet18_outputs(resnet18_ckpt):
    """With every CoConv level 1 and no attention, the loaded model is exactly timm's resnet18."""
    resnet = _load("resnet18", resnet18_ckpt)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = resnet(x)
        for name, kwargs in [
            ("coresnet18", dict(coconv_levels=(1, 1, 1, 1))),
            ("acsinet18", dict(coconv_levels=(1, 1, 1, 1), attn_placement="none", final_attn=False)),
        ]:
            model = _load_in1k(name, resnet18_ckpt, **kwargs)
            assert not any(isinstance(m, CoConv2d) for m in model.modules())
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        # guard: the default CoResNet-18 with the same weights is a different function
        assert not torch.allclose(_load_in1k("coresnet18", resnet18_ckpt)(x), expected, atol=1e-3)


class _Branches(nn.Module):
    """Reference CoConv: separate dilated nn.Conv2d branches holding slices of a plain conv's weight."""

    def __init__(self, conv: nn.Conv2d, level: int) -> None:
        super().__init__()
        splits = {2: (2, 2), 3: (2, 4, 4), 4: (4, 4, 4, 4)}[level]
        out = conv.out_channels
        sizes = [out // s for s in splits]
        self.convs = nn.ModuleList()
        start = 0
        for d, size in enumerate(sizes, start=1):
            branch = nn.Conv2d(conv.in_channels, size, 3, stride=conv.stride, padding=d, dilation=d, bias=False)
            branch.weight.data.copy_(conv.weight.data[start : start + size])
            self.convs.append(branch)
            start += size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([c(x) for c in self.convs], dim=1)


def test_coresnet18_equals_resnet18_with_reference_branches(resnet18_ckpt):
    """End to end: CoResNet-18 with ResNet-18 weights = ResNet-18 whose 3x3 convs in stages 1-3 are replaced by
    separate dilated convs (levels 4/3/2, the paper's splits) holding the same weights."""
    resnet = _load("resnet18", resnet18_ckpt)
    for stage, level in ((resnet.layer1, 4), (resnet.layer2, 3), (resnet.layer3, 2)):
        for blk in stage:
            blk.conv1 = _Branches(blk.conv1, level)
            blk.conv2 = _Branches(blk.conv2, level)
    model = _load_in1k("coresnet18", resnet18_ckpt)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), resnet(x), rtol=1e-4, atol=1e-5)
