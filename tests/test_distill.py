"""Knowledge distillation: the loss, the teachers' soft targets (matched by class name) and runs with a teacher.

Teachers are tiny-input CoResNet-18 checkpoints written by the tests, on the 32 px synthetic faces of
tests/fer_fixtures.py (28 px crops, as tests/test_train.py trains).
"""

import dataclasses
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from fer_fixtures import make_folder_dataset
from safetensors.torch import load_file

from timm_acsi.checkpoint import read_checkpoint_meta, save_checkpoint
from timm_acsi.data import build_dataset, create_fer_transform
from timm_acsi.labels import FER7_LABELS
from timm_acsi.train import DistInfo, TrainConfig, config_hash, load_config_file, train
from timm_acsi.train.distill import DistillationLoss, IndexedDataset, parse_teachers, teacher_log_probs

TINY = dict(img_size=28, resize=32, batch_size=7, workers=0, epochs=1, lr=0.02, deterministic=True)
CPU = DistInfo(0, 1, 0, torch.device("cpu"))
#: config_hash(TrainConfig()) before the distillation settings existed: runs without a teacher keep their hash
REVERSED = tuple(reversed(FER7_LABELS))  # a teacher whose outputs are in another order than the run's
HASH_BEFORE_DISTILLATION = "ff84e41f89716e35a82204776197ffede5bee6ab483dcd5b32e84e394571d81d"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "fer", per_class=6, size=32)


def _teacher(path: Path, label_names=REVERSED, seed: int = 0, **meta) -> Path:
    """A CoResNet-18 checkpoint with random weights whose outputs are ``label_names``."""
    torch.manual_seed(seed)
    model = timm.create_model("coresnet18", num_classes=len(label_names))
    description = dict(
        architecture="coresnet18",
        num_classes=len(label_names),
        label_names=list(label_names),
        model_args={},
        input_size=[3, 28, 28],
        crop_pct=28 / 32,
        grayscale=False,
    )
    return save_checkpoint(path, model.state_dict(), {**description, **meta})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return _teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


def _train_set(dataset: Path):
    return build_dataset(dataset, "train", "folder", 7, create_fer_transform(True, img_size=28, resize=32))


def _soft_targets(sources, dataset: Path, **kwargs) -> torch.Tensor:
    eval_tf = create_fer_transform(False, img_size=28, resize=32)
    return teacher_log_probs(sources, _train_set(dataset), eval_tf, 28, 28 / 32, False, CPU, batch_size=16, **kwargs)


# ------------------------------------------------------------------------------------------------ the loss


def test_distillation_loss_without_alpha_is_the_label_loss():
    torch.manual_seed(0)
    logits, target = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    loss = DistillationLoss(torch.randn(10, 7).log_softmax(1), alpha=0.0, label_smoothing=0.1)
    expected = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert torch.equal(loss(logits, target, torch.arange(5)), expected)


def test_distillation_loss_is_the_kl_divergence_to_each_samples_own_target():
    # a uniform student against targets (1/2, 1/2, 0...) and (1, 0...): KL = log 7 - log 2 and log 7
    half = torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0])
    one = torch.tensor([0, 0, 0, 1.0, 0, 0, 0])
    table = torch.stack([one, half]).clamp_min(1e-12).log()
    loss = DistillationLoss(table, alpha=1.0)
    logits, target = torch.zeros(2, 7), torch.tensor([5, 5])
    assert loss(logits, target, torch.tensor([1, 1])).item() == pytest.approx(math.log(7) - math.log(2), abs=1e-5)
    assert loss(logits, target, torch.tensor([0, 0])).item() == pytest.approx(math.log(7), abs=1e-5)
    assert loss(logits, target, torch.tensor([0, 1])).item() == pytest.approx(math.log(7) - math.log(2) / 2, abs=1e-5)


def test_distillation_loss_mixes_labels_and_softened_targets():
    torch.manual_seed(1)
    logits, target, index = torch.randn(4, 7), torch.tensor([1, 2, 3, 4]), torch.tensor([2, 0, 2, 1])
    table = torch.randn(3, 7).log_softmax(1)
    t, alpha = 4.0, 0.3
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(table[index] / t, 1), reduction="batchmean")
    expected = (1 - alpha) * F.cross_entropy(logits, target) + alpha * t * t * kl
    got = DistillationLoss(table, alpha=alpha, temperature=t)(logits, target, index)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # a student that already predicts the softened target pays only the label term
    same = DistillationLoss(table, alpha=alpha, temperature=t)(table[index], target, index)
    assert same.item() == pytest.approx((1 - alpha) * F.cross_entropy(table[index], target).item(), rel=1e-5)


def test_indexed_dataset_appends_the_sample_index(dataset):
    train_set = _train_set(dataset)
    indexed = IndexedDataset(train_set)
    assert len(indexed) == len(train_set) == 42
    image, label, index = indexed[13]
    assert (label, index) == (train_set.targets[13], 13) and image.shape == (3, 28, 28)


def test_parse_teachers():
    assert parse_teachers(" coresnet18.fer2013, runs/a/best.safetensors ,") == [
        "coresnet18.fer2013",
        "runs/a/best.safetensors",
    ]
    with pytest.raises(ValueError, match="names no model"):
        parse_teachers(" , ")


# --------------------------------------------------------------------------------------- the soft targets


