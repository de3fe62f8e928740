"""CoResNet and ACSI-Net, built on timm's ResNet.

CoResNet (Duta et al., ICCVW 2021) is a ResNet whose 3x3 convolutions are contextual convolutions
(:class:`~timm_acsi.layers.CoConv2d`), level 4/3/2/1 in stages 1-4. ACSI-Net (Li, Zhu, Zhou, "Facial
Expression Recognition: One Attention-Modulated Contextual Spatial Information Network", Entropy 2022,
24, 882) adds coordinate attention in every residual block and once more on the final feature map.

CoConv keeps the state dict of the conv it replaces, so timm's ResNet weights load directly: into
CoResNet strictly, into ACSI-Net with only the attention modules left freshly initialised.
"""

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Type, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_attn
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    list_pretrained,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ..labels import FER7_LABELS
from ..layers import AcsiCoordAttn, CoConv2d

__all__ = ["CoResNet", "ATTN_MODULE_NAMES"]

_logger = logging.getLogger(__name__)

#: Module names that hold attention: timm's block slot (``se``), per-stage and final attention.
ATTN_MODULE_NAMES = ("se", "attn", "final_attn")
ATTN_PLACEMENTS = ("block", "stage", "none")
PAPER_DOI = "doi:10.3390/e24070882"

#: Hub-ready folders of the weights that ship inside the package (``<model>.<tag>/model.safetensors``, fp16).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
#: Architectures with FER-2013 weights in :data:`WEIGHTS_DIR`; their ``.fer2013`` tag is the default tag.
FER2013_SHIPPED = ("coresnet18", "acsinet18")
#: Tags whose weights were trained on grayscale faces. timm's ``PretrainedCfg`` has no field for it (an extra
#: key would break timm's Hub loading), so models carry it as ``model.grayscale`` and as a recorded model arg,
#: which timm's ``save_for_hf`` writes to ``config.json`` and ``hf-hub:`` loading passes back.
GRAYSCALE_TAGS = frozenset(f"{m}.fer2013" for m in FER2013_SHIPPED)


