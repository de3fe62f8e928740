"""``ExpressionRecognizer``: images in, one result per face out (box, detector score, label, probabilities).

Face detection, cropping and preprocessing are numpy + Pillow (+ OpenCV for the Haar detector); the network
sits behind a small backend interface (``label_names``, ``data_config``, ``grayscale``, ``source`` and
``__call__(batch) -> logits``), which :class:`~timm_acsi.inference.torch_backend.TorchBackend` and
``timm_acsi.export.ort_backend.OnnxBackend`` both implement. This module imports no torch: a model source
string loads the torch backend when the recognizer is built.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .detect import Detection, FaceDetector, create_detector
from .draw import blend_heatmap
from .preprocess import ImageInput, Preprocessor, square_box, to_rgb_array
from .results import AttentionMap, FaceResult, ImageResult

__all__ = ["DEFAULT_MODEL", "ExpressionRecognizer", "softmax"]

#: the model a recognizer (and ``timm-acsi predict``) uses when none is named: the shipped FER-2013 ACSI-Net-18
DEFAULT_MODEL = "acsinet18.fer2013"
Box = Tuple[int, int, int, int]
ATTENTION_METHODS = ("cam", "gradcam")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 for stability."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class ExpressionRecognizer:
    """Detect faces, crop them, and classify their expressions in batches.

    Args:
        model: a model source (timm tag with weights, ``hf-hub:ORG/NAME``, ``local-dir:PATH``, a training
            checkpoint or run folder; see :func:`timm_acsi.sources.load_model`), a
            :class:`~timm_acsi.sources.LoadedModel`, or a backend object (e.g. ``OnnxBackend``). Default:
            :data:`DEFAULT_MODEL`, the ACSI-Net-18 weights that ship with the package.
        detector: ``"haar"`` (default, OpenCV), ``"none"`` (each image is one face) or a callable
            ``RGB array -> list of Detection``.
        device: torch device for a model source (``"cpu"``, ``"cuda"``...).
        margin: each square face crop is ``(1 + margin)`` times the box's longer side, clipped at the border.
        min_face_size: boxes narrower or lower than this many pixels are skipped (and reported).
        batch_size: faces per network batch.
        channels_last: run the torch model in channels-last memory format.
        compile: run the torch model through ``torch.compile`` (see
            :class:`~timm_acsi.inference.torch_backend.TorchBackend`); only for a model source or LoadedModel.
        tta_flip: average each face's probabilities with its mirror image's (horizontal-flip test-time
            augmentation: two forward passes; +1.3 points on FER-2013's PrivateTest for ``acsinet18.fer2013``).
            Attention maps are drawn for the averaged prediction.
        **load_kwargs: passed to :func:`~timm_acsi.sources.load_model` (``label_names``, ``architecture``...).
    """

    def __init__(
        self,
        model: Any = DEFAULT_MODEL,
        detector: Union[str, FaceDetector, Callable] = "haar",
        device: str = "cpu",
        margin: float = 0.2,
        min_face_size: int = 24,
        batch_size: int = 32,
        channels_last: bool = False,
        compile: bool = False,
        tta_flip: bool = False,
        **load_kwargs: Any,
    ):
        if margin < 0 or min_face_size < 1 or batch_size < 1:
            raise ValueError(
                f"margin must be >= 0, min_face_size and batch_size >= 1 (got {margin}, {min_face_size}, {batch_size})."
            )
        self.backend = _make_backend(model, device, channels_last, compile, load_kwargs)
        self.detector = create_detector(detector)
        self.label_names: Tuple[str, ...] = tuple(self.backend.label_names)
        self.preprocess = Preprocessor(self.backend.data_config, grayscale=self.backend.grayscale)
        self.margin, self.min_face_size, self.batch_size = margin, min_face_size, batch_size
        self.tta_flip = tta_flip

    def __call__(
        self, image: ImageInput, boxes: Optional[Sequence[Sequence[int]]] = None, **kwargs: Any
    ) -> ImageResult:
        """The faces of one image; ``boxes`` (x, y, w, h) replace detection. Keyword args as :meth:`predict`."""
        return self.predict([image], boxes=None if boxes is None else [boxes], **kwargs)[0]

    def predict(
        self,
        images: Sequence[ImageInput],
        boxes: Optional[Sequence[Optional[Sequence[Sequence[int]]]]] = None,
        attention: Optional[str] = None,
        attention_layer: Optional[str] = None,
        attention_class: Optional[str] = None,
        sources: Optional[Sequence[Optional[str]]] = None,
    ) -> List[ImageResult]:
        """Results for several images; the faces of all of them go through the network in shared batches.

        Args:
            images: paths, PIL images or RGB ``uint8`` arrays.
            boxes: per image, its face boxes (x, y, w, h) instead of the detector's (``None``: detect).
            attention: ``"cam"`` or ``"gradcam"`` to attach an :class:`AttentionMap` to every face.
            attention_layer: the layer for Grad-CAM (e.g. ``layer4``).
            attention_class: the class name mapped (default: each face's predicted class).
            sources: a name per image recorded in the results (default: the path, for paths).
        """
        class_index = self._check_attention(attention, attention_layer, attention_class)
        arrays = [to_rgb_array(img) for img in images]
        names = [_source_name(img, None if sources is None else sources[i]) for i, img in enumerate(images)]
        results = [ImageResult([], int(a.shape[1]), int(a.shape[0]), source=n) for a, n in zip(arrays, names)]
        faces = []  # (image index, detection, crop box)
        for i, array in enumerate(arrays):
            for det in self._detect(array, None if boxes is None else boxes[i]):
                if min(det.box[2:]) < self.min_face_size:
                    results[i].skipped.append(det)
                else:
                    faces.append((i, det, square_box(det.box, self.margin, array.shape[1], array.shape[0])))
        crops = [arrays[i][y : y + h, x : x + w] for i, _, (x, y, w, h) in faces]
        outputs = self._classify(crops, attention, attention_layer, class_index)
        for (i, det, crop_box), crop, (probs, att) in zip(faces, crops, outputs):
            results[i].faces.append(self._face(det, crop_box, crop, probs, att, attention))
        return results

    # ------------------------------------------------------------------------------------------- steps

    def _check_attention(self, method: Optional[str], layer: Optional[str], class_name: Optional[str]) -> Optional[int]:
        if method is None:
            return None
        if method not in ATTENTION_METHODS:
            raise ValueError(f"Unknown attention method {method!r}: use one of {', '.join(ATTENTION_METHODS)}.")
        if not hasattr(self.backend, "attention"):
            raise ValueError(f"Attention maps need the torch backend; {type(self.backend).__name__} only gives logits.")
        self.backend.check_attention(method, layer)
        if class_name is None:
            return None
        if class_name not in self.label_names:
            raise ValueError(f"No class {class_name!r} in this model; its classes are {', '.join(self.label_names)}.")
        return self.label_names.index(class_name)

    def _detect(self, image: np.ndarray, boxes: Optional[Sequence[Sequence[int]]]) -> List[Detection]:
        if boxes is None:
            return list(self.detector(image))
        found = []
        height, width = image.shape[:2]
        for box in boxes:
            if len(box) != 4 or min(box[2:]) <= 0:
                raise ValueError(f"A face box is x, y, width, height with width, height > 0; got {list(box)}.")
            x, y, w, h = (int(v) for v in box)
            if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                raise ValueError(
                    f"Face box {[x, y, w, h]} (x, y, width, height) lies outside the {width}x{height} image: "
                    "boxes are in the image's pixel coordinates."
                )
            found.append(Detection((x, y, w, h), None))
        return found

    def _classify(
        self, crops: List[np.ndarray], attention: Optional[str], layer: Optional[str], class_index: Optional[int]
    ) -> List[Tuple[np.ndarray, Optional[Tuple[int, np.ndarray]]]]:
        """Per crop: probabilities, and (class, raw map) when attention is asked for; in batches."""
        out: List[Tuple[np.ndarray, Optional[Tuple[int, np.ndarray]]]] = []
        for start in range(0, len(crops), self.batch_size):
            batch = self.preprocess(crops[start : start + self.batch_size])
            if attention is None:
                out += [(p, None) for p in self._probabilities(batch)]
                continue
            classes = None if class_index is None else [class_index] * len(batch)
            if self.tta_flip:  # the map of the averaged prediction's class, on the face as it is
                probs = self._probabilities(batch)
                _, chosen, maps = self.backend.attention(batch, attention, layer, classes or probs.argmax(1).tolist())
            else:
                logits, chosen, maps = self.backend.attention(batch, attention, layer, classes)
                probs = softmax(logits)
            out += [(p, (int(k), m)) for p, k, m in zip(probs, chosen, maps)]
        return out

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Softmax of the batch, averaged with its horizontal mirror's when ``tta_flip``."""
        probs = softmax(self.backend(batch))
        if self.tta_flip:
            probs = (probs + softmax(self.backend(np.ascontiguousarray(batch[..., ::-1])))) / 2
        return probs

    def _face(
        self,
        det: Detection,
        crop_box: Box,
        crop: np.ndarray,
        probs: np.ndarray,
        att: Optional[Tuple[int, np.ndarray]],
        method: Optional[str],
    ) -> FaceResult:
        best = int(probs.argmax())
        return FaceResult(
            box=det.box,
            detection_score=det.score,
            crop_box=crop_box,
            label=self.label_names[best],
            score=float(probs[best]),
            probabilities={n: float(p) for n, p in zip(self.label_names, probs)},
            label_names=self.label_names,
            attention=None if att is None else self._attention_map(method, *att, crop, crop_box),
        )

    def _attention_map(self, method: str, k: int, raw: np.ndarray, crop: np.ndarray, crop_box: Box) -> AttentionMap:
        """Upsample the map to the part of the crop the network saw and blend it over that part."""
        rx, ry, rw, rh = self.preprocess.input_region(crop.shape[1], crop.shape[0])
        x0, y0 = int(round(rx)), int(round(ry))
        x1, y1 = max(x0 + 1, int(round(rx + rw))), max(y0 + 1, int(round(ry + rh)))
        seen = crop[y0:y1, x0:x1]
        span = float(raw.max() - raw.min())
        scaled = (raw - raw.min()) / span if span > 0 else np.zeros_like(raw)
        heatmap = np.asarray(
            Image.fromarray(scaled.astype(np.float32), mode="F").resize((seen.shape[1], seen.shape[0]), Image.BILINEAR)
        )
        region = (crop_box[0] + x0, crop_box[1] + y0, seen.shape[1], seen.shape[0])
        return AttentionMap(
            method=method,
            class_index=k,
            label=self.label_names[k],
            raw=raw,
            heatmap=np.clip(heatmap, 0.0, 1.0),
            region=region,
            overlay=blend_heatmap(seen, np.clip(heatmap, 0.0, 1.0)),
        )


def _source_name(image: ImageInput, given: Optional[str]) -> Optional[str]:
    if given is not None:
        return given
    return str(image) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else None


def _make_backend(model: Any, device: str, channels_last: bool, compile: bool, load_kwargs: Dict[str, Any]) -> Any:
    """A backend from a source string or LoadedModel (torch, imported here), or ``model`` itself if it is one."""
    if (
        isinstance(model, str)
        or hasattr(model, "__fspath__")
        or hasattr(model, "data_config")
        and hasattr(model, "model")
    ):
        from .torch_backend import TorchBackend  # torch only when a torch model is asked for

        if isinstance(model, str) or hasattr(model, "__fspath__"):
            return TorchBackend.from_source(
                str(model), device, channels_last=channels_last, compile=compile, **load_kwargs
            )
        return TorchBackend(model, channels_last=channels_last, compile=compile)
    if compile:
        raise ValueError(f"compile=True compiles a torch model; {type(model).__name__} is already a backend.")
    if load_kwargs:
        raise TypeError(f"{', '.join(load_kwargs)} describe a model source; {type(model).__name__} is already loaded.")
    missing = [a for a in ("label_names", "data_config", "grayscale") if not hasattr(model, a)]
    if missing or not callable(model):
        raise TypeError(
            f"model must be a model source, a LoadedModel or a backend (callable with label_names, data_config, "
            f"grayscale); {type(model).__name__} lacks {', '.join(missing) or '__call__'}."
        )
    return model
