"""The model of a run (initial weights from a tag or a local file), its optimizer and lr schedule."""

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.models import get_arch_pretrained_cfgs, resolve_pretrained_cfg, split_model_name_tag
from timm.optim import create_optimizer_v2
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2

from ..checkpoint import load_checkpoint, load_weights
from ..labels import check_label_names, label_names_for
from ..models.coresnet import CoResNet, checkpoint_filter_fn
from .config import TrainConfig

__all__ = ["create_model", "create_optimizer_and_scheduler"]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def check_model_source(cfg: TrainConfig) -> None:
    """Fail before any data is read when the model name is unknown or its initial weights cannot exist."""
    name, tag = split_model_name_tag(cfg.model)
    if not timm.is_model(name):
        raise ValueError(f"Unknown model {cfg.model!r}: pick a timm model name (e.g. acsinet18, coresnet50, resnet18).")
    try:
        pretrained_cfg = resolve_pretrained_cfg(name, pretrained_cfg=tag or None)
    except RuntimeError as e:  # timm: "Invalid pretrained tag (...)"
        raise ValueError(f"{e} Its tags: {', '.join(get_arch_pretrained_cfgs(name))}.") from e
    if cfg.pretrained and cfg.init_checkpoint:
        raise ValueError("--pretrained and --init-checkpoint both set the initial weights: pass only one.")
    if cfg.pretrained and not (pretrained_cfg.has_weights or pretrained_cfg.state_dict is not None):
        tags = sorted(timm.list_pretrained(name + ".*"), key=lambda n: not n.endswith(".tv_in1k"))
        if tags:
            kind = "an ImageNet tag" if "_in1k" in tags[0] else "a tag with weights"
            hint = f"Use {kind} (--model {tags[0]}) or --init-checkpoint FILE."
        else:
            hint = "Use --init-checkpoint FILE."
        raise ValueError(f"--pretrained: {name}.{pretrained_cfg.tag} has no published weights. {hint}")
    if cfg.init_checkpoint and not Path(cfg.init_checkpoint).is_file():
        raise FileNotFoundError(f"init_checkpoint {cfg.init_checkpoint} does not exist.")


def build_model(name: str, num_classes: int, model_args: Dict[str, Any], pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with a ValueError naming ``--model-args`` when the kwargs do not fit the model."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **model_args)
    except TypeError as e:
        raise ValueError(f"model_args {model_args} do not fit {name} ({e}): fix --model-args.") from e


def create_model(cfg: TrainConfig, label_names: Optional[Sequence[str]] = None) -> nn.Module:
    """The model of ``cfg``, initialised from the tag's weights or from ``init_checkpoint`` if asked.

    ``init_checkpoint`` is read once, without unpickling (:func:`~timm_acsi.checkpoint.load_checkpoint`, which
    unwraps ``state_dict``/``model``/``model_state_dict`` and DDP's ``module.``). A classifier of another size
    than ``cfg.num_classes`` (ImageNet's 1000 classes) is re-initialised; one of the same size is kept, its rows
    put in the order of ``label_names`` (default: the canonical order) when the file's description records its
    own ``label_names``. A plain ResNet file loads into CoResNet/ACSI-Net with the attention modules left at
    their initialisation; any other missing, unexpected or reshaped tensor is an error.
    """
    check_model_source(cfg)
    model = build_model(cfg.model, cfg.num_classes, dict(cfg.model_args), pretrained=cfg.pretrained)
    if not cfg.init_checkpoint:
        return model
    state_dict, meta = load_checkpoint(cfg.init_checkpoint)
    head = (model.pretrained_cfg.get("classifier") or "fc") + "."
    head_weight = state_dict.get(head + "weight")
    if head_weight is not None and head_weight.shape[0] != cfg.num_classes:
        _logger.info(f"{cfg.init_checkpoint}: {head_weight.shape[0]}-class classifier dropped, {cfg.num_classes} new.")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head)}
    elif head_weight is not None:
        state_dict = _head_in_label_order(state_dict, head, meta, label_names or label_names_for(cfg.num_classes), cfg)
    if isinstance(model, CoResNet):
        state_dict = checkpoint_filter_fn(state_dict, model)
    load_weights(model, state_dict, cfg.init_checkpoint, cfg.model, allow_missing=(head,))
    return model


def _head_in_label_order(
    state_dict: Dict[str, torch.Tensor],
    head: str,
    meta: Optional[Dict[str, Any]],
    label_names: Sequence[str],
    cfg: TrainConfig,
) -> Dict[str, torch.Tensor]:
    """A kept classifier with its rows in the run's label order (matched by name, never by index)."""
    names = (meta or {}).get("label_names")
    if not names:
        _logger.warning(
            f"{cfg.init_checkpoint} keeps its {cfg.num_classes}-class classifier but records no label_names: its "
            f"outputs are taken to be in the order {list(label_names)}."
        )
        return state_dict
    ckpt_names, run_names = check_label_names(names, cfg.num_classes), tuple(label_names)
    if ckpt_names == run_names:
        return state_dict
    if set(ckpt_names) != set(run_names):
        raise ValueError(
            f"{cfg.init_checkpoint} classifies {list(ckpt_names)}, the run {list(run_names)}: the classifier cannot "
            "be kept. Use a checkpoint of the same classes, or remove its classifier tensors from the file."
        )
    order = [ckpt_names.index(n) for n in run_names]
    _logger.info(f"{cfg.init_checkpoint}: classifier rows reordered from {list(ckpt_names)} to {list(run_names)}.")
    return {k: (v[order] if k.startswith(head) else v) for k, v in state_dict.items()}


def create_optimizer_and_scheduler(
    model: nn.Module, cfg: TrainConfig, updates_per_epoch: int = 1
) -> Tuple[torch.optim.Optimizer, Any]:
    """timm's optimizer and scheduler (recipe: SGD momentum 0.9, wd 5e-4, lr 0.01 x0.1 / 20 epochs).

    The schedule is in optimizer updates (``updates_per_epoch`` of them per epoch), as timm's train.py with
    ``--sched-on-updates``: drive it with ``scheduler.step_update(num_updates)`` so warm-up and cosine move
    smoothly within epochs; a step decay still falls on epoch boundaries. ``plateau`` needs the epoch's metric
    and is stepped per epoch. ``sched="none"`` gives no scheduler (``None``): the lr stays ``cfg.lr``.
    """
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.opt,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=cfg.filter_bias_and_bn,
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        decay_epochs=cfg.decay_epochs,
        decay_rate=cfg.decay_rate,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=cfg.sched == "plateau",
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler


def scheduler_state(scheduler: Any) -> Dict[str, Any]:
    """What a resume needs of ``scheduler``: timm's state; for plateau, torch's whole ``ReduceLROnPlateau`` state
    (best metric, patience and cooldown counters), which timm's own ``state_dict`` leaves out."""
    if scheduler is None:
        return {}
    if isinstance(scheduler, PlateauLRScheduler):
        return {"reduce_on_plateau": scheduler.lr_scheduler.state_dict()}
    return scheduler.state_dict()


def load_scheduler_state(scheduler: Any, state: Dict[str, Any]) -> None:
    """Restore :func:`scheduler_state` (or timm's plateau state, as older runs saved it)."""
    if "reduce_on_plateau" in state:
        scheduler.lr_scheduler.load_state_dict(state["reduce_on_plateau"])
    else:
        scheduler.load_state_dict(state)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision context: fp16 on CUDA, bf16 elsewhere."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)