class CoResNet(ResNet):
    """timm ``ResNet`` with contextual 3x3 convolutions and optional coordinate attention.

    Args:
        block: timm ``BasicBlock`` or ``Bottleneck`` (one class, or one per stage).
        layers: Blocks per stage.
        coconv_levels: CoConv level per stage (1 = plain conv); the paper uses (4, 3, 2, 1).
        contextual_convs: Names of the 3x3 convs in each block that become CoConv: ``conv1`` and/or
            ``conv2`` of a BasicBlock (default both); a Bottleneck's only 3x3 conv is ``conv2``. One name may
            be given as a string.
        attn_placement: Where attention goes: ``"block"`` (timm's attention slot of every residual block,
            after the last norm, before the residual add), ``"stage"`` (after each stage) or ``"none"``.
        final_attn: Add one attention module on the final feature map, before global pooling.
        attn_layer: Attention module class taking ``(channels, device=None, dtype=None)``, or a timm attention
            name (``timm.layers.get_attn``: ``"se"``, ``"eca"``, ``"cbam"``...; ``"coord"`` is timm's
            ``CoordAttn``, whose reduction differs from the paper's). Default: the paper's ``AcsiCoordAttn``.
        zero_init_last: Zero-init the last norm of each residual branch (as timm's ResNet).
        block_args: Extra block kwargs (as timm's ResNet).
        **kwargs: Every other timm ``ResNet`` argument (num_classes, in_chans, drop_rate...).
    """

    def __init__(
        self,
        block: Union[Type[nn.Module], Tuple[Type[nn.Module], ...]],
        layers: Tuple[int, ...],
        coconv_levels: Sequence[int] = (4, 3, 2, 1),
        contextual_convs: Optional[Sequence[str]] = None,
        attn_placement: str = "none",
        final_attn: bool = False,
        attn_layer: Union[str, Type[nn.Module]] = AcsiCoordAttn,
        zero_init_last: bool = True,
        block_args: Optional[Dict[str, Any]] = None,
        device=None,
        dtype=None,
        **kwargs: Any,
    ) -> None:
        if attn_placement not in ATTN_PLACEMENTS:
            raise ValueError(f"attn_placement must be one of {ATTN_PLACEMENTS}, got {attn_placement!r}.")
        if not isinstance(final_attn, bool):  # "false" is truthy: a string would silently add the module
            raise ValueError(f"final_attn must be True or False, got {final_attn!r}.")
        if len(coconv_levels) != len(layers):
            raise ValueError(f"coconv_levels needs one level per stage ({len(layers)}), got {list(coconv_levels)}.")
        if any(not isinstance(lv, int) or lv < 1 for lv in coconv_levels):
            raise ValueError(f"coconv_levels must be integers >= 1 (1 = plain conv), got {list(coconv_levels)}.")
        if isinstance(contextual_convs, str):
            contextual_convs = (contextual_convs,)
        attn_layer = _attn_class(attn_layer)
        if contextual_convs is not None and not contextual_convs:
            raise ValueError("contextual_convs=() makes no conv contextual; use coconv_levels=(1, 1, 1, 1) for that.")
        block_args = dict(block_args or {})
        if attn_placement == "block":
            block_args["attn_layer"] = attn_layer
        super().__init__(
            block, layers, zero_init_last=zero_init_last, block_args=block_args, device=device, dtype=dtype, **kwargs
        )
        dd = {"device": device, "dtype": dtype}

        stages = [getattr(self, info["module"]) for info in self.feature_info[1:]]
        for stage, level in zip(stages, coconv_levels):
            for blk in stage:
                names = contextual_convs
                if names is None:
                    names = ("conv1", "conv2") if isinstance(blk, BasicBlock) else ("conv2",)
                for name in names:
                    conv = getattr(blk, name, None)
                    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
                        raise ValueError(
                            f"contextual_convs names {name!r}, which is not a 3x3 conv of {type(blk).__name__}; "
                            "use 'conv1'/'conv2' for BasicBlock, 'conv2' for Bottleneck."
                        )
                    if level > 1:
                        setattr(blk, name, CoConv2d.from_conv(conv, level=level))

        if attn_placement == "stage":
            for stage, info in zip(stages, self.feature_info[1:]):
                stage.add_module("attn", attn_layer(info["num_chs"], **dd))
        if final_attn:
            stages[-1].add_module("final_attn", attn_layer(self.num_features, **dd))
        if attn_placement == "stage" or final_attn:
            self.init_weights(zero_init_last=zero_init_last)  # ResNet's init, now covering the new modules

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """As ResNet's, with stage and final attention grouped with the last block of their stage."""
        if coarse:
            return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)")
        blocks = [(r"^layer(\d+)\.(\d+)", None), (r"^layer(\d+)\.(?:attn|final_attn)\.", (99999,))]
        return dict(stem=r"^conv1|bn1|maxpool", blocks=blocks)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: CoResNet) -> Dict[str, torch.Tensor]:
    """Let a plain ResNet checkpoint load strictly: attention weights it lacks keep their fresh init.

    Any other mismatch (missing convs, extra keys, other shapes) still fails the strict load.
    """
    prefixes = tuple(f"{n}." for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ATTN_MODULE_NAMES)
    if not prefixes:
        return state_dict
    own = model.state_dict()
    fresh = [k for k in own if k.startswith(prefixes) and k not in state_dict]
    if fresh:
        _logger.info(f"Checkpoint has no attention weights; {len(fresh)} attention tensors keep their init.")
        state_dict = {**state_dict, **{k: own[k] for k in fresh}}
    return state_dict


