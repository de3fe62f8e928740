"""Pictures of results, with Pillow and numpy: boxes and labels on the image, JET attention overlays."""

from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .results import ImageResult

__all__ = ["jet", "blend_heatmap", "annotate"]

BOX_COLOR = (255, 196, 0)
SKIPPED_COLOR = (160, 160, 160)


def jet(values: np.ndarray) -> np.ndarray:
    """The JET colormap (blue -> cyan -> yellow -> red) of values in [0, 1], as RGB ``uint8``."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centers = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red, green, blue peaks at 3/4, 1/2, 1/4
    return (np.clip(1.5 - np.abs(4.0 * x - centers), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def blend_heatmap(rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``rgb`` (uint8 ``[H, W, 3]``) with the JET colours of ``heatmap`` (``[H, W]`` in [0, 1]) blended in."""
    mixed = (1.0 - alpha) * rgb.astype(np.float32) + alpha * jet(heatmap).astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def annotate(image: np.ndarray, result: ImageResult, font_size: Optional[int] = None) -> Image.Image:
    """``image`` with each face's box, label and probability drawn; skipped (too small) faces in gray."""
    img = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(img)
    size = font_size or max(12, min(img.width, img.height) // 30)
    font, width = _font(size), max(2, size // 6)
    for det in result.skipped:
        x, y, w, h = det.box
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=SKIPPED_COLOR, width=width)
    for i, face in enumerate(result.faces):
        x, y, w, h = face.box
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=BOX_COLOR, width=width)
        text = f"{i}: {face.label} {face.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        ty = y - (bottom - top) - 2 * width if y - (bottom - top) - 2 * width >= 0 else y + h
        draw.rectangle((x, ty, x + right - left + 2 * width, ty + bottom - top + 2 * width), fill=BOX_COLOR)
        draw.text((x + width - left, ty + width - top), text, fill=(0, 0, 0), font=font)
    if not result.faces:
        draw.text((size // 2, size // 2), "no face found", fill=BOX_COLOR, font=font)
    return img
