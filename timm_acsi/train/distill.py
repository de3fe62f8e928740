"""Knowledge distillation from trained teachers' soft predictions (Hinton et al. 2015), computed once per run.

The teachers (any model source :func:`~timm_acsi.sources.load_model` reads: a tag such as
``coresnet18.fer2013``, a checkpoint, a run folder or a Hub folder) predict every training face once, before the
first epoch, through the run's evaluation transform: the face as the validation split sees it, and its mirror
image. Their probabilities, averaged over both views and all teachers, become each face's soft target. The
student's augmented views of a face are all matched to that one target: cheap (no teacher forward in the
training loop) and close for the mild crops and flips of a fine-tuning stage. Targets are recomputed, identically,
when a run resumes, and on every process of a distributed run.
"""

import copy
import logging
import math
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..sources import TRAIN_PREPROCESSING, LoadedModel, load_model
from .distributed import DistInfo
from .evaluation import batches

__all__ = ["DistillationLoss", "IndexedDataset", "parse_teachers", "teacher_log_probs"]

_logger = logging.getLogger(__name__)


class IndexedDataset(Dataset):
    """``dataset``'s ``(image, label)`` samples with their index appended, to look up their soft targets."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index


class DistillationLoss(nn.Module):
    """``(1 - alpha) * CE(logits, labels) + alpha * T^2 * KL(teacher_T || student_T)``.

    ``teacher_log_probs`` holds one row of log-probabilities per training sample, looked up by the batch's sample
    indices; both distributions are softened at temperature ``T`` (the ``T^2`` keeps the gradient scale of the
    soft term independent of ``T``). ``alpha = 0`` is plain cross-entropy.
    """

    def __init__(
        self, teacher_log_probs: torch.Tensor, alpha: float, temperature: float = 1.0, label_smoothing: float = 0.0
    ):
        super().__init__()
        self.register_buffer("teacher_log_probs", teacher_log_probs.float(), persistent=False)
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        hard = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        t = self.temperature
        teacher = F.log_softmax(self.teacher_log_probs[index.to(self.teacher_log_probs.device)] / t, dim=1)
        student = F.log_softmax(logits / t, dim=1)
        soft = F.kl_div(student, teacher.to(logits.device), reduction="batchmean", log_target=True) * t * t
        return (1 - self.alpha) * hard + self.alpha * soft


def parse_teachers(teacher: str) -> List[str]:
    """The model sources of a comma-separated ``teacher`` setting."""
    sources = [s.strip() for s in teacher.split(",") if s.strip()]
    if not sources:
        raise ValueError(f"teacher (--teacher) names no model: {teacher!r}. Pass e.g. --teacher coresnet18.fer2013.")
    return sources


@torch.no_grad()
def teacher_log_probs(
    sources: Sequence[str],
    train_set: Dataset,
    eval_transform: Callable,
    img_size: int,
    crop_pct: float,
    grayscale: bool,
    info: DistInfo,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = False,
    log: bool = True,
) -> torch.Tensor:
    """Log of the teachers' mean probability of each class (in ``train_set.label_names`` order) for each
    training sample, seen through ``eval_transform`` and its mirror image. Teachers are matched to the run's
    classes by name; a teacher's extra classes are dropped and its probabilities renormalised."""
    label_names = tuple(train_set.label_names)
    view = copy.copy(train_set)  # same samples, evaluation transform
    view.transform = eval_transform
    loader = DataLoader(view, batch_size=batch_size, num_workers=workers)
    total = torch.zeros(len(view), len(label_names), dtype=torch.float64)
    for source in sources:
        teacher = load_model(source, info.device)
        columns = _teacher_columns(teacher, label_names, img_size, crop_pct, grayscale)
        probs = _predict(teacher, loader, columns, info, progress)
        if log:
            _logger.info(f"Teacher {source}: {100 * _accuracy(probs, view):.2f}% of the training faces right.")
        total += probs.double()
    mean = total / len(sources)
    if log and len(sources) > 1:
        _logger.info(f"Teachers' mean: {100 * _accuracy(mean, view):.2f}% of the training faces right.")
    return mean.clamp_min(1e-12).log().float()


def _teacher_columns(
    teacher: LoadedModel, label_names: Tuple[str, ...], img_size: int, crop_pct: float, grayscale: bool
) -> List[int]:
    """The teacher output of each run class; a teacher fed otherwise than it was trained, or missing a class, raises."""
    cfg = teacher.data_config
    found = []
    if teacher.grayscale != grayscale:
        found.append(f"it was trained on {'grayscale' if teacher.grayscale else 'colour'} faces, the run's are not")
    if cfg["input_size"][-1] != img_size:
        found.append(f"it takes {cfg['input_size'][-1]} px faces, the run {img_size} px")
    elif not math.isclose(cfg["crop_pct"], crop_pct, abs_tol=1e-6):
        found.append(
            f"it was evaluated on a centre crop of crop_pct {cfg['crop_pct']:.4g}, the run's faces are cropped at "
            f"{crop_pct:.4g} (--img-size / --resize)"
        )
    if any(tuple(cfg[k]) != tuple(TRAIN_PREPROCESSING[k]) for k in ("mean", "std")):
        found.append(f"it normalises with mean {cfg['mean']} / std {cfg['std']}, the run with ImageNet's")
    missing = [n for n in label_names if n not in teacher.label_names]
    if missing:
        found.append(f"it has no output for {', '.join(missing)} (its classes: {', '.join(teacher.label_names)})")
    if found:
        raise ValueError(
            f"Teacher {teacher.source} cannot teach this run: {'; '.join(found)}. Use a teacher trained with the "
            "run's classes, face size, crop and colour (--img-size, --resize, --grayscale)."
        )
    return [teacher.label_names.index(n) for n in label_names]


def _predict(teacher: LoadedModel, loader: DataLoader, columns: List[int], info: DistInfo, progress: bool):
    """The teacher's probabilities of the run's classes on each sample, averaged with its mirror image."""
    out = []
    bar = tqdm(total=len(loader.dataset), unit="img", desc=f"teacher {teacher.source}", disable=not progress)
    for x, _ in batches(loader):
        x = x.to(info.device)
        p = (teacher.model(x).softmax(1) + teacher.model(x.flip(3)).softmax(1)) / 2
        p = p[:, columns]
        out.append((p / p.sum(1, keepdim=True)).cpu())
        bar.update(len(x))
    bar.close()
    return torch.cat(out)


def _accuracy(probs: torch.Tensor, dataset) -> float:
    return float((probs.argmax(1) == torch.as_tensor(dataset.targets)).double().mean())
