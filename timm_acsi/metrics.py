"""Classification metrics for FER: overall, mean-class and per-class accuracy from a confusion matrix.

Everything is computed from one integer confusion matrix (rows = true class, columns = predicted class),
so results from several processes combine exactly by summing their matrices. FER test sets are
imbalanced (RAF-DB: happiness is 39% of the test set), which is why the mean-class (balanced) accuracy is
reported next to the overall accuracy.
"""

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import atomic_write

__all__ = [
    "confusion_matrix",
    "accuracy",
    "per_class_accuracy",
    "mean_class_accuracy",
    "compute_metrics",
    "save_metrics",
    "load_metrics",
    "format_metrics",
    "plot_confusion_matrix",
]

PathLike = Union[str, os.PathLike]


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` int64 counts: entry ``[t, p]`` = samples of true class t predicted as p."""
    targets = targets.reshape(-1).to(torch.int64)
    preds = preds.reshape(-1).to(targets.device, torch.int64)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"Targets must lie in [0, {num_classes}); got {int(targets.min())}..{int(targets.max())}.")
    flat = targets * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(cm: torch.Tensor) -> float:
    """Fraction of all samples classified correctly (0.0 for an empty matrix)."""
    total = int(cm.sum())
    return int(cm.diagonal().sum()) / total if total else 0.0


def per_class_accuracy(cm: torch.Tensor) -> List[float]:
    """Recall of each class; NaN for a class without samples (it has no accuracy to report)."""
    support = cm.sum(dim=1)
    return [int(c) / int(n) if int(n) else math.nan for c, n in zip(cm.diagonal(), support)]


def mean_class_accuracy(cm: torch.Tensor) -> float:
    """Mean of the per-class accuracies over the classes that have samples (balanced accuracy)."""
    values = [v for v in per_class_accuracy(cm) if not math.isnan(v)]
    return sum(values) / len(values) if values else 0.0


def compute_metrics(cm: torch.Tensor, label_names: Sequence[str], dataset: str = "", split: str = "") -> Dict[str, Any]:
    """All metrics in the ``metrics.json`` schema read by ``timm-acsi publish``.

    ``per_class_accuracy`` maps each label name to its accuracy; a class absent from the split maps to
    ``None`` (JSON ``null``): it has no accuracy, and it is left out of the mean-class accuracy.
    """
    if cm.shape != (len(label_names), len(label_names)):
        raise ValueError(f"Confusion matrix of shape {tuple(cm.shape)} does not match {len(label_names)} label names.")
    per_class = per_class_accuracy(cm)
    return {
        "dataset": str(dataset),
        "split": str(split),
        "accuracy": accuracy(cm),
        "mean_class_accuracy": mean_class_accuracy(cm),
        "per_class_accuracy": {n: (None if math.isnan(v) else v) for n, v in zip(label_names, per_class)},
        "confusion_matrix": [[int(x) for x in row] for row in cm.tolist()],
        "label_names": list(label_names),
        "num_samples": int(cm.sum()),
    }


def save_metrics(path: PathLike, metrics: Dict[str, Any]) -> Path:
    """Write ``metrics`` as indented JSON, atomically."""
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return Path(path)


def load_metrics(path: PathLike) -> Dict[str, Any]:
    """Read a ``metrics.json`` file."""
    return json.loads(Path(path).read_text())


def format_metrics(metrics: Dict[str, Any]) -> str:
    """Human-readable summary: headline numbers, per-class accuracy and the confusion matrix."""
    names = metrics["label_names"]
    width = max(8, max(len(n) for n in names) + 1)
    lines = [
        f"{metrics['dataset'] or 'dataset'} [{metrics['split']}]: {metrics['num_samples']} images, "
        f"accuracy {100 * metrics['accuracy']:.2f}%, mean-class accuracy {100 * metrics['mean_class_accuracy']:.2f}%",
        "per-class accuracy:",
    ]
    for name in names:
        value = metrics["per_class_accuracy"][name]
        lines.append(f"  {name:<{width}} {'n/a' if value is None else f'{100 * value:6.2f}%'}")
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(" " * (width + 2) + "".join(f"{n[:7]:>8}" for n in names))
    for name, row in zip(names, metrics["confusion_matrix"]):
        lines.append(f"  {name:<{width}}" + "".join(f"{v:>8d}" for v in row))
    return "\n".join(lines)


def _blues(t: float) -> tuple:
    """White -> dark blue colour ramp for a cell filled to fraction ``t`` in [0, 1]."""
    lo, hi = (247, 251, 255), (8, 48, 107)
    return tuple(round(a + (b - a) * t) for a, b in zip(lo, hi))


def plot_confusion_matrix(
    cm: Union[torch.Tensor, Sequence[Sequence[int]]],
    label_names: Sequence[str],
    path: PathLike,
    title: Optional[str] = None,
    cell: int = 72,
) -> Path:
    """Draw the row-normalised confusion matrix as a PNG heat map with counts and percentages.

    Drawn with Pillow (a torchvision dependency, so always installed) rather than matplotlib, which
    timm-acsi does not depend on. Cells are coloured by the fraction of the true class (row) they hold.
    """
    from PIL import Image, ImageDraw, ImageFont

    cm = torch.as_tensor(cm, dtype=torch.int64)
    n = len(label_names)
    if cm.shape != (n, n):
        raise ValueError(f"Confusion matrix of shape {tuple(cm.shape)} does not match {n} label names.")
    font = ImageFont.load_default(size=max(10, cell // 6))
    small = ImageFont.load_default(size=max(8, cell // 8))

    def text_size(text: str, f: ImageFont.FreeTypeFont) -> Tuple[float, float]:
        left, top, right, bottom = f.getbbox(text)
        return right - left, bottom - top

    label_w = max(text_size(name, font)[0] for name in label_names) + 16
    title = title or "Confusion matrix"
    title_h = text_size(title, font)[1] + 20
    axis_h = text_size("predicted", font)[1] + 12
    left, top = label_w + axis_h, title_h + axis_h
    width, height = left + n * cell + 16, top + n * cell + label_w + 8
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)

    draw.text((width // 2, 10), title, fill="black", font=font, anchor="mt")
    draw.text((left + n * cell // 2, title_h), "predicted", fill="black", font=font, anchor="mt")
    rows = cm.sum(dim=1).clamp(min=1)
    for i in range(n):
        for j in range(n):
            frac = float(cm[i, j]) / float(rows[i])
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=_blues(frac), outline=(200, 200, 200))
            ink = "white" if frac > 0.5 else "black"
            cx, cy = x0 + cell // 2, y0 + cell // 2
            draw.text((cx, cy - 2), f"{int(cm[i, j])}", fill=ink, font=font, anchor="mb")
            draw.text((cx, cy + 2), f"{100 * frac:.0f}%", fill=ink, font=small, anchor="mt")
        draw.text((left - 8, top + i * cell + cell // 2), label_names[i], fill="black", font=font, anchor="rm")
    for j, name in enumerate(label_names):  # column labels, rotated to read bottom-up
        w, h = text_size(name, font)
        label = Image.new("RGBA", (w + 4, h + 8), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((0, 0), name, fill="black", font=font, anchor="lt")
        label = label.rotate(90, expand=True)
        img.paste(label, (left + j * cell + (cell - label.width) // 2, top + n * cell + 6), label)
    # "true" axis title, rotated, left of the row labels
    w, h = text_size("true", font)
    axis = Image.new("RGBA", (w + 4, h + 8), (255, 255, 255, 0))
    ImageDraw.Draw(axis).text((0, 0), "true", fill="black", font=font, anchor="lt")
    axis = axis.rotate(90, expand=True)
    img.paste(axis, (4, top + (n * cell - axis.height) // 2), axis)

    def write(tmp: str) -> None:
        img.save(tmp, format="PNG")

    atomic_write(path, write)
    return Path(path)
