"""Image files as model inputs: one reading rule for training, evaluation and prediction.

:func:`open_image` turns a file into an 8-bit PIL image in the mode a model reads (``RGB`` or ``L``):

* the EXIF orientation is applied, so a photo is seen upright, as viewers show it;
* 16-bit and 32-bit integer images (``I;16``, ``I``: medical and scientific scans) are scaled to 8 bits
  by their bit depth, and float images (``F``) from 0..1 or 0..255; Pillow's plain conversion would
  clip them to all-white or all-black;
* transparent pixels are blended onto white, as image viewers and browsers show them, instead of
  keeping the colour hidden under them.

:func:`is_image_file` is which files of an image folder are read: those whose extension Pillow opens,
not hidden ones (``.``-names: macOS ``._x.jpg`` resource forks, ``.ipynb_checkpoints``).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageReadError", "image_extensions", "is_hidden", "is_image_file", "open_image"]

BACKGROUND = (255, 255, 255)  # what transparent pixels are blended onto


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names it and says why."""


@cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of the formats Pillow can open here."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_hidden(path: str | os.PathLike) -> bool:
    return Path(path).name.startswith(".")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether an image folder's file is read: an extension Pillow opens, and not a hidden file."""
    return not is_hidden(path) and Path(path).suffix.lower() in image_extensions()


def _to_8bit(img: Image.Image, path: str | os.PathLike) -> Image.Image:
    """``img`` with 8-bit channels: integer images scaled by their bit depth, float ones from 0..1 or 0..255."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
    if img.mode not in ("I", "F"):
        return img
    values = np.asarray(img, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "F" and low >= 0 and high <= 1:
        scale = 255.0
    elif low >= 0 and high <= 255:
        scale = 1.0
    elif img.mode == "I" and low >= 0 and high <= 65535:  # a 16-bit image that Pillow opened as 32-bit
        scale = 1 / 257
    else:
        raise ImageReadError(
            f"cannot read image {path}: its {'float' if img.mode == 'F' else '32-bit'} values run from {low:g} to "
            f"{high:g}, which has no standard 8-bit meaning: save it scaled to 0..1 (float) or 0..255"
        )
    return Image.fromarray((values * scale).round().clip(0, 255).astype(np.uint8))


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """``img`` with transparent pixels blended onto :data:`BACKGROUND` (unchanged if it has no transparency)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "RGBa"):
        return img
    background = Image.new("RGBA", img.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")


def prepare_image(img: Image.Image, mode: str = "RGB", name: str | os.PathLike = "image") -> Image.Image:
    """An image already open (or in memory) as :func:`open_image` reads files: upright by its EXIF orientation,
    8-bit, transparency on white, in ``mode``; ``name`` names it in an error."""
    return _flatten_alpha(_to_8bit(ImageOps.exif_transpose(img), name)).convert(mode)


def open_image(path: str | os.PathLike, mode: str = "RGB", upright: bool = True) -> Image.Image:
    """The image file at ``path`` as an 8-bit PIL image in ``mode``, read as this module's docstring says
    (``upright=False``: in the stored pixels' frame, not turned by the EXIF orientation, as COCO boxes are).

    Raises ``FileNotFoundError`` if there is no file, :class:`ImageReadError` (a ``ValueError``) if it is not
    an image Pillow can read, is truncated, or is over Pillow's size limit against decompression bombs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with Image.open(path) as img:
            if upright:
                return prepare_image(img, mode, path)
            return _flatten_alpha(_to_8bit(img, path)).convert(mode)
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"cannot read image {path}: {e.args[0].split(', could be')[0]} (Pillow's guard against decompression "
            "bombs): shrink it, or, if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS in Python"
        ) from None
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types: UnidentifiedImageError, OSError, SyntaxError...
        raise ImageReadError(
            f"cannot read image {path}: not an image Pillow can read, or truncated ({type(e).__name__}: {e})"
        ) from None