def _attn_class(attn_layer: Union[str, Type[nn.Module]]) -> Type[nn.Module]:
    """``attn_layer`` as a class: a timm attention name is resolved as timm's ResNet resolves it."""
    if not isinstance(attn_layer, str):
        return attn_layer
    try:
        layer = get_attn(attn_layer)
    except AssertionError:  # timm's answer to an unknown name
        layer = None
    if layer is None:
        raise ValueError(
            f"attn_layer {attn_layer!r} is not a timm attention name (timm.layers.get_attn: 'se', 'eca', 'cbam', "
            "'coord'...); leave it out for the paper's coordinate attention (AcsiCoordAttn)."
        )
    return layer


def _create_coresnet(
    variant: str, pretrained: bool = False, grayscale: Optional[bool] = None, **kwargs: Any
) -> CoResNet:
    """Build ``variant`` through timm. ``grayscale`` (default: whether the tag's weights were trained on
    grayscale faces) becomes ``model.grayscale``, which tells the predictor, evaluation and export to feed
    grayscale faces replicated to 3 channels."""
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    if grayscale is None:
        grayscale = f"{variant}.{cfg.tag}" in GRAYSCALE_TAGS
    if not isinstance(grayscale, bool):
        raise ValueError(f"grayscale must be True or False, got {grayscale!r}.")
    if pretrained:
        if not (cfg.has_weights or cfg.state_dict is not None):
            tags = [n for n in list_pretrained(f"{variant}.*") if get_pretrained_cfg(n).has_weights]
            raise RuntimeError(
                f"No weights are published for {variant}.{cfg.tag} yet. Use pretrained=False, a tag with weights "
                f"({', '.join(tags)}), 'hf-hub:ORG/NAME' for weights on the Hub, or "
                "pretrained_cfg_overlay=dict(file='model.safetensors') for a local checkpoint."
            )
    model = build_model_with_cfg(CoResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    model.grayscale = grayscale
    if grayscale:
        model._model_args = {"grayscale": True}  # timm merges the factory's kwargs into it; save_for_hf writes it
    return model


def _fer_cfg(dataset: str, **kwargs: Any) -> Dict[str, Any]:
    """FER-7 config: canonical labels, faces resized to 256 and centre-cropped to 224 (paper, Sec. 4.2)."""
    return {
        "num_classes": len(FER7_LABELS),
        "label_names": FER7_LABELS,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "other",
        "paper_ids": PAPER_DOI,
        "description": (
            f"7-class facial expression head for {dataset} in the canonical FER-7 order. No weights are "
            "published for this tag yet: train with `timm-acsi train`, or pass pretrained_cfg_overlay="
            "dict(file=...) to load your own. Weights trained on this dataset follow its research-only terms."
        ),
        **kwargs,
    }


def _fer2013_cfg(model: str) -> Dict[str, Any]:
    """FER-2013 weights shipped with the package: native 48x48 grayscale faces, fed whole (crop_pct 1.0)."""
    return _fer_cfg(
        "FER-2013",
        file=str(WEIGHTS_DIR / f"{model}.fer2013" / "model.safetensors"),
        input_size=(3, 48, 48),
        pool_size=(2, 2),
        crop_pct=1.0,
        origin_url="https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge",
        description=(
            "Trained by timm-acsi on FER-2013 (train = Training, selected on PublicTest; results on PrivateTest in "
            "the model card). Grayscale faces, 48x48, replicated to 3 channels. FER-2013's terms: research use."
        ),
    )


def _in1k_cfg(resnet: str, tag: str) -> Dict[str, Any]:
    """Load timm's ImageNet ResNet weights into the same-depth CoResNet/ACSI-Net (same weight layout)."""
    cfg = get_pretrained_cfg(f"{resnet}.{tag}").to_dict()
    cfg["hf_hub_id"] = f"timm/{resnet}.{tag}"
    cfg["description"] = (
        f"Initialisation only: timm's ImageNet-1k weights `{resnet}.{tag}` loaded into this architecture "
        "(attention modules freshly initialised), with their 1000-class ImageNet head. Not an expression "
        "recognizer: fine-tune with num_classes=7."
    )
    return cfg


def _cfgs(model: str, resnet: str) -> Dict[str, Dict[str, Any]]:
    """Tags of one model; the default (``*``) is the shipped FER-2013 weights, else the FER-7 RAF-DB head.

    timm's ``generate_default_cfgs`` lets a later tag with weights displace an earlier ``*`` default, so the
    ImageNet tags (which have weights) come first and the starred FER tag after them.
    """
    shipped = model in FER2013_SHIPPED
    cfgs = {
        f"{model}.tv_in1k": _in1k_cfg(resnet, "tv_in1k"),
        f"{model}.a1_in1k": _in1k_cfg(resnet, "a1_in1k"),
        f"{model}.rafdb" + ("" if shipped else "*"): _fer_cfg("RAF-DB (basic)"),
        f"{model}.affectnet7": _fer_cfg("AffectNet-7"),
    }
    if shipped:
        cfgs[f"{model}.fer2013*"] = _fer2013_cfg(model)
    return cfgs


default_cfgs = generate_default_cfgs(
    {
        **_cfgs("coresnet18", "resnet18"),
        **_cfgs("coresnet34", "resnet34"),
        **_cfgs("coresnet50", "resnet50"),
        **_cfgs("acsinet18", "resnet18"),
        **_cfgs("acsinet34", "resnet34"),
        **_cfgs("acsinet50", "resnet50"),
    }
)

_ACSI_ARGS = dict(attn_placement="block", final_attn=True)


@register_model
def coresnet18(pretrained: bool = False, **kwargs: Any) -> CoResNet:
    """CoResNet-18: ResNet-18 with contextual convolutions (both 3x3 convs of each BasicBlock)."""
    return _create_coresnet("coresnet18", pretrained, **dict(block=BasicBlock, layers=(2, 2, 2, 2), **kwargs))


@register_model
def coresnet34(pretrained: bool = False, **kwargs: Any) -> CoResNet:
    """CoResNet-34: ResNet-34 with contextual convolutions (both 3x3 convs of each BasicBlock)."""
    return _create_coresnet("coresnet34", pretrained, **dict(block=BasicBlock, layers=(3, 4, 6, 3), **kwargs))


@register_model
def coresnet50(pretrained: bool = False, **kwargs: Any) -> CoResNet:
    """CoResNet-50: ResNet-50 whose Bottleneck 3x3 convs are contextual (as the official CoResNet-50)."""
    return _create_coresnet("coresnet50", pretrained, **dict(block=Bottleneck, layers=(3, 4, 6, 3), **kwargs))


@register_model
def acsinet18(pretrained: bool = False, **kwargs: Any) -> CoResNet:
    """ACSI-Net-18: CoResNet-18 + coordinate attention in every block and on the final feature map."""
    args = dict(block=BasicBlock, layers=(2, 2, 2, 2), **_ACSI_ARGS)
    return _create_coresnet("acsinet18", pretrained, **dict(args, **kwargs))


@register_model
def acsinet34(pretrained: bool = False, **kwargs: Any) -> CoResNet:
    """ACSI-Net-34: CoResNet-34 + coordinate attention in every block and on the final feature map."""
    args = dict(block=BasicBlock, layers=(3, 4, 6, 3), **_ACSI_ARGS)
    return _create_coresnet("acsinet34", pretrained, **dict(args, **kwargs))


@register_model
def acsinet50(pretrained: bool = False, **kwargs: Any) -> CoResNet:
    """ACSI-Net-50: CoResNet-50 + coordinate attention in every block and on the final feature map."""
    args = dict(block=Bottleneck, layers=(3, 4, 6, 3), **_ACSI_ARGS)
    return _create_coresnet("acsinet50", pretrained, **dict(args, **kwargs))
