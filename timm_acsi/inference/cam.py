"""Attention maps of a torch model: exact CAM from the final feature map and classifier, and Grad-CAM.

CAM (Zhou et al., CVPR 2016) applies to networks that end in global average pooling and one linear layer, as
timm's ResNets, CoResNet and ACSI-Net do: ``logit_k = b_k + mean_hw(sum_c W[k, c] F[c])``, so the map
``sum_c W[k, c] F[c]`` says exactly where class ``k``'s evidence lies. Grad-CAM (Selvaraju et al., ICCV 2017)
works on any named layer of any model: ``ReLU(sum_c alpha_c A_c)`` with ``alpha_c`` the spatial mean of
``d logit_k / d A_c``. On the last block of a ResNet the two agree up to scale (``alpha = W[k] / (h * w)``).
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["class_activation_maps", "grad_cam", "check_cam_applies"]


def check_cam_applies(model: nn.Module) -> nn.Linear:
    """The linear classifier CAM weighs the final feature map with, or a ValueError saying to use Grad-CAM."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    pool = getattr(getattr(model, "global_pool", None), "pool_type", None)
    if not isinstance(classifier, nn.Linear) or pool != "avg" or not hasattr(model, "forward_features"):
        raise ValueError(
            f"CAM needs a model ending in global average pooling and one linear classifier ({type(model).__name__} "
            f"has pool {pool!r} and classifier {type(classifier).__name__}): use Grad-CAM on a named layer instead."
        )
    return classifier


def _selected(logits: torch.Tensor, class_index: Optional[Sequence[int]]) -> torch.Tensor:
    if class_index is None:
        return logits.argmax(-1)
    return torch.as_tensor(list(class_index), device=logits.device, dtype=torch.long)


@torch.inference_mode()
def class_activation_maps(
    model: nn.Module, x: torch.Tensor, class_index: Optional[Sequence[int]] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [N, K], classes [N], cams [N, h, w])``: one forward pass; CAM of each sample's class
    (``class_index``, default the predicted one) = the classifier-weighted sum of its final feature maps."""
    classifier = check_cam_applies(model)
    features = model.forward_features(x)
    logits = model.forward_head(features)
    classes = _selected(logits, class_index)
    weights = classifier.weight[classes].to(features.dtype)  # [N, C]
    return logits, classes, torch.einsum("nc,nchw->nhw", weights, features)


def grad_cam(
    model: nn.Module, x: torch.Tensor, layer: str, class_index: Optional[Sequence[int]] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [N, K], classes [N], maps [N, h, w])``: Grad-CAM on the output of ``model``'s submodule ``layer``."""
    try:
        module = model.get_submodule(layer)
    except AttributeError as e:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"No layer {layer!r} in {type(model).__name__} (top-level layers: {names}).") from e
    captured = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            activation = captured[0]
            classes = _selected(logits, class_index)
            chosen = logits.gather(1, classes[:, None]).sum()
            (grads,) = torch.autograd.grad(chosen, activation)
    finally:
        handle.remove()
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    maps = torch.relu((alpha * activation).sum(1))
    return logits.detach(), classes, maps.detach()
