"""torch.hub entry points for timm-acsi.

    model = torch.hub.load("<owner>/timm-acsi", "acsinet18", pretrained=True)  # FER-2013 weights, in the package
    model = torch.hub.load("/path/to/timm-acsi", "acsinet18", source="local", pretrained=True)
    model = torch.hub.load("<owner>/timm-acsi", "acsinet18", pretrained_cfg="rafdb")  # untrained, 224 px colour

An untrained model carries its tag's preprocessing, as timm models do: ``acsinet18`` (default tag ``.fer2013``)
is set up for 48 px grayscale faces; pick another tag with ``pretrained_cfg="rafdb"`` for another dataset.

Each entry point is ``timm.create_model(name, pretrained=pretrained, **kwargs)``: every timm kwarg
(``num_classes``, ``in_chans``, ``features_only``, ``pretrained_cfg_overlay``...) and every model kwarg
(``attn_placement``, ``final_attn``, ``coconv_levels``, ``contextual_convs``) works.
"""

from typing import Any as _Any
from typing import Callable as _Callable

import timm
from torch import nn as _nn

import timm_acsi  # noqa: F401  (registers the models with timm)

dependencies = ["torch", "timm", "safetensors"]


def _entrypoint(name: str) -> _Callable[..., _nn.Module]:
    def create(pretrained: bool = False, **kwargs: _Any) -> _nn.Module:
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__doc__ = (
        f"{timm.models.model_entrypoint(name).__doc__}\n\n"
        f"Same as ``timm.create_model({name!r}, pretrained=pretrained, **kwargs)``."
    )
    return create


coresnet18 = _entrypoint("coresnet18")
coresnet34 = _entrypoint("coresnet34")
coresnet50 = _entrypoint("coresnet50")
acsinet18 = _entrypoint("acsinet18")
acsinet34 = _entrypoint("acsinet34")
acsinet50 = _entrypoint("acsinet50")
