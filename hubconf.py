"""torch.hub entry points: the ParNet variants without installing the package.

    model = torch.hub.load("OWNER/parnet", "parnet_s", num_classes=10)
    model = torch.hub.load("OWNER/parnet", "parnet_s_official", pretrained=True)  # the authors' weights
    model = torch.hub.load("/path/to/a/clone", "parnet_cifar_s", source="local")

Each entry point is the variant's timm builder, so it takes what ``timm.create_model`` takes
(``num_classes``, ``in_chans``, ``drop_rate``, ``features_only``, ``pretrained_cfg`` for a weight
tag such as ``"in1k_200ep"``, and any :class:`parnet.ParNetCfg` field).
"""

import sys
from pathlib import Path as _Path  # not an entry point: torch.hub lists every public callable

dependencies = ["torch", "torchvision", "timm", "safetensors"]

# The package lives under src/; torch.hub puts only the repository root on the path.
_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from parnet.model import (  # noqa: E402 - needs the path above
    parnet_cifar_l,
    parnet_cifar_m,
    parnet_cifar_s,
    parnet_l,
    parnet_m,
    parnet_s,
    parnet_xl,
)
from parnet.official import (  # noqa: E402
    parnet_l_official,
    parnet_m_official,
    parnet_s_official,
    parnet_xl_official,
)

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
