"""Any decoded Pillow image -> 8-bit RGB, keeping the contrast of high-bit-depth images (numpy and Pillow only).

Pillow's own ``convert("RGB")`` clips 16- and 32-bit integer images at 255 (almost all white) and float images
at 0..255 (a float image in [0, 1] turns black), so those modes are rescaled to 8 bits first. Used by the
dataset readers and the predictor alike, so training and inference see the same pixels.
"""

import numpy as np
from PIL import Image

__all__ = ["to_rgb_image"]


def _to_8bit(img: Image.Image) -> Image.Image:
    """A single-channel ``I;16*``, ``I`` or ``F`` image as mode ``L``."""
    values = np.asarray(img)
    if img.mode == "F":  # floats in [0, 1] (the usual convention) are scaled; anything else is read as 0..255
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return Image.fromarray(np.nan_to_num(values * scale).clip(0, 255).round().astype(np.uint8), mode="L")
    values = values.astype(np.int64).clip(0, None)
    bits = 16 if img.mode.startswith("I;16") or (values.size and values.max() < 2**16) else 32
    return Image.fromarray((values >> (bits - 8)).astype(np.uint8), mode="L")


def to_rgb_image(img: Image.Image) -> Image.Image:
    """An RGB copy of ``img``; 16-bit, 32-bit and float grayscale are rescaled to 8 bits, not clipped."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _to_8bit(img)
    return img.convert("RGB")
