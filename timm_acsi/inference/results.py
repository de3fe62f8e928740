"""What the recognizer returns: one :class:`FaceResult` per face, grouped in an :class:`ImageResult` per image."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from .detect import Detection

__all__ = ["AttentionMap", "FaceResult", "ImageResult"]

Box = Tuple[int, int, int, int]


@dataclass
class AttentionMap:
    """Where the network looked for one class of one face (the paper's Fig. 5).

    ``raw`` is the map at the final feature map's resolution: for ``cam`` the classifier-weighted sum of the
    final feature maps, ``sum_c W[k, c] F[c]`` (its spatial mean is the class logit minus the bias); for
    ``gradcam`` ``ReLU(sum_c mean(dY_k/dA_c) A_c)`` on the chosen layer. ``heatmap`` is ``raw`` min-max
    scaled to [0, 1] and upsampled (bilinear) to ``region``, the part of the image the network saw (the face
    crop after the centre crop of its preprocessing); ``overlay`` is that region with the JET-coloured heatmap
    blended in.
    """

    method: str
    class_index: int
    label: str
    raw: np.ndarray
    heatmap: np.ndarray
    region: Box
    overlay: np.ndarray

    def save(self, path: Union[str, Path]) -> Path:
        """Write the overlay as an image file (PNG by the suffix)."""
        Image.fromarray(self.overlay).save(path)
        return Path(path)


@dataclass
class FaceResult:
    """One face: where it is, how sure the detector was, and the expression probabilities by class name."""

    box: Box  # x, y, width, height in the original image's pixels (the detector's box)
    detection_score: Optional[float]  # None for boxes given by the caller
    crop_box: Box  # the square crop with margin around ``box``, clipped at the border: what was classified
    label: str
    score: float  # probability of ``label``
    probabilities: Dict[str, float]  # every class, in ``label_names`` order
    label_names: Tuple[str, ...]  # output index i of the model is label_names[i]
    attention: Optional[AttentionMap] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: box, detection score, label, score, probabilities and the index order."""
        return {
            "box": list(self.box),
            "detection_score": self.detection_score,
            "crop_box": list(self.crop_box),
            "label": self.label,
            "score": self.score,
            "probabilities": dict(self.probabilities),
            "label_names": list(self.label_names),
        }


@dataclass
class ImageResult:
    """The faces of one image (or video frame); iterating gives the :class:`FaceResult` s."""

    faces: List[FaceResult]
    width: int
    height: int
    skipped: List[Detection] = field(default_factory=list)  # detections below the minimum face size
    source: Optional[str] = None  # file name, when the image came from one
    frame: Optional[int] = None  # frame index, for video

    def __len__(self) -> int:
        return len(self.faces)

    def __iter__(self) -> Iterator[FaceResult]:
        return iter(self.faces)

    def __getitem__(self, index: int) -> FaceResult:
        return self.faces[index]
