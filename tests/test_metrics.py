"""Metrics: exact values on hand-computed confusion matrices, the metrics.json schema, the PNG plot."""

import json
import math

import pytest
import torch
from PIL import Image

from timm_acsi.labels import FER7_LABELS
from timm_acsi.metrics import (
    accuracy,
    compute_metrics,
    confusion_matrix,
    format_metrics,
    load_metrics,
    mean_class_accuracy,
    per_class_accuracy,
    plot_confusion_matrix,
    save_metrics,
)

SCHEMA_KEYS = {
    "dataset",
    "split",
    "accuracy",
    "mean_class_accuracy",
    "per_class_accuracy",
    "confusion_matrix",
    "label_names",
    "num_samples",
}


def test_confusion_matrix_counts_true_rows_predicted_columns():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(targets, preds, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cm.dtype == torch.int64


def test_confusion_matrix_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 0]), 3)


def test_accuracies_exact():
    # imbalanced: class 0 has 8 samples (6 right), class 1 has 2 (1 right), class 2 has 0
    cm = torch.tensor([[6, 2, 0], [1, 1, 0], [0, 0, 0]])
    assert accuracy(cm) == pytest.approx(7 / 10)
    per_class = per_class_accuracy(cm)
    assert per_class[:2] == [pytest.approx(0.75), pytest.approx(0.5)]
    assert math.isnan(per_class[2])
    assert mean_class_accuracy(cm) == pytest.approx((0.75 + 0.5) / 2)  # the empty class is left out
    assert accuracy(torch.zeros(3, 3, dtype=torch.int64)) == 0.0


def test_compute_metrics_schema_and_values():
    cm = torch.diag(torch.arange(1, 8))
    cm[6, 0] = 7  # neutral: 7 right, 7 taken for anger
    m = compute_metrics(cm, FER7_LABELS, "RAF-DB", "test")
    assert set(m) == SCHEMA_KEYS
    assert m["dataset"] == "RAF-DB" and m["split"] == "test"
    assert m["num_samples"] == 28 + 7
    assert m["accuracy"] == pytest.approx(28 / 35)
    assert m["per_class_accuracy"] == {**{n: 1.0 for n in FER7_LABELS[:6]}, "neutral": 0.5}
    assert m["mean_class_accuracy"] == pytest.approx(6.5 / 7)
    assert m["label_names"] == list(FER7_LABELS)
    assert m["confusion_matrix"][6] == [7, 0, 0, 0, 0, 0, 7]
    assert all(isinstance(v, int) for row in m["confusion_matrix"] for v in row)
    json.dumps(m, allow_nan=False)  # strict JSON


def test_absent_class_is_null_not_nan():
    cm = torch.zeros(7, 7, dtype=torch.int64)
    cm[0, 0] = 3
    m = compute_metrics(cm, FER7_LABELS)
    assert m["per_class_accuracy"]["anger"] == 1.0
    assert m["per_class_accuracy"]["neutral"] is None
    assert m["mean_class_accuracy"] == 1.0
    json.dumps(m, allow_nan=False)


def test_compute_metrics_rejects_wrong_label_count():
    with pytest.raises(ValueError, match="7 label names"):
        compute_metrics(torch.zeros(8, 8, dtype=torch.int64), FER7_LABELS)


def test_save_load_and_format(tmp_path):
    cm = torch.eye(7, dtype=torch.int64) * 2
    m = compute_metrics(cm, FER7_LABELS, "AffectNet", "val")
    path = save_metrics(tmp_path / "sub" / "metrics.json", m)
    assert load_metrics(path) == m
    text = format_metrics(m)
    assert "accuracy 100.00%" in text and "mean-class accuracy 100.00%" in text
    assert "happiness  100.00%" in text


def test_publish_reads_metrics_json(tmp_path):
    hub = pytest.importorskip("timm_acsi.hub")
    cm = torch.eye(7, dtype=torch.int64) * 4
    cm[0, 0], cm[0, 1] = 2, 2
    path = save_metrics(tmp_path / "metrics.json", compute_metrics(cm, FER7_LABELS, "RAF-DB", "test"))
    read = hub.load_eval_metrics(path, FER7_LABELS)
    assert read.accuracy == pytest.approx(100 * 26 / 28)
    assert read.per_class_accuracy["anger"] == pytest.approx(50.0)
    assert read.num_samples == 28


def test_plot_confusion_matrix_png(tmp_path):
    cm = torch.randint(0, 50, (7, 7), generator=torch.Generator().manual_seed(0))
    path = plot_confusion_matrix(cm, FER7_LABELS, tmp_path / "cm.png", title="test", cell=40)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 7 * 40 and img.height > 7 * 40
    cm = torch.eye(7, dtype=torch.int64) * 5
    plot_confusion_matrix(cm.tolist(), FER7_LABELS, tmp_path / "eye.png", cell=40)
    with Image.open(tmp_path / "eye.png") as img:
        colours = img.convert("RGB")
        width, height = img.size
        # sample a cell corner pixel far from text: full cell -> dark blue, empty cell -> near white
        left, top = _grid_origin(colours, width, height)
        assert colours.getpixel((left + 3, top + 3)) == (8, 48, 107)
        assert colours.getpixel((left + 40 + 3, top + 3)) == (247, 251, 255)
    with pytest.raises(ValueError, match="label names"):
        plot_confusion_matrix(cm[:6, :6], FER7_LABELS, tmp_path / "bad.png")


def _grid_origin(img: Image.Image, width: int, height: int):
    """Top-left pixel of the first dark-blue cell (the [0, 0] cell of an identity matrix)."""
    for y in range(height):
        for x in range(width):
            if img.getpixel((x, y)) == (8, 48, 107):
                return x, y
    raise AssertionError("no full cell found")