def _flip_averaged_probabilities(path: Path, num_classes: int, dataset: Path) -> torch.Tensor:
    """A teacher checkpoint's mean softmax over each unaugmented training face and its mirror image, computed
    with plain timm and torch (the reference the soft targets must equal)."""
    model = timm.create_model("coresnet18", num_classes=num_classes)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    eval_set = build_dataset(dataset, "train", "folder", 7, create_fer_transform(False, img_size=28, resize=32))
    x = torch.stack([eval_set[i][0] for i in range(len(eval_set))])
    with torch.no_grad():
        return (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2


def test_soft_targets_are_the_teachers_flip_averaged_probabilities_in_the_runs_class_order(dataset, teacher):
    targets = _soft_targets([str(teacher)], dataset)
    # by hand: the teacher's outputs (reversed FER-7 order) on the unaugmented faces and their mirror images
    expected = _flip_averaged_probabilities(teacher, 7, dataset)[:, list(reversed(range(7)))]  # output 6 is anger
    assert targets.shape == (42, 7)
    torch.testing.assert_close(targets.exp(), expected, atol=1e-5, rtol=1e-4)


def test_soft_targets_of_several_teachers_are_their_mean_probabilities(dataset, teacher, tmp_path):
    other = _teacher(tmp_path / "other.safetensors", label_names=FER7_LABELS, seed=1)
    a, b = _soft_targets([str(teacher)], dataset), _soft_targets([str(other)], dataset)
    both = _soft_targets([str(teacher), str(other)], dataset)
    torch.testing.assert_close(both.exp(), (a.exp() + b.exp()) / 2, atol=1e-6, rtol=1e-5)


def test_a_teacher_with_an_extra_class_is_renormalised_over_the_runs_classes(dataset, tmp_path):
    fer8 = _teacher(tmp_path / "fer8.safetensors", label_names=(*FER7_LABELS, "contempt"), seed=2)
    targets = _soft_targets([str(fer8)], dataset)
    # by hand: the teacher's 8 flip-averaged probabilities, contempt dropped, the other 7 renormalised
    p = _flip_averaged_probabilities(fer8, 8, dataset)[:, :7]
    torch.testing.assert_close(targets.exp(), p / p.sum(1, keepdim=True), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "meta, message",
    [
        (dict(input_size=[3, 48, 48]), "it takes 48 px faces, the run 28 px"),
        (dict(grayscale=True), "it was trained on grayscale faces, the run's are not"),
        (dict(crop_pct=1.0), "it was evaluated on a centre crop of crop_pct 1, the run's faces are cropped at 0.875"),
        (dict(label_names=["anger", "happiness"], num_classes=2), "it has no output for disgust, fear, sadness"),
    ],
)
def test_a_teacher_that_does_not_fit_the_run_is_refused(dataset, tmp_path, meta, message):
    names = meta.pop("label_names", FER7_LABELS)
    path = _teacher(tmp_path / "t.safetensors", label_names=names, **meta)
    with pytest.raises(ValueError, match=f"Teacher {path} cannot teach this run: {message}"):
        _soft_targets([str(path)], dataset)


# ------------------------------------------------------------------------------------ runs with a teacher


def test_a_run_without_teacher_keeps_the_config_hash_of_runs_before_distillation():
    assert config_hash(TrainConfig()) == HASH_BEFORE_DISTILLATION
    assert config_hash(TrainConfig(distill_alpha=0.9)) == HASH_BEFORE_DISTILLATION  # unused without a teacher
    with_teacher = TrainConfig(teacher="coresnet18.fer2013")
    assert config_hash(with_teacher) != HASH_BEFORE_DISTILLATION
    assert config_hash(with_teacher) != config_hash(dataclasses.replace(with_teacher, distill_alpha=0.9))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("distill_alpha", 1.5, r"distill_alpha \(--distill-alpha\) must be in \[0, 1\]"),
        ("distill_temperature", 0, r"distill_temperature \(--distill-temperature\) must be positive"),
        ("teacher", " , ", r"teacher \(--teacher\) must be one or more model sources"),
    ],
)
def test_bad_distillation_settings_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})


@pytest.fixture(scope="module")
def plain_run(dataset, tmp_path_factory) -> TrainConfig:
    """A 1-epoch run without a teacher."""
    cfg = TrainConfig(data=str(dataset), output=str(tmp_path_factory.mktemp("runs") / "plain"), **TINY)
    train(cfg, progress=False)
    return cfg


def _last_weights(cfg: TrainConfig):
    return load_file(str(Path(cfg.output) / "last.safetensors"))


def test_a_teacher_with_alpha_0_trains_exactly_as_without_one(plain_run, teacher, tmp_path):
    taught = dataclasses.replace(plain_run, output=str(tmp_path / "taught"), teacher=str(teacher), distill_alpha=0.0)
    train(taught, progress=False)
    a, b = _last_weights(plain_run), _last_weights(taught)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_with_a_teacher_learns_from_it_and_records_it(plain_run, teacher, tmp_path, caplog):
    taught = dataclasses.replace(plain_run, output=str(tmp_path / "taught"), teacher=str(teacher), distill_alpha=0.7)
    with caplog.at_level("INFO", logger="timm_acsi.train.distill"):
        train(taught, progress=False)
    assert f"Teacher {teacher}: " in caplog.text and "% of the training faces right." in caplog.text
    assert not torch.equal(_last_weights(plain_run)["fc.weight"], _last_weights(taught)["fc.weight"])
    meta = read_checkpoint_meta(Path(taught.output) / "best.safetensors")
    assert meta["teacher"] == [str(teacher)] and meta["config_hash"] == config_hash(taught)
    saved = load_config_file(Path(taught.output) / "config.yaml")
    assert (saved["teacher"], saved["distill_alpha"]) == (str(teacher), 0.7)
