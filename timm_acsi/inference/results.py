"""What the recognizer returns: one :class:`FaceResult` per face, grouped in an :class:`ImageResult` per image;
and the flat table of them (one row per face) that the predictor's JSON, CSV and printed table share."""

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .detect import Detection

__all__ = ["AttentionMap", "FaceResult", "ImageResult", "CSV_COLUMNS", "face_rows", "to_csv"]

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


#: The CSV's leading columns; one column per class (its probability) follows, in ``label_names`` order.
CSV_COLUMNS = ("file", "frame", "face", "x", "y", "w", "h", "detection_score", "label", "score")


def face_rows(results: Iterable[Tuple[str, ImageResult]]) -> List[Dict[str, Any]]:
    """One row per face of ``(file, result)`` pairs, and one row with ``face: None`` per image or frame without
    a face (so that every input shows up)."""
    out = []
    for file, result in results:
        base = {"file": file, "frame": result.frame}
        if not result.faces:
            out.append({**base, "face": None, "box": None, "detection_score": None, "label": None, "score": None})
        for i, face in enumerate(result.faces):
            out.append(
                {
                    **base,
                    "face": i,
                    "box": list(face.box),
                    "detection_score": face.detection_score,
                    "label": face.label,
                    "score": face.score,
                    "probabilities": dict(face.probabilities),
                }
            )
    return out


def to_csv(results: Iterable[Tuple[str, ImageResult]], label_names: Sequence[str]) -> str:
    """The rows of :func:`face_rows` as CSV: :data:`CSV_COLUMNS`, then one probability column per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *label_names])
    for row in face_rows(results):
        box = row["box"] or [None] * 4
        probs = [row["probabilities"][n] for n in label_names] if row["face"] is not None else [None] * len(label_names)
        values = [row["file"], row["frame"], row["face"], *box, row["detection_score"], row["label"], row["score"]]
        writer.writerow(["" if v is None else v for v in values + probs])
    return buffer.getvalue()
