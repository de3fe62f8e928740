"""Pooled-feature embeddings of expression models: t-SNE maps and silhouette scores (the paper's Fig. 4).

For each model, the pooled features (``forward_head(forward_features(x), pre_logits=True)``: the global
average pool, the vector the classifier reads) of a dataset split are extracted with each model's own
evaluation preprocessing, projected to 2-D with scikit-learn's t-SNE (``init="pca"``, fixed seed) and scored
with the silhouette of the true classes, both in the feature space and in the 2-D map. Silhouettes use
Euclidean distance: in the feature space that is the distance t-SNE itself reads (its neighbour affinities),
so the two numbers measure the same thing before and after the projection; the silhouette is invariant to a
global scale, so models whose features differ in magnitude compare fairly. :func:`plot_embeddings` draws the
maps side by side with Pillow.

scikit-learn is an optional dependency: ``pip install "timm-acsi[embed]"``.
"""

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .data import create_fer_transform
from .extras import import_extra
from .labels import canonical_label
from .sources import LoadedModel

__all__ = [
    "CLASS_COLOURS",
    "Embedding",
    "eval_transform",
    "require_sklearn",
    "limited_threads",
    "check_model_labels",
    "check_perplexity",
    "check_classes",
    "stratified_indices",
    "extract_features",
    "tsne_2d",
    "silhouette",
    "embed_model",
    "plot_embeddings",
]

#: Distance the silhouettes use, in the feature space and in the 2-D map (see the module docstring).
SILHOUETTE_METRIC = "euclidean"

#: A fixed colour per canonical class (Tableau 10: distinct, readable on white), keyed by name so a class has
#: the same colour in every figure whatever the dataset's class count.
CLASS_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "anger": (214, 39, 40),  # red
    "disgust": (44, 160, 44),  # green
    "fear": (148, 103, 189),  # purple
    "happiness": (255, 127, 14),  # orange
    "sadness": (31, 119, 180),  # blue
    "surprise": (227, 119, 194),  # pink
    "neutral": (127, 127, 127),  # gray
    "contempt": (140, 86, 75),  # brown
}

#: Figure layout, in pixels: a header line (optional figure title), a two-line title over each square panel,
#: and a legend column on the right.
HEADER_HEIGHT = 32
PANEL_TITLE_HEIGHT = 44
LEGEND_WIDTH = 140
POINT_RADIUS = 2
_PAD = 12


def require_sklearn() -> Tuple[ModuleType, ModuleType]:
    """scikit-learn's ``manifold`` and ``metrics`` modules, or :class:`~timm_acsi.extras.MissingExtraError` naming
    the embed extra."""
    import_extra("sklearn", "embed", "Computing t-SNE maps and silhouettes")
    from sklearn import manifold, metrics

    return manifold, metrics


