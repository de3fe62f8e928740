"""FER dataset readers (folder, RAF-DB, AffectNet) and the paper's transforms."""

from .datasets import LAYOUTS, FERDataset, UnreadableImageError, build_dataset, detect_layout
from .transforms import RandomTenCrop, create_fer_transform

__all__ = [
    "LAYOUTS",
    "FERDataset",
    "UnreadableImageError",
    "build_dataset",
    "detect_layout",
    "RandomTenCrop",
    "create_fer_transform",
]
