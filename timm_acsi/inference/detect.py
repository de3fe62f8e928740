"""Face detection front end: a small protocol (RGB image -> boxes + scores) and the built-in detectors.

The default, ``haar``, is OpenCV's frontal-face Haar cascade (Viola-Jones). It ships inside the OpenCV 4.x
wheels (``opencv-python-headless<5``; the 5.0 wheels ship no cascades), so it works offline right after
``pip install "timm-acsi[predict]"``. Its limits: frontal and near-frontal faces only (profile and strongly
tilted faces are missed), faces below ``min_size`` pixels are not found, and its score is the cascade's
confidence (last-stage weight), not a probability. ``none`` takes the whole image as one face (images that are
already face crops, as in aligned datasets). Any callable with the :class:`FaceDetector` signature works too.
"""

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, List, Protocol, Tuple, Union

import numpy as np

from ..extras import import_extra

__all__ = ["Detection", "FaceDetector", "HaarFaceDetector", "WholeImageDetector", "create_detector", "DETECTORS"]

PREDICT_EXTRA = 'pip install "timm-acsi[predict]"'


@dataclass(frozen=True)
class Detection:
    """One face: ``box`` is x, y, width, height in the image's pixels; ``score`` the detector's confidence."""

    box: Tuple[int, int, int, int]
    score: float


class FaceDetector(Protocol):
    """RGB ``uint8`` image ``[H, W, 3]`` -> the faces in it."""

    def __call__(self, image: np.ndarray) -> List[Detection]: ...


def import_cv2(purpose: str) -> ModuleType:
    """OpenCV, or :class:`~timm_acsi.extras.MissingExtraError` saying that ``purpose`` needs the predict extra."""
    return import_extra("cv2", "predict", purpose)


class HaarFaceDetector:
    """OpenCV's Haar cascade on the equalised grayscale image.

    Args:
        cascade: a file name under ``cv2.data.haarcascades`` or a path to a cascade XML.
        scale_factor, min_neighbors: ``detectMultiScale`` settings (more neighbours: fewer false faces).
        min_size: smallest face searched for, in pixels.
    """

    def __init__(
        self,
        cascade: str = "haarcascade_frontalface_default.xml",
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 24,
    ):
        cv2 = import_cv2("Face detection with OpenCV's Haar cascade")
        path = cascade if "/" in cascade or "\\" in cascade else cv2.data.haarcascades + cascade
        self._classifier = cv2.CascadeClassifier(path)
        if self._classifier.empty():
            raise FileNotFoundError(
                f"No Haar cascade at {path}: OpenCV 5 wheels ship none; install OpenCV 4.x ({PREDICT_EXTRA})."
            )
        self._cv2 = cv2
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size

    def __call__(self, image: np.ndarray) -> List[Detection]:
        gray = self._cv2.equalizeHist(self._cv2.cvtColor(np.ascontiguousarray(image), self._cv2.COLOR_RGB2GRAY))
        boxes, _, weights = self._classifier.detectMultiScale3(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
            outputRejectLevels=True,
        )
        found = [Detection(tuple(int(v) for v in b), float(s)) for b, s in zip(boxes, np.ravel(weights))]
        return sorted(found, key=lambda d: (d.box[0], d.box[1]))  # left to right: stable face numbering


class WholeImageDetector:
    """The ``none`` detector: the whole image is one face (score 1.0), for images that are face crops."""

    def __call__(self, image: np.ndarray) -> List[Detection]:
        return [Detection((0, 0, int(image.shape[1]), int(image.shape[0])), 1.0)]


DETECTORS = {"haar": HaarFaceDetector, "none": WholeImageDetector}


def create_detector(detector: Union[str, FaceDetector, Callable]) -> FaceDetector:
    """A detector by name (``haar``, ``none``), or ``detector`` itself when it is already a callable."""
    if callable(detector):
        return detector
    if detector not in DETECTORS:
        raise ValueError(f"Unknown face detector {detector!r}: use one of {', '.join(DETECTORS)} or a callable.")
    return DETECTORS[detector]()