@contextmanager
def limited_threads(threads: Optional[int]) -> Iterator[None]:
    """At most ``threads`` CPU threads for torch and for scikit-learn's OpenMP and BLAS pools (threadpoolctl,
    a scikit-learn dependency); ``None`` leaves them as they are.

    On a CPU shared with other jobs, OpenMP threads waiting on each other make t-SNE tens of times slower
    (measured on 2 busy cores, 28 faces: 8 s with one thread, over 200 s with two).
    """
    if threads is None:
        yield
        return
    require_sklearn()  # threadpoolctl comes with scikit-learn: without it, name the extra
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Embedding:
    """One model's view of a dataset split: its 2-D t-SNE map and how well the true classes cluster."""

    name: str  # panel title, e.g. "acsinet18"
    source: str  # the model source it was loaded from
    labels: np.ndarray  # [N] canonical class index of each point
    points: np.ndarray  # [N, 2] t-SNE coordinates
    feature_dim: int
    silhouette_features: float  # in the pooled-feature space (SILHOUETTE_METRIC distance)
    silhouette_2d: float  # in the t-SNE map
    seconds: float = 0.0  # features + t-SNE + silhouettes
    features: Optional[np.ndarray] = field(default=None, repr=False)  # [N, feature_dim]; not saved by to_dict

    def to_dict(self, decimals: int = 4) -> Dict[str, Any]:
        """JSON form (points rounded to ``decimals``), enough to redraw the figure with :meth:`from_dict`."""
        return {
            "name": self.name,
            "source": self.source,
            "samples": len(self.labels),
            "feature_dim": self.feature_dim,
            "silhouette_features": self.silhouette_features,
            "silhouette_2d": self.silhouette_2d,
            "silhouette_metric": SILHOUETTE_METRIC,
            "seconds": round(self.seconds, 2),
            "labels": [int(t) for t in self.labels],
            "points": np.round(self.points.astype(np.float64), decimals).tolist(),
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Embedding":
        """The embedding :meth:`to_dict` wrote (without its features), e.g. to redraw a figure from ``--json``."""
        labels = np.asarray(data["labels"], dtype=np.int64)
        points = np.asarray(data["points"], dtype=np.float64).reshape(-1, 2)
        if len(labels) != len(points):
            raise ValueError(
                f"{data['name']}: {len(labels)} labels but {len(points)} points; the record is damaged, "
                "write it again with timm-acsi embed --json."
            )
        return cls(
            name=data["name"],
            source=data["source"],
            labels=labels,
            points=points,
            feature_dim=int(data["feature_dim"]),
            silhouette_features=float(data["silhouette_features"]),
            silhouette_2d=float(data["silhouette_2d"]),
            seconds=float(data.get("seconds", 0.0)),
        )


# ------------------------------------------------------------------------------------------------ inputs


def eval_transform(loaded: LoadedModel) -> Callable:
    """The evaluation transform ``loaded`` was trained with, from its data config.

    It is :func:`~timm_acsi.data.create_fer_transform`: faces squashed to ``round(size / crop_pct)`` square
    (training resized to ``resize`` and recorded ``crop_pct = size / resize``; ``round`` inverts that exactly,
    where timm's ``floor`` can fall one pixel short), centre crop, and grayscale replicated to 3 channels for
    grayscale models. On square faces it equals timm's own eval transform for the same config. Resizing is
    bilinear, as in training; a config asking for another interpolation was not trained by timm-acsi and is
    refused rather than silently fed differently.
    """
    config = loaded.data_config
    if config.get("interpolation", "bilinear") != "bilinear":
        raise ValueError(
            f"{loaded.source}: its data config asks for {config['interpolation']!r} interpolation, but timm-acsi "
            "preprocesses faces as it trains them (bilinear). Pass a model trained by timm-acsi."
        )
    img_size = int(config["input_size"][-1])
    return create_fer_transform(
        False,
        img_size=img_size,
        resize=round(img_size / float(config.get("crop_pct") or 1.0)),
        mean=config["mean"],
        std=config["std"],
        grayscale=loaded.grayscale,
    )


def check_model_labels(loaded: LoadedModel, dataset_labels: Sequence[str]) -> None:
    """Refuse a model whose classes are not the dataset's (by canonical name, any order).

    Points are coloured by the dataset's classes; a model that lacks one of them (or knows one the split
    cannot contain) was trained on another label set, and its map would not be comparable.
    """
    model_names = {canonical_label(n) for n in loaded.label_names}
    if model_names != set(dataset_labels):
        differences = [
            f"{what} {', '.join(sorted(names))}"
            for what, names in (
                ("only the dataset has", set(dataset_labels) - model_names),
                ("only the model has", model_names - set(dataset_labels)),
            )
            if names
        ]
        raise ValueError(
            f"{loaded.source} classifies {', '.join(loaded.label_names)}, but the dataset's classes are "
            f"{', '.join(dataset_labels)} ({'; '.join(differences)}). Pass a model trained on this label set, or "
            "a dataset with its classes."
        )


def stratified_indices(targets: Sequence[int], max_samples: Optional[int], seed: int = 0) -> List[int]:
    """Sorted indices of at most ``max_samples`` samples drawn per class in the split's class proportions.

    Each class gets its share ``max_samples * n_class / n`` rounded by largest remainder (so the shares sum to
    ``max_samples`` exactly); the samples within a class are drawn without replacement with ``seed``. Every
    model of a comparison gets the same indices. ``None`` (or at least ``len(targets)``) keeps everything.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if max_samples is None or max_samples >= len(targets):
        return list(range(len(targets)))
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}.")
    classes, counts = np.unique(targets, return_counts=True)
    shares = max_samples * counts / len(targets)
    take = np.floor(shares).astype(np.int64)
    remainders = shares - take
    extra = np.argsort(-remainders, kind="stable")[: max_samples - int(take.sum())]
    take[extra] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(targets == c), size=k, replace=False) for c, k in zip(classes, take)]
    return sorted(int(i) for i in np.concatenate(chosen))


# ----------------------------------------------------------------------------------------------- features


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    workers: int = 0,
    progress: Optional[Callable[[int], Any]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Pooled (pre-logits) features and labels of every sample of ``dataset`` (``(tensor, label)`` items).

    Returns float32 ``[N, D]`` features and int64 ``[N]`` labels, in dataset order. Batches go to the model's
    device; ``progress`` (e.g. ``tqdm(...).update``) is called with the size of each finished batch.
    """
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    model.eval()
    features, labels = [], []
    for images, targets in loader:
        pooled = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
        features.append(pooled.float().cpu().numpy())
        labels.append(np.asarray(targets, dtype=np.int64))
        if progress is not None:
            progress(len(targets))
    if not features:
        raise ValueError("The dataset is empty: there are no features to extract.")
    return np.concatenate(features), np.concatenate(labels)


def check_perplexity(perplexity: float, n_samples: int) -> None:
    """t-SNE needs ``0 < perplexity < n_samples`` (about the number of neighbours each point weighs)."""
    if not 0 < perplexity < n_samples:
        raise ValueError(
            f"t-SNE perplexity {perplexity} must be above 0 and below the number of samples ({n_samples}): lower "
            "--perplexity or use more samples (--max-samples)."
        )


def check_classes(labels: Sequence[int]) -> None:
    """A silhouette needs between 2 and ``n - 1`` classes among ``n`` samples."""
    present = len(np.unique(np.asarray(labels)))
    if not 2 <= present <= len(labels) - 1:
        raise ValueError(
            f"A silhouette needs 2 to n-1 classes among n samples; got {present} class(es) in {len(labels)} "
            "samples. Use more samples (--max-samples) or a split holding several classes."
        )


def tsne_2d(features: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """scikit-learn t-SNE of ``features`` to ``[N, 2]`` (PCA initialisation, ``seed``: reproducible)."""
    manifold, _ = require_sklearn()
    check_perplexity(perplexity, len(features))
    tsne = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(np.asarray(features, dtype=np.float32)).astype(np.float64)


def silhouette(points: np.ndarray, labels: np.ndarray, metric: str = SILHOUETTE_METRIC) -> float:
    """Mean silhouette of the true classes (scikit-learn ``silhouette_score``): +1 tight, separated classes;
    0 overlapping; negative, points nearer another class than their own."""
    _, metrics = require_sklearn()
    check_classes(labels)
    return float(metrics.silhouette_score(points, labels, metric=metric))


def embed_model(
    loaded: LoadedModel,
    dataset: Dataset,
    indices: Optional[Sequence[int]] = None,
    *,
    name: Optional[str] = None,
    perplexity: float = 30.0,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    progress: Optional[Callable[[int], Any]] = None,
    threads: Optional[int] = None,
) -> Embedding:
    """Features (with the model's own preprocessing), t-SNE map and silhouettes of ``loaded`` on ``dataset``.

    ``dataset`` is a :class:`~timm_acsi.data.FERDataset` (its ``transform`` is replaced, on a copy, by
    :func:`eval_transform`); ``indices`` selects the samples (e.g. :func:`stratified_indices`); ``threads``
    caps the CPU threads of every step (:func:`limited_threads`).
    """
    check_model_labels(loaded, dataset.label_names)
    start = time.perf_counter()
    view = copy.copy(dataset)
    view.transform = eval_transform(loaded)
    if indices is not None:
        view = Subset(view, list(indices))
    with limited_threads(threads):
        features, labels = extract_features(loaded.model, view, batch_size, workers, progress)
        points = tsne_2d(features, perplexity, seed)
        scores = silhouette(features, labels), silhouette(points, labels)
    return Embedding(
        name=name or loaded.architecture,
        source=loaded.source,
        labels=labels,
        points=points,
        feature_dim=features.shape[1],
        silhouette_features=scores[0],
        silhouette_2d=scores[1],
        seconds=time.perf_counter() - start,
        features=features,
    )


# ------------------------------------------------------------------------------------------------- figure


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw_panel(
    img: Image.Image, embedding: Embedding, label_names: Sequence[str], left: int, top: int, size: int, seed: int
) -> None:
    """One model: a two-line title (name; silhouettes) over a framed square of its points coloured by class,
    drawn in a seeded random order so that no class is always painted over the others."""
    draw = ImageDraw.Draw(img)
    centre = left + size // 2
    draw.text((centre, top + 4), embedding.name, fill="black", font=_font(16), anchor="mt")
    scores = f"silhouette: features {embedding.silhouette_features:.3f} | 2-D {embedding.silhouette_2d:.3f}"
    draw.text((centre, top + 24), scores, fill=(60, 60, 60), font=_font(12), anchor="mt")
    box_top = top + PANEL_TITLE_HEIGHT
    x0, y0, x1, y1 = left + _PAD, box_top + _PAD // 2, left + size - _PAD, box_top + size - _PAD
    draw.rectangle([x0, y0, x1, y1], outline=(180, 180, 180))
    points = np.asarray(embedding.points, dtype=np.float64)
    if not len(points):
        return
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    inner = POINT_RADIUS + 4
    scale = np.array([x1 - x0 - 2 * inner, y1 - y0 - 2 * inner]) / span
    xy = (points - low) * scale + np.array([x0 + inner, y0 + inner])
    xy[:, 1] = (y0 + y1) - xy[:, 1]  # t-SNE's y axis points up
    colours = [CLASS_COLOURS[name] for name in label_names]
    r = POINT_RADIUS
    for i in np.random.default_rng(seed).permutation(len(points)):
        x, y = xy[i]
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colours[embedding.labels[i]])


def _draw_legend(img: Image.Image, label_names: Sequence[str], left: int, top: int) -> None:
    draw = ImageDraw.Draw(img)
    font = _font(14)
    for i, name in enumerate(label_names):
        y = top + i * 24
        draw.rectangle([left, y, left + 14, y + 14], fill=CLASS_COLOURS[name])
        draw.text((left + 22, y + 7), name, fill="black", font=font, anchor="lm")


def plot_embeddings(
    embeddings: Sequence[Embedding],
    label_names: Sequence[str],
    title: Optional[str] = None,
    panel_size: int = 480,
    seed: int = 0,
) -> Image.Image:
    """The t-SNE maps side by side, one ``panel_size`` square per model, with a class legend on the right.

    Point colours come from :data:`CLASS_COLOURS` by canonical class name (``label_names[label]``). The image
    is ``len(embeddings) * panel_size + LEGEND_WIDTH`` wide and ``panel_size + PANEL_TITLE_HEIGHT`` high, plus
    ``HEADER_HEIGHT`` with a ``title``. Drawn with Pillow (no matplotlib dependency); saving is the caller's.
    """
    if not embeddings:
        raise ValueError("No embeddings to plot: pass at least one model's embedding.")
    unknown = [n for n in label_names if n not in CLASS_COLOURS]
    if unknown:
        raise ValueError(
            f"No colour for class(es) {unknown}: label_names must be canonical ({', '.join(CLASS_COLOURS)})."
        )
    out_of_range = [e.name for e in embeddings if len(e.labels) and int(np.max(e.labels)) >= len(label_names)]
    if out_of_range:
        raise ValueError(f"{', '.join(out_of_range)}: labels beyond the {len(label_names)} label names given.")
    legend_height = 24 * len(label_names)
    if panel_size < max(120, legend_height):
        raise ValueError(f"panel_size {panel_size} is too small: use at least {max(120, legend_height)} pixels.")
    header = HEADER_HEIGHT if title else 0
    width = len(embeddings) * panel_size + LEGEND_WIDTH
    img = Image.new("RGB", (width, header + PANEL_TITLE_HEIGHT + panel_size), "white")
    if title:
        ImageDraw.Draw(img).text((width // 2, 8), title, fill="black", font=_font(16), anchor="mt")
    for k, embedding in enumerate(embeddings):
        _draw_panel(img, embedding, label_names, k * panel_size, header, panel_size, seed)
    _draw_legend(img, label_names, len(embeddings) * panel_size + 8, header + PANEL_TITLE_HEIGHT + _PAD)
    return img
