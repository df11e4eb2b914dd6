"""torch.hub entry points: the ParNet variants without installing the package.

    model = torch.hub.load("OWNER/parnet", "parnet_s", num_classes=10)
    model = torch.hub.load("OWNER/parnet", "parnet_s_official", pretrained=True)  # the authors' weights
    model = torch.hub.load("/path/to/a/clone", "parnet_cifar_s", source="local")

Each entry point is ``timm.create_model`` of its variant, so it takes what that takes (``num_classes``,
``in_chans``, ``drop_rate``, ``features_only``, ``checkpoint_path``, ``pretrained_cfg`` for a weight tag
such as ``"in1k_200ep"``, and any :class:`parnet.ParNetCfg` field).
"""

import sys
from collections.abc import Callable as _Callable
from pathlib import Path as _Path  # not an entry point: torch.hub lists every public callable

dependencies = ["torch", "torchvision", "timm", "safetensors"]

# The package lives under src/; torch.hub puts only the repository root on the path.
_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

import timm as _timm  # noqa: E402

import parnet as _parnet  # noqa: E402, F401 - needs the path above; registers the variants with timm


def _entry(name: str) -> _Callable[..., object]:
    """The entry point of variant ``name``: ``timm.create_model(name, ...)``, with its builder's docstring."""

    def entry(pretrained: bool = False, **kwargs: object) -> object:
        return _timm.create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = _timm.models.model_entrypoint(name).__doc__
    return entry


parnet_s = _entry("parnet_s")
parnet_m = _entry("parnet_m")
parnet_l = _entry("parnet_l")
parnet_xl = _entry("parnet_xl")
parnet_cifar_s = _entry("parnet_cifar_s")
parnet_cifar_m = _entry("parnet_cifar_m")
parnet_cifar_l = _entry("parnet_cifar_l")
parnet_s_official = _entry("parnet_s_official")
parnet_m_official = _entry("parnet_m_official")
parnet_l_official = _entry("parnet_l_official")
parnet_xl_official = _entry("parnet_xl_official")

__all__ = [
    "parnet_cifar_l",
    "parnet_cifar_m",
    "parnet_cifar_s",
    "parnet_l",
    "parnet_l_official",
    "parnet_m",
    "parnet_m_official",
    "parnet_s",
    "parnet_s_official",
    "parnet_xl",
    "parnet_xl_official",
]
