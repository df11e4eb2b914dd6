"""ParNet, the depth-12 "non-deep" network, as timm models with re-parameterization and tooling.

``import parnet`` registers the variants with timm (``timm.create_model("parnet_s")``); deployment
(``parnet.deploy``) is imported on first use, so the model core loads without it.
"""

from __future__ import annotations

import importlib
import importlib.util

import timm
from torch import nn

from .depth import network_depth
from .layers import Fusion, ParNetBlock, reparameterize
from .model import ParNet, ParNetCfg, model_cfgs
from .official import convert_official_state_dict, load_official

__version__ = "0.1.0"

__all__ = [
    "Fusion",
    "ParNet",
    "ParNetBlock",
    "ParNetCfg",
    "convert_official_state_dict",
    "create_model",
    "deploy",
    "list_models",
    "load_official",
    "model_cfgs",
    "network_depth",
    "reparameterize",
]


def __getattr__(name: str) -> object:
    """``parnet.deploy`` and the submodules (``parnet.deployment``, ``parnet.precision``, ...), imported on first
    use (PEP 562): the model core loads without them."""
    if name == "deploy":
        from .deployment import deploy

        return deploy
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'parnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "deploy"})


def list_models(pattern: str = "parnet*", pretrained: bool = False) -> list[str]:
    """Names of the registered ParNet variants (``pretrained=True``: those with released weights)."""
    return timm.list_models(pattern, pretrained=pretrained)


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` for the ParNet variants (``name`` or ``name.tag``), with clear errors: an unknown
    variant or tag, or a keyword the model does not take, is a ``ValueError`` that names it
    (:func:`parnet.factory.create_model` builds it, the command line's way, for any registered model)."""
    from .factory import check_model_name
    from .factory import create_model as create_registered_model

    if name.split(".")[0] not in model_cfgs:
        raise ValueError(f"unknown ParNet variant {name!r}; choose one of {sorted(model_cfgs)}")
    return create_registered_model(check_model_name(name), pretrained=pretrained, **kwargs)
