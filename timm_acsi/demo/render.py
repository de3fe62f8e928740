"""What the demo page shows, made from an :class:`~timm_acsi.inference.ImageResult` with numpy and Pillow only
(no Gradio, so it is tested without a browser): the upload read and downscaled, the per-face probability chart,
the CAM tiles, the results table and CSV, and the one-line messages that replace stack traces."""

import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from ..inference import FaceResult, ImageResult, UnreadableImageError
from ..inference.draw import BOX_COLOR, _font
from ..inference.results import to_csv

__all__ = [
    "MAX_SIDE",
    "MAX_PIXELS",
    "ImageTooLargeError",
    "read_upload",
    "probability_chart",
    "cam_tiles",
    "results_table",
    "results_csv",
    "summary_message",
    "error_message",
]

#: Uploads whose longer side exceeds this are downscaled before detection (Haar's time grows with the area).
MAX_SIDE = 1600
#: Larger images are refused before decoding (a 100-megapixel photo takes seconds and gigabytes to decode).
MAX_PIXELS = 80_000_000
BAR_COLOR = (150, 150, 150)
CAM_TILE = 192


class ImageTooLargeError(ValueError):
    """An image with more pixels than the demo decodes."""


def read_upload(
    path: Path, name: str, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS
) -> Tuple[np.ndarray, Optional[Tuple[int, int]]]:
    """The image file at ``path`` (called ``name`` in messages) as an upright RGB ``uint8`` array whose longer
    side is at most ``max_side``, and its original (width, height) when it was downscaled (else ``None``).

    Raises:
        UnreadableImageError: not an image, or a truncated or corrupt one.
        ImageTooLargeError: more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{name} is too large to decode ({e}).") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UnreadableImageError(f"{name} is not a readable image ({type(e).__name__}).") from e
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); the demo takes up to "
                f"{max_pixels / 1e6:.0f} megapixels: downscale it first."
            )
        scale = max_side / max(width, height)
        try:
            if scale < 1:
                img.draft("RGB", (int(width * scale), int(height * scale)))  # JPEG: decode at a reduced size
            rgb = ImageOps.exif_transpose(img).convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise UnreadableImageError(f"{name} is not a readable image ({type(e).__name__}: {e}).") from e
    if scale >= 1:
        return np.asarray(rgb), None
    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    upright = (width, height) if (rgb.width >= rgb.height) == (width >= height) else (height, width)
    return np.asarray(rgb), upright


def probability_chart(face: FaceResult, index: int, width: int = 320) -> Image.Image:
    """A horizontal bar chart of one face's class probabilities, in output order, its predicted class in the
    box colour of the annotated image; titled with the face number, label and score as on that image."""
    font, title_font = _font(14), _font(16)
    names = face.label_names
    pad, row = 8, 26
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max(draw.textlength(n, font=font) for n in names)
    value_w = draw.textlength("0.00", font=font)
    top = 2 * pad + row
    img = Image.new("RGB", (width, top + row * len(names) + pad), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), f"face {index}: {face.label} {face.score:.2f}", fill="black", font=title_font)
    bar_x = pad + name_w + pad
    bar_max = max(1.0, width - bar_x - value_w - 2 * pad)
    for i, name in enumerate(names):
        y, p = top + i * row, face.probabilities[name]
        draw.text((pad, y + 5), name, fill="black", font=font)
        color = BOX_COLOR if name == face.label else BAR_COLOR
        draw.rectangle((bar_x, y + 4, bar_x + max(1.0, p * bar_max), y + row - 4), fill=color)
        draw.text((bar_x + p * bar_max + pad / 2, y + 5), f"{p:.2f}", fill="black", font=font)
    return img


def cam_tiles(result: ImageResult, size: int = CAM_TILE) -> List[Tuple[Image.Image, str]]:
    """Per face with an attention map: its overlay enlarged to ``size`` pixels, and a caption naming the class."""
    tiles = []
    for i, face in enumerate(result.faces):
        if face.attention is not None:
            overlay = Image.fromarray(face.attention.overlay)
            scale = size / max(overlay.size)
            shape = (max(1, round(overlay.width * scale)), max(1, round(overlay.height * scale)))
            tiles.append(
                (
                    overlay.resize(shape, Image.Resampling.BICUBIC),
                    f"face {i}: {face.attention.method.upper()} of {face.attention.label}",
                )
            )
    return tiles


def results_table(result: ImageResult, label_names: Sequence[str]) -> Tuple[List[str], List[list]]:
    """Headers and one row per face: number, box, detector score, label, score and every class probability."""
    headers = ["face", "x", "y", "w", "h", "detector score", "label", "score", *label_names]
    rows = []
    for i, face in enumerate(result.faces):
        det = None if face.detection_score is None else round(face.detection_score, 2)
        probs = [round(face.probabilities[n], 3) for n in label_names]
        rows.append([i, *face.box, det, face.label, round(face.score, 3), *probs])
    return headers, rows


def results_csv(result: ImageResult, label_names: Sequence[str], name: str) -> str:
    """The CSV that ``timm-acsi predict --csv`` writes for this image, with ``name`` in its file column."""
    return to_csv([(name, result)], label_names)


def summary_message(result: ImageResult, model: str, detector: str, original: Optional[Tuple[int, int]] = None) -> str:
    """Markdown: how many faces were found by what, or why none was, and what was done to the image."""
    notes = []
    if original is not None:
        notes.append(
            f"downscaled from {original[0]}x{original[1]} to {result.width}x{result.height} pixels before detection"
        )
    if result.skipped:
        n = len(result.skipped)
        notes.append(f"{n} face{'s' * (n != 1)} below the minimum size skipped (gray boxes)")
    tail = "".join(f"\n\n{note[0].upper()}{note[1:]}." for note in notes)
    if not result.faces:
        hint = (
            " The Haar detector finds frontal, upright faces of at least 24 pixels: try a closer, frontal, "
            "well-lit photo."
            if detector == "haar"
            else ""
        )
        return f"**No face found** in this {result.width}x{result.height} image.{hint}{tail}"
    n = len(result.faces)
    return f"**{n} face{'s' * (n != 1)}** found by the {detector} detector, model `{model}`.{tail}"


def error_message(error: BaseException) -> str:
    """Markdown for the page when a request fails: the reason for bad input, never a stack trace."""
    if isinstance(error, UnreadableImageError):
        return f"**Cannot read this file:** {error} Upload a photo (JPEG, PNG, WebP, BMP, GIF or TIFF)."
    if isinstance(error, ImageTooLargeError):
        return f"**Image too large:** {error}"
    if isinstance(error, (ValueError, OSError)):
        return f"**Cannot process this image:** {error}"
    return f"**Something went wrong** ({type(error).__name__}); the server's log has the details."
