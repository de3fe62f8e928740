"""Video frames through OpenCV, as RGB arrays, every N-th frame."""

from pathlib import Path
from typing import Iterator, Tuple, Union

import numpy as np

from .detect import import_cv2

__all__ = ["VIDEO_SUFFIXES", "UnreadableVideoError", "open_video", "read_frames"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


class UnreadableVideoError(ValueError):
    """A video file OpenCV cannot open or decode."""


def open_video(path: Union[str, Path]) -> Tuple[object, int]:
    """An opened ``cv2.VideoCapture`` and its frame count (0 when the container does not say)."""
    cv2 = import_cv2("Reading videos")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise UnreadableVideoError(f"{path} cannot be opened as a video (missing, corrupt or an unknown codec).")
    return capture, max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))


def read_frames(path: Union[str, Path], every: int = 1) -> Iterator[Tuple[int, np.ndarray]]:
    """``(frame index, RGB uint8 frame)`` for frames 0, every, 2 * every, ...; raises if no frame decodes."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}.")
    cv2 = import_cv2("Reading videos")
    capture, _ = open_video(path)
    try:
        index, decoded = 0, 0
        while capture.grab():
            if index % every == 0:
                ok, frame = capture.retrieve()
                if ok:
                    decoded += 1
                    yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
        if decoded == 0:
            raise UnreadableVideoError(f"{path}: no frame could be decoded.")
    finally:
        capture.release()
