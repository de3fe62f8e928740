"""CoResNet / ACSI-Net: exact structure and parameter counts, and timm's per-model contract for every name and tag.

The contract part mirrors timm's own ``tests/test_models.py`` (forward + grad checkpointing, backward, default
cfgs on the meta device, torchscript, features_only, forward_intermediates / pruning, torch.fx) at small input
sizes, so that this file runs in a few minutes on a CPU.
"""

import fnmatch
import functools
from typing import Dict, List, Tuple

import pytest
import timm
import torch
from timm.layers.coord_attn import CoordAttn
from timm.models._manipulate import group_parameters
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import timm_acsi  # noqa: F401  (registers the models)
from timm_acsi import AcsiCoordAttn, CoConv2d, CoResNet

MODEL_NAMES = timm.list_models(["coresnet*", "acsinet*"])
# every tag, published weights or not (timm's cfg test uses include_tags=True too)
MODEL_TAGS = timm.list_models(["coresnet*", "acsinet*"], include_tags=True)

# exact parameter counts (measured; each one also re-derived below from timm's ResNet + the CA modules)
PARAMS_1000 = {
    "coresnet18": 11_689_512,
    "coresnet34": 21_797_672,
    "coresnet50": 25_557_032,
    "acsinet18": 11_784_936,
    "acsinet34": 21_950_072,
    "acsinet50": 27_837_528,
}
PARAMS_7 = {
    "coresnet18": 11_180_103,
    "coresnet34": 21_288_263,
    "coresnet50": 23_522_375,
    "acsinet18": 11_275_527,
    "acsinet34": 21_440_663,
    "acsinet50": 25_802_871,
}
RESNET_OF = {"18": "resnet18", "34": "resnet34", "50": "resnet50"}
LAYERS = {"18": (2, 2, 2, 2), "34": (3, 4, 6, 3), "50": (3, 4, 6, 3)}
STAGE_CHS = {"18": (64, 128, 256, 512), "34": (64, 128, 256, 512), "50": (256, 512, 1024, 2048)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _depth(name: str) -> str:
    return name.split(".")[0][-2:]


def _input(name: str, batch_size: int = 1, size: int = 0) -> torch.Tensor:
    """Small inputs: 64x64 for the 18-layer models, 32x32 for the heavier 34/50-layer ones."""
    size = size or (64 if _depth(name) == "18" else 32)
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(name: str, **kwargs) -> CoResNet:
    """Build on the meta device (no memory, no init cost): enough for structure and parameter counts.

    An untagged name gets the paper's 1000-class head unless ``num_classes`` is given (the registry's default
    tag is the 7-class FER config); a tagged name keeps its tag's config.
    """
    if "." not in name:
        kwargs.setdefault("num_classes", 1000)
    with torch.device("meta"):
        return timm.create_model(name, device="meta", **kwargs)


@functools.cache
def _cached(name: str) -> CoResNet:
    """One randomly initialised eval model per name, the source of weights for :func:`_build`. Never modified."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).eval()
    with torch.no_grad():  # non-trivial BN statistics and no zero-init residual branches, so outputs mean something
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def _build(name: str, **kwargs) -> CoResNet:
    """``timm.create_model(name, **kwargs)`` holding a copy of :func:`_cached`'s weights, in eval mode.

    Built on the meta device and filled from the cache, which skips weight init (most of the creation time on
    a CPU). Tensors whose shape the kwargs change (a resized head, another ``in_chans``) are freshly initialised.
    """
    model = _meta(name, **kwargs).to_empty(device="cpu")
    own = model.state_dict()
    src = {k: v for k, v in _cached(name).state_dict().items() if k in own and own[k].shape == v.shape}
    missing, _ = model.load_state_dict(src, strict=False)
    for module_name in {k.rsplit(".", 1)[0] for k in missing}:
        model.get_submodule(module_name).reset_parameters()
    return model.eval()


def _ca_params(channels: int) -> int:
    """Parameters of one ACSI-Net coordinate-attention module, from the paper's module definition:
    1x1 conv C->m (no bias), BN(m) (weight + bias), two 1x1 convs m->C (no bias), m = max(8, C // 32)."""
    m = max(8, channels // 32)
    return channels * m + 2 * m + 2 * m * channels


# ---------------------------------------------------------------------------------------------------------------
# exact parameter counts and structure
# ---------------------------------------------------------------------------------------------------------------


def test_names_and_tags_registered():
    assert MODEL_NAMES == ["acsinet18", "acsinet34", "acsinet50", "coresnet18", "coresnet34", "coresnet50"]
    tags = [f"{n}.{t}" for n in MODEL_NAMES for t in ("rafdb", "affectnet7", "tv_in1k", "a1_in1k")]
    assert MODEL_TAGS == sorted(tags + ["acsinet18.fer2013", "coresnet18.fer2013"])  # the FER-2013 weights that ship
    # tags with weights: the shipped FER-2013 ones and the ImageNet initialisations timm downloads
    with_weights = [f"{n}.{t}" for n in MODEL_NAMES for t in ("a1_in1k", "tv_in1k")]
    assert timm.list_pretrained(["coresnet*", "acsinet*"]) == sorted(
        with_weights + ["acsinet18.fer2013", "coresnet18.fer2013"]
    )


def test_resnet18_reference_counts():
    assert _n_params(_meta("resnet18")) == 11_689_512
    assert _n_params(_meta("resnet50")) == 25_557_032


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_counts_exact(name):
    assert _n_params(_meta(name)) == PARAMS_1000[name]
    assert _n_params(_meta(name, num_classes=7)) == PARAMS_7[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_counts_derived_independently(name):
    """CoResNet = ResNet exactly; ACSI-Net = ResNet + one CA per block (on its output channels) + one final CA."""
    depth = _depth(name)
    resnet = _n_params(_meta(RESNET_OF[depth]))
    extra = 0
    if name.startswith("acsinet"):
        extra = sum(n * _ca_params(c) for n, c in zip(LAYERS[depth], STAGE_CHS[depth])) + _ca_params(
            STAGE_CHS[depth][-1]
        )
    assert PARAMS_1000[name] == resnet + extra
    head_diff = (1000 - 7) * (STAGE_CHS[depth][-1] + 1)
    assert PARAMS_7[name] == PARAMS_1000[name] - head_diff


def test_ca_param_formula_matches_module():
    for c in (64, 128, 256, 512, 1024, 2048):
        assert _n_params(AcsiCoordAttn(c, device="meta")) == _ca_params(c)
    assert _ca_params(64) == 1552 and _ca_params(512) == 24608


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(attn_placement="stage", final_attn=False), 11_724_920),  # CoResNet_CA-a
        (dict(attn_placement="stage", final_attn=True), 11_749_528),  # CoResNet_CA-b
        (dict(attn_placement="block", final_attn=True), 11_784_936),  # ACSI-Net (default)
        (dict(attn_placement="block", final_attn=False), 11_760_328),
        (dict(attn_placement="none", final_attn=True), 11_714_120),
        (dict(attn_placement="none", final_attn=False), 11_689_512),
    ],
    ids=["stage", "stage+final", "block+final", "block", "final", "none"],
)
def test_paper_ca_placement_table(kwargs, expected):
    model = _meta("acsinet18", **kwargs)
    assert _n_params(model) == expected
    n_ca = sum(isinstance(m, CoordAttn) for m in model.modules())
    expected_ca = {"stage": 4, "block": 8, "none": 0}[kwargs["attn_placement"]] + int(kwargs["final_attn"])
    assert n_ca == expected_ca
    # the same placement built from coresnet18 gives the same model
    assert _n_params(_meta("coresnet18", **kwargs)) == expected


def test_attention_module_names_and_places():
    model = _meta("acsinet18")
    for stage, c in zip((model.layer1, model.layer2, model.layer3, model.layer4), (64, 128, 256, 512)):
        assert not hasattr(stage, "attn")
        blocks = [b for b in stage if isinstance(b, BasicBlock)]
        assert len(blocks) == 2
        for blk in blocks:
            assert type(blk.se) is AcsiCoordAttn
            assert blk.se.conv1.in_channels == c and blk.se.conv1.out_channels == max(8, c // 32)
    assert type(model.layer4.final_attn) is AcsiCoordAttn and list(model.layer4)[-1] is model.layer4.final_attn

    staged = _meta("acsinet18", attn_placement="stage", final_attn=False)
    for stage, c in zip((staged.layer1, staged.layer2, staged.layer3, staged.layer4), (64, 128, 256, 512)):
        assert list(stage)[-1] is stage.attn and stage.attn.conv_h.out_channels == c
        assert all(blk.se is None for blk in list(stage)[:-1])
    assert not hasattr(staged.layer4, "final_attn")

    bottleneck = _meta("acsinet50")
    assert [blk.se.conv_h.out_channels for blk in bottleneck.layer1] == [256] * 3
    assert bottleneck.layer4.final_attn.conv_h.out_channels == 2048


def test_block_attention_runs_after_the_last_norm_and_before_the_residual_add():
    """The paper's placement, which rests on timm's BasicBlock.forward: se(bn2(...)) + shortcut, then the act."""
    torch.manual_seed(0)
    model = timm.create_model("acsinet18", num_classes=7).eval()
    blk, seen = model.layer2[0], {}
    with torch.no_grad():
        blk.bn2.weight.fill_(1.0)  # zero_init_last would make the residual branch (and what se sees) zero
    # clones: the block adds the shortcut and applies its ReLU in place
    blk.bn2.register_forward_hook(lambda m, i, o: seen.update(bn2=o.clone()))
    blk.se.register_forward_hook(lambda m, i, o: seen.update(se_in=i[0].clone(), se_out=o.clone()))
    blk.register_forward_hook(lambda m, i, o: seen.update(block_in=i[0].clone(), block_out=o.clone()))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        shortcut = blk.downsample(seen["block_in"])
    assert torch.equal(seen["se_in"], seen["bn2"]) and not torch.equal(seen["se_out"], seen["se_in"])
    torch.testing.assert_close(seen["block_out"], blk.act2(seen["se_out"] + shortcut))


def test_final_attn_is_last_before_pooling():
    """The final CA mask multiplies the final feature map: forward_features ends with it, the head pools it."""
    model = _cached("acsinet18")
    seen = {}
    handle = model.layer4.final_attn.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    try:
        x = _input("acsinet18")
        with torch.no_grad():
            feats = model.forward_features(x)
            logits = model(x)
    finally:
        handle.remove()
    assert torch.equal(feats, seen["out"])
    assert not torch.allclose(seen["inp"], seen["out"])  # the attention does something
    torch.testing.assert_close(logits, model.fc(feats.mean((2, 3))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_coconv_modules_per_stage(name):
    """Levels 4/3/2/1 in stages 1-4 (level 1 = the plain conv stays); both convs of a BasicBlock, conv2 of a
    Bottleneck; the paper's splits."""
    model = _meta(name)
    depth = _depth(name)
    convs_per_block = ("conv2",) if depth == "50" else ("conv1", "conv2")
    expected_splits = {
        "18": ([16] * 4, [64, 32, 32], [128, 128]),
        "34": ([16] * 4, [64, 32, 32], [128, 128]),
        "50": ([16] * 4, [64, 32, 32], [128, 128]),  # Bottleneck planes are 64/128/256/512 too
    }[depth]
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    for i, (stage, level, n_blocks) in enumerate(zip(stages, (4, 3, 2, 1), LAYERS[depth])):
        blocks = [b for b in stage if isinstance(b, (BasicBlock, Bottleneck))]
        assert len(blocks) == n_blocks
        cos = [m for m in stage.modules() if isinstance(m, CoConv2d)]
        assert len(cos) == (n_blocks * len(convs_per_block) if level > 1 else 0)
        for blk in blocks:
            for conv_name in ("conv1", "conv2", "conv3"):
                conv = getattr(blk, conv_name, None)
                if conv is None:
                    continue
                if conv_name in convs_per_block and level > 1:
                    assert type(conv) is CoConv2d
                    assert conv.dilations == list(range(1, level + 1))
                    assert conv.splits == expected_splits[i]
                else:
                    assert type(conv) is nn.Conv2d
    n_expected = sum(n * len(convs_per_block) for n in LAYERS[depth][:3])
    assert sum(isinstance(m, CoConv2d) for m in model.modules()) == n_expected
    assert n_expected == {"18": 12, "34": 26, "50": 13}[depth]


def test_stride_on_conv1_of_first_block():
    model = _meta("coresnet18")
    assert model.layer2[0].conv1.stride == (2, 2) and type(model.layer2[0].conv1) is CoConv2d
    assert model.layer2[0].conv2.stride == (1, 1)
    bottleneck = _meta("coresnet50")
    assert bottleneck.layer2[0].conv2.stride == (2, 2) and type(bottleneck.layer2[0].conv2) is CoConv2d


@pytest.mark.parametrize(
    "convs", [("conv1",), ("conv2",), ("conv1", "conv2")], ids=["conv1-only", "conv2-only", "both"]
)
def test_contextual_convs_basicblock(convs):
    model = _meta("coresnet18", contextual_convs=convs)
    assert _n_params(model) == 11_689_512
    for stage, level in zip((model.layer1, model.layer2, model.layer3, model.layer4), (4, 3, 2, 1)):
        for blk in stage:
            for conv_name in ("conv1", "conv2"):
                is_co = type(getattr(blk, conv_name)) is CoConv2d
                assert is_co == (conv_name in convs and level > 1), (conv_name, level)


def test_string_arguments_as_a_config_file_gives_them():
    """One contextual conv named by a string, and attention by timm's names (``"coord"`` is timm's CoordAttn,
    reduction 32 rounded to 8: not the paper's, which stays the default)."""
    one = _meta("coresnet18", contextual_convs="conv2").layer1[0]
    assert (type(one.conv1), type(one.conv2)) == (nn.Conv2d, CoConv2d)
    assert _n_params(_meta("acsinet18", num_classes=7)) == 11_275_527
    assert _n_params(_meta("acsinet18", num_classes=7, attn_layer="coord")) == 11_312_439
    assert _n_params(_meta("acsinet18", num_classes=7, attn_layer="se")) == 11_303_527
    with pytest.raises(ValueError, match=r"attn_layer 'bogus' is not a timm attention name .* leave it out for the"):
        _meta("acsinet18", attn_layer="bogus")


def test_bottleneck_only_conv2_contextual():
    model = _meta("coresnet50")
    for stage, level in zip((model.layer1, model.layer2, model.layer3, model.layer4), (4, 3, 2, 1)):
        for blk in stage:
            assert type(blk.conv1) is nn.Conv2d and blk.conv1.kernel_size == (1, 1)
            assert type(blk.conv3) is nn.Conv2d and blk.conv3.kernel_size == (1, 1)
            assert type(blk.conv2) is (CoConv2d if level > 1 else nn.Conv2d)
            assert level == 1 or blk.conv2.dilations == list(range(1, level + 1))
    assert _n_params(_meta("coresnet50", contextual_convs=("conv2",))) == 25_557_032


def test_custom_coconv_levels():
    model = _meta("coresnet18", coconv_levels=(2, 2, 4, 3))
    assert model.layer1[0].conv1.splits == [32, 32]
    assert model.layer3[1].conv2.splits == [64] * 4
    assert model.layer4[0].conv1.splits == [256, 128, 128]
    plain = _meta("coresnet18", coconv_levels=(1, 1, 1, 1))
    assert not any(isinstance(m, CoConv2d) for m in plain.modules())
    ref = _meta("resnet18")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_layout_is_resnets(name):
    """CoConv keeps nn.Conv2d's state dict: a CoResNet's keys and shapes are the ResNet's; ACSI-Net only adds
    attention keys."""
    ours = {k: v.shape for k, v in _meta(name).state_dict().items()}
    ref = {k: v.shape for k, v in _meta(RESNET_OF[_depth(name)]).state_dict().items()}
    extra = set(ours) - set(ref)
    assert set(ref) <= set(ours)
    assert all(ours[k] == ref[k] for k in ref)
    if name.startswith("coresnet"):
        assert not extra
    else:
        assert extra and all(".se." in k or ".final_attn." in k for k in extra)
        n_ca = sum(LAYERS[_depth(name)]) + 1
        assert len(extra) == 8 * n_ca  # conv1, bn1 (weight, bias, mean, var, count), conv_h, conv_w


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("acsinet18", dict(attn_placement="foo"), r"attn_placement must be one of \('block', 'stage', 'none'\)"),
        ("acsinet18", dict(final_attn="false"), r"final_attn must be True or False, got 'false'"),
        ("coresnet18", dict(final_attn=1), r"final_attn must be True or False, got 1"),
        ("coresnet18", dict(coconv_levels=(4, 3, 2)), r"coconv_levels needs one level per stage \(4\)"),
        ("coresnet18", dict(coconv_levels=(4, 3, 2, 1, 1)), r"coconv_levels needs one level per stage"),
        ("coresnet50", dict(contextual_convs=("conv1",)), r"'conv1', which is not a 3x3 conv of Bottleneck"),
        ("coresnet50", dict(contextual_convs=("conv3",)), r"'conv3', which is not a 3x3 conv of Bottleneck"),
        ("coresnet18", dict(contextual_convs=("conv3",)), r"'conv3', which is not a 3x3 conv of BasicBlock"),
        ("coresnet18", dict(contextual_convs=("downsample",)), r"not a 3x3 conv"),
        ("coresnet18", dict(coconv_levels=(5, 3, 2, 1)), r"level 5 has no split rule"),
    ],
)
def test_bad_model_kwargs_raise_value_error(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _meta(name, **kwargs)


@pytest.mark.parametrize("levels", [(0, 3, 2, 1), (4, 3, 2, -1), (2.5, 3, 2, 1), ("4", 3, 2, 1)])
def test_nonpositive_coconv_level_rejected(levels):
    """A level below 1 means nothing (CoConv2d itself rejects level 0), and a level is a whole number of branches;
    CoResNet must not silently build a plain conv for either."""
    expected = f"coconv_levels must be integers >= 1 (1 = plain conv), got {list(levels)}."
    with pytest.raises(ValueError) as info:
        _meta("coresnet18", coconv_levels=levels)
    assert str(info.value) == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unknown_kwarg_type_error(name):
    with pytest.raises(TypeError):
        _meta(name, not_a_model_arg=1)


def test_dilated_output_stride():
    """timm's output_stride=8 dilates layer3 (x2) and layer4 (x4); CoConv multiplies its branch dilations by them."""
    model = timm.create_model("coresnet18", output_stride=8, coconv_levels=(4, 3, 2, 2)).eval()
    assert model.layer3[1].conv2.dilations == [2, 4]
    assert model.layer4[1].conv2.dilations == [4, 8]
    with torch.no_grad():
        assert model.forward_features(_input("coresnet18")).shape == (1, 512, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# timm's per-model contract
# ---------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_grad_checkpointing(name):
    model = _build(name)
    x = _input(name)
    out = model(x)
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        torch.testing.assert_close(out, _cached(name)(x), rtol=0, atol=0)  # _build copied the weights exactly
    calls, block = [], model.layer2[0]  # counted in forward itself: module hooks do not fire when it is recomputed
    block.forward = lambda x, forward=block.forward: calls.append(1) or forward(x)
    model(x).sum().backward()
    assert len(calls) == 1
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    out2 = model(x)
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-5)
    out2.sum().backward()  # the checkpointed graph is differentiable, and recomputes the stage in backward
    assert len(calls) == 3 and model.conv1.weight.grad is not None


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backward_every_param_gets_grad(name):
    model = _build(name, num_classes=42).train()
    outputs = model(_input(name, batch_size=2, size=32))
    assert outputs.shape == (2, 42)
    outputs.mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    assert sum(p.grad.numel() for p in model.parameters()) == _n_params(model)
    assert torch.isfinite(outputs).all()


def _group_ids(model: nn.Module, coarse: bool) -> Dict[str, int]:
    return group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)


@pytest.mark.parametrize("tag", MODEL_TAGS)
def test_default_cfgs(tag):
    """timm's cfg test for every tag, on the meta device: cfg values, shapes, head resets, cfg module names,
    group matcher, bfloat16 cast, head removal via kwargs, frozen params stay frozen, unknown kwargs raise."""
    name = tag.split(".")[0]
    model = _meta(tag, dtype=torch.float32).eval()
    cfg = model.pretrained_cfg
    assert cfg["tag"] == tag.split(".")[1] and cfg["architecture"] == name
    assert model.num_classes == cfg["num_classes"] == (7 if tag.endswith(("rafdb", "affectnet7", "fer2013")) else 1000)
    num_features = STAGE_CHS[_depth(name)][-1]
    assert model.num_features == model.head_hidden_size == num_features
    assert model.in_chans == cfg["input_size"][0] == 3
    assert cfg["pool_size"] == ((2, 2) if tag.endswith("fer2013") else (7, 7))  # FER-2013 faces are 48x48

    x = torch.randn(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert feats.shape == (1, num_features, *cfg["pool_size"])
    assert pre.shape == (1, model.head_hidden_size)
    assert model(x).shape == (1, cfg["num_classes"])

    # bfloat16 cast: the output follows
    model.to(torch.bfloat16)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)

    # classifier and first conv named by the cfg exist
    state_dict = model.state_dict()
    assert cfg["classifier"] + ".weight" in state_dict and cfg["first_conv"] + ".weight" in state_dict
    assert model.get_submodule(cfg["classifier"]).out_features == cfg["num_classes"]
    assert model.get_submodule(cfg["first_conv"]).in_channels == cfg["input_size"][0]

    # group_matcher covers every parameter, in more than one group
    names = {n for n, _ in model.named_parameters()}
    for coarse in (True, False):
        groups = _group_ids(model, coarse)
        assert set(groups) == names
        assert len(set(groups.values())) > 1

    # head resets
    model.reset_classifier(0)
    assert model.num_classes == 0
    assert model(x).shape == pre.shape
    model.reset_classifier(0, "")
    assert model(x).shape == (1, num_features, *cfg["pool_size"])

    # reset_classifier keeps the parent's device and dtype
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(2)
    assert model.fc.weight.device.type == "meta" and model.fc.weight.dtype == torch.float64

    # head removal via kwargs matches reset_classifier
    assert _meta(tag, num_classes=0).eval()(x).shape == pre.shape
    assert _meta(tag, num_classes=0, global_pool="").eval()(x).shape == (1, num_features, *cfg["pool_size"])

    # frozen params stay frozen through head resets
    frozen = _meta(tag).requires_grad_(False)
    frozen.reset_classifier(0)
    frozen.reset_classifier(0, "")
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]

    # unknown constructor kwargs raise, not silently ignored
    with pytest.raises(TypeError):
        _meta(tag, not_a_model_arg=1)


def test_group_matcher_keeps_stage_attention_with_its_stage():
    """Layer-wise LR decay ranks parameter groups by depth: attention appended after a stage must rank with that
    stage, not with the classifier (timm's ResNet regex ``^layer(\\d+)\\.(\\d+)`` misses ``layer1.attn``)."""
    model = _meta("acsinet18", attn_placement="stage")
    groups = _group_ids(model, coarse=False)
    for i in (1, 2, 3):
        g = groups[f"layer{i}.attn.conv1.weight"]
        assert groups[f"layer{i}.1.conv1.weight"] <= g < groups[f"layer{i + 1}.0.conv1.weight"]
    assert groups["layer4.attn.conv1.weight"] < groups["fc.weight"]
    assert groups["layer4.final_attn.conv1.weight"] < groups["fc.weight"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torchscript_same_output(name):
    with timm.set_scriptable(True):
        model = _build(name)
    scripted = torch.jit.script(model)
    x = _input(name, size=32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), _cached(name)(x), rtol=1e-5, atol=1e-5)


def _expected_feature_info(name: str) -> Tuple[List[int], List[int]]:
    return [64, *STAGE_CHS[_depth(name)]], [2, 4, 8, 16, 32]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_features_only_and_forward_intermediates(name):
    model = _cached(name)
    channels, reductions = _expected_feature_info(name)
    x = _input(name)
    size = x.shape[-1]

    features = _build(name, features_only=True)  # same weights as the classifier model, without its head
    assert features.feature_info.channels() == channels
    assert features.feature_info.reduction() == reductions
    assert [i["num_chs"] for i in model.feature_info] == channels
    assert set(model.state_dict()) - set(features.state_dict()) == {"fc.weight", "fc.bias"}

    with torch.no_grad():
        feats = features(x)
        final, intermediates = model.forward_intermediates(x)
        final_features = model.forward_features(x)
        logits = model(x)
        head = model.forward_head(final)
    assert [tuple(f.shape) for f in feats] == [(1, c, size // r, size // r) for c, r in zip(channels, reductions)]
    assert len(intermediates) == len(feats) == 5
    for a, b in zip(intermediates, feats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(final, final_features, rtol=0, atol=0)
    torch.testing.assert_close(intermediates[-1], final_features, rtol=0, atol=0)
    torch.testing.assert_close(head, logits, rtol=0, atol=0)

    # out_indices / indices select
    sel = _build(name, features_only=True, out_indices=(1, 3))
    assert sel.feature_info.channels() == [channels[1], channels[3]]
    assert sel.feature_info.reduction() == [4, 16]
    with torch.no_grad():
        sel_feats = sel(x)
        only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert len(sel_feats) == len(only) == 2
    for a, b, c in zip(sel_feats, only, (feats[1], feats[3])):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_prune_intermediate_layers(name):
    x = _input(name, batch_size=2, size=32)
    with torch.no_grad():
        reference = _cached(name).forward_intermediates(x, intermediates_only=True)

    pruned = _build(name)
    take = pruned.prune_intermediate_layers([2])
    assert take == [2]
    assert pruned.num_classes == 0 and pruned.num_features == _expected_feature_info(name)[0][2]
    assert not list(pruned.layer3.parameters()) and not list(pruned.layer4.parameters())
    with torch.no_grad():
        (feat,) = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
    torch.testing.assert_close(feat, reference[2], rtol=0, atol=0)

    # every remaining parameter is used (DDP needs that)
    pruned.train()
    features = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
    sum(f.sum() for f in features).backward()
    assert not [n for n, p in pruned.named_parameters() if p.grad is None]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fx_forward_backward(name):
    """As timm's fx tests: trace with timm's leaf modules/functions (train and eval graphs), the eval graph gives
    the eager output, the train graph backpropagates to every parameter (42-class head)."""
    model = _build(name, num_classes=42)
    fx = create_feature_extractor(
        model,
        return_nodes=["fc"],
        tracer_kwargs=dict(
            leaf_modules=timm.models.get_notrace_modules(),
            autowrap_functions=timm.models.get_notrace_functions(),
            param_shapes_constant=True,
        ),
    ).eval()
    x = _input(name, batch_size=2, size=32)
    with torch.no_grad():
        (out,) = fx(x).values()
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 42)

    fx.train()
    (out,) = fx(x).values()
    out.mean().backward()
    assert not [n for n, p in fx.named_parameters() if p.grad is None]
    assert sum(p.grad.numel() for p in fx.parameters()) == _n_params(model)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reset_classifier(name):
    model = _build(name)
    x = _input(name, size=32)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    assert model(x).shape == (1, 7)
    assert _n_params(model) == PARAMS_7[name]
    model.reset_classifier(0)
    assert model(x).shape == (1, STAGE_CHS[_depth(name)][-1])
    assert _n_params(model) == PARAMS_1000[name] - 1000 * (STAGE_CHS[_depth(name)][-1] + 1)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans(name, in_chans):
    model = _build(name, in_chans=in_chans)
    assert model.conv1.weight.shape == (64, in_chans, 7, 7)
    assert _n_params(model) == PARAMS_1000[name] + 64 * 49 * (in_chans - 3)
    with torch.no_grad():
        out = model(torch.randn(1, in_chans, 32, 32))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_factory_device_and_dtype(name):
    # create_model(device='meta') without a device context: every tensor on meta, nothing allocated
    model = timm.create_model(name, device="meta")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert not [n for n, t in tensors if t.device.type != "meta"]
    assert not [m for m in model.modules() if isinstance(m, CoConv2d) and m.weight.device.type != "meta"]

    model = timm.create_model(name, dtype=torch.float64, num_classes=7).eval()
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float64 for t in floats)
    assert all(t.device.type == "cpu" for t in floats)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (1, 7) and torch.isfinite(out).all()


def test_registry_module_holds_only_our_names():
    """The module registers exactly the six models (nothing named ``test_*``, which timm's own suite treats as
    special), and every tag belongs to one of them."""
    assert timm.list_models(module="coresnet") == MODEL_NAMES
    assert not fnmatch.filter(timm.list_models(module="coresnet", include_tags=True), "test_*")
