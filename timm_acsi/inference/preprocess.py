"""Images in, network batches out, with numpy and Pillow only (no torch: the onnxruntime path uses it too).

:class:`Preprocessor` reproduces timm's eval transform (``timm.data.create_transform(**data_config)``) exactly:
resize (shorter side to ``floor(size / crop_pct)``, or both sides in ``squash`` mode) with the config's
interpolation, centre crop, scale to [0, 1], normalise. Grayscale models get each face converted to
grayscale and replicated to three channels first, as in training.
"""

import math
from pathlib import Path
from typing import Any, Mapping, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..imaging import to_rgb_image

__all__ = ["ImageInput", "UnreadableImageError", "load_image", "to_rgb_array", "Preprocessor", "square_box"]

ImageInput = Union[str, Path, Image.Image, np.ndarray]
Box = Tuple[int, int, int, int]

# timm's interpolation names -> Pillow filters (timm.data.transforms.str_to_interp_mode)
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


class UnreadableImageError(ValueError):
    """A file that is missing, not an image, or corrupt."""


def load_image(path: Union[str, Path]) -> np.ndarray:
    """An image file as an RGB ``uint8`` array ``[H, W, 3]``, turned upright by its EXIF orientation."""
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_rgb_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UnreadableImageError(f"{path} is not a readable image ({type(e).__name__}: {e}).") from e


def _pil_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Upright (EXIF orientation), 8-bit RGB: as a file of the same picture would be read."""
    return np.asarray(to_rgb_image(ImageOps.exif_transpose(img)))


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """A path, PIL image or array (``[H, W]`` gray or ``[H, W, 3]`` RGB, ``uint8``) as an RGB ``uint8`` array.

    PIL images are turned upright by their EXIF orientation and high-bit-depth ones rescaled to 8 bits, exactly
    as the same picture read from a file."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb_array(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"Image arrays must be uint8 (0..255), got {array.dtype}: scale them to 0..255 first, e.g. "
            "(a >> 8).astype(np.uint8) for 16-bit values, (a * 255).round().astype(np.uint8) for floats in [0, 1]."
        )
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    raise ValueError(f"Image arrays must be [H, W] or [H, W, 3] RGB, got shape {array.shape}.")


def square_box(box: Sequence[float], margin: float, width: int, height: int) -> Box:
    """The square around ``box`` (x, y, w, h), its side ``(1 + margin)`` times the box's longer side, same
    centre, clipped at the image border (so a face at the edge gives a narrower crop). Returns x, y, w, h."""
    x, y, w, h = (float(v) for v in box)
    side = max(w, h) * (1.0 + margin)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    x1, y1 = min(width, round(cx + side / 2)), min(height, round(cy + side / 2))
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


class Preprocessor:
    """Face crops (RGB ``uint8`` arrays) -> a normalised ``float32`` batch ``[N, 3, H, W]`` for the network.

    Args:
        data_config: timm's data config (``resolve_data_config``): input_size, interpolation, mean, std,
            crop_pct, crop_mode (``center`` or ``squash``).
        grayscale: convert each crop to grayscale, replicated to three channels, before anything else.
    """

    def __init__(self, data_config: Mapping[str, Any], grayscale: bool = False):
        crop_mode = data_config.get("crop_mode") or "center"
        if crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode {crop_mode!r} is not supported for prediction: use 'center' or 'squash'.")
        if crop_mode == "center" and data_config["input_size"][1] != data_config["input_size"][2]:
            raise ValueError(f"Non-square input size {data_config['input_size']} needs crop_mode 'squash'.")
        interpolation = data_config.get("interpolation", "bilinear")
        if interpolation not in _PIL_FILTERS:
            raise ValueError(f"Unknown interpolation {interpolation!r}; timm's are {', '.join(_PIL_FILTERS)}.")
        self.size = tuple(int(v) for v in data_config["input_size"][1:])
        self.crop_pct = float(data_config.get("crop_pct") or 0.875)
        self.crop_mode = crop_mode
        self.filter = _PIL_FILTERS[interpolation]
        self.mean = np.asarray(data_config["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(data_config["std"], dtype=np.float32).reshape(3, 1, 1)
        self.grayscale = grayscale
        # timm: scale_size = floor(size / crop_pct) per side
        self.scale = tuple(math.floor(s / self.crop_pct) for s in self.size)

    def __call__(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, 3, *self.size), dtype=np.float32)
        return np.stack([self.one(c) for c in crops])

    def one(self, crop: np.ndarray) -> np.ndarray:
        """One crop -> ``[3, H, W]`` float32, as timm's eval transform computes it."""
        img = Image.fromarray(crop)
        if self.grayscale:
            img = img.convert("L").convert("RGB")
        img = img.resize(self._resized_size(img.width, img.height), self.filter)
        array = self._center_crop(np.asarray(img))
        x = array.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        return (x - self.mean) / self.std

    def input_region(self, width: int, height: int) -> Tuple[float, float, float, float]:
        """The part of a ``width x height`` crop the network sees (x, y, w, h in crop pixels): where a CAM lies."""
        rw, rh = self._resized_size(width, height)
        (th, tw), (top, left) = self.size, self._crop_offsets(rw, rh)
        sx, sy = width / rw, height / rh
        return left * sx, top * sy, min(tw, rw) * sx, min(th, rh) * sy

    def _resized_size(self, width: int, height: int) -> Tuple[int, int]:
        """torchvision ``Resize`` output size (width, height): shorter side to scale, or both in squash mode."""
        if self.crop_mode == "squash":
            return self.scale[1], self.scale[0]
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.scale[0], int(self.scale[0] * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def _crop_offsets(self, width: int, height: int) -> Tuple[int, int]:
        th, tw = self.size
        return int(round((height - th) / 2.0)), int(round((width - tw) / 2.0))

    def _center_crop(self, array: np.ndarray) -> np.ndarray:
        """torchvision ``CenterCrop``: zero-pad if smaller, then crop at the rounded centre offsets."""
        (th, tw), (h, w) = self.size, array.shape[:2]
        if h < th or w < tw:
            top, left = max(0, (th - h) // 2), max(0, (tw - w) // 2)
            padded = np.zeros((max(h, th), max(w, tw), 3), dtype=array.dtype)
            padded[top : top + h, left : left + w] = array
            array, (h, w) = padded, padded.shape[:2]
        top, left = self._crop_offsets(w, h)
        return array[top : top + th, left : left + tw]
