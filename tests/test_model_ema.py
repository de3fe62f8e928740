"""Training with a moving average of the weights (``model_ema``): what is updated, validated, saved and resumed.

Tiny acsinet18 runs on the 32 px synthetic faces of tests/fer_fixtures.py (28 px crops, 6 updates per epoch), as
tests/test_train.py trains.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from fer_fixtures import make_folder_dataset
from safetensors.torch import load_file
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from train_helpers import train_killed_in_epoch_2

from timm_acsi.data import build_dataset, create_fer_transform
from timm_acsi.sources import load_model
from timm_acsi.train import DistInfo, TrainConfig, config_hash, evaluate_checkpoint, train
from timm_acsi.train.evaluation import evaluate

TINY = dict(img_size=28, resize=32, batch_size=7, workers=0, epochs=2, lr=0.02, deterministic=True, sched="cosine")
#: config_hash(TrainConfig()) before model_ema existed (tests/test_distill.py pins the same value)
HASH_BEFORE_EMA = "ff84e41f89716e35a82204776197ffede5bee6ab483dcd5b32e84e394571d81d"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "fer", per_class=6, size=32)


def _cfg(dataset: Path, output: Path, **kwargs) -> TrainConfig:
    return TrainConfig(
        data=str(dataset), output=str(output), **{**TINY, "model_ema": True, "model_ema_decay": 0.8, **kwargs}
    )


@pytest.fixture(scope="module")
def ema_run(dataset, tmp_path_factory):
    """One 2-epoch run with a weight average of decay 0.8; returns (config, run folder, steps given to update, the
    classifier weights each update saw)."""
    steps, weights, real = [], [], ModelEmaV3.update

    def spy(self, model, step=None):
        steps.append(step)
        weights.append(model.fc.weight.detach().clone())
        return real(self, model, step)

    cfg = _cfg(dataset, tmp_path_factory.mktemp("runs") / "ema")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelEmaV3, "update", spy)
        train(cfg, progress=False)
    return cfg, Path(cfg.output), steps, weights


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_average_takes_in_every_optimizer_update(ema_run):
    _, _, steps, _ = ema_run
    assert steps == list(range(1, 13))  # 2 epochs x 6 updates; step 1 copies the weights (decay 0 at the start)


def test_checkpoints_hold_the_average_and_the_resume_state_both(ema_run):
    """The saved average is the decay-0.8 average of the weights after each optimizer step, written out by hand."""
    _, run_dir, _, weights = ema_run
    state = torch.load(run_dir / "last_state.pt", weights_only=True)
    last = load_file(str(run_dir / "last.safetensors"))
    assert _equal(last, state["model_ema"])
    assert not _equal(last, state["model"])
    assert torch.equal(weights[-1], state["model"]["fc.weight"])  # the last update came after the last step
    expected = weights[0]  # step 1 copies
    for w in weights[1:]:
        expected = 0.8 * expected + 0.2 * w
    ema, raw = state["model_ema"]["fc.weight"], state["model"]["fc.weight"]
    torch.testing.assert_close(ema, expected, atol=1e-6, rtol=0)
    assert (ema - raw).abs().max() > 1e-4  # a decay of 0.8 over 12 updates leaves the average behind


def test_the_logged_validation_is_the_saved_average(ema_run):
    """The log's last val_acc and val_loss are those of last.safetensors (the average), re-evaluated from the file;
    the raw weights' loss differs (accuracy alone could not tell them apart on these easy faces)."""
    cfg, run_dir, _, _ = ema_run
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    metrics = evaluate_checkpoint(run_dir / "last.safetensors", cfg.data, split="val", workers=0, progress=False)
    assert metrics["accuracy"] == log[-1]["val_acc"]
    model = load_model(str(run_dir / "last.safetensors")).model
    transform = create_fer_transform(False, img_size=cfg.img_size, resize=cfg.resize)
    loader = DataLoader(build_dataset(cfg.data, "val", transform=transform), batch_size=cfg.batch_size)
    _, average_loss = evaluate(model, loader, 7, DistInfo())
    assert average_loss == pytest.approx(log[-1]["val_loss"], rel=1e-6)
    model.load_state_dict(torch.load(run_dir / "last_state.pt", weights_only=True)["model"])
    _, raw_loss = evaluate(model, loader, 7, DistInfo())
    assert abs(raw_loss - average_loss) > 1e-3


def test_resume_restores_the_average_exactly(ema_run, tmp_path):
    """Killed during epoch 2 and resumed: the average (and the raw weights) end bit-identical to the
    uninterrupted run's, so the average was saved and restored, not restarted."""
    cfg, run_dir, _, _ = ema_run
    out = tmp_path / "resumed"
    train_killed_in_epoch_2(cfg, out)
    train(dataclasses.replace(cfg, output=str(out)), resume=True, progress=False)
    expected = torch.load(run_dir / "last_state.pt", weights_only=True)
    resumed = torch.load(out / "last_state.pt", weights_only=True)
    assert _equal(expected["model_ema"], resumed["model_ema"]) and _equal(expected["model"], resumed["model"])
    assert _equal(load_file(str(run_dir / "best.safetensors")), load_file(str(out / "best.safetensors")))


def test_an_average_added_on_resume_starts_from_the_weights(dataset, tmp_path, caplog):
    cfg = _cfg(dataset, tmp_path / "late", model_ema=False, epochs=1)
    train(cfg, progress=False)
    plain = torch.load(tmp_path / "late" / "last_state.pt", weights_only=True)["model"]
    assert "model_ema" not in torch.load(tmp_path / "late" / "last_state.pt", weights_only=True)
    later = dataclasses.replace(cfg, model_ema=True, model_ema_decay=0.999999, epochs=2)
    with caplog.at_level("WARNING", logger="timm_acsi.train"):
        train(later, resume=True, progress=False)
    assert "kept no weight average until epoch 1: it starts from its weights" in caplog.text
    state = torch.load(tmp_path / "late" / "last_state.pt", weights_only=True)
    # step 7 is not the first update, so the decay applies from there: the average barely leaves epoch 1's weights
    # (integer buffers, BatchNorm's batch counts, are copied, not averaged)
    floats = [k for k, v in plain.items() if v.is_floating_point()]
    assert all(torch.allclose(state["model_ema"][k], plain[k], atol=1e-4) for k in floats)
    assert state["model_ema"]["bn1.num_batches_tracked"] == state["model"]["bn1.num_batches_tracked"] == 12
    assert not _equal(state["model"], plain)


def test_config_hash_and_checks():
    assert config_hash(TrainConfig()) == HASH_BEFORE_EMA
    assert config_hash(TrainConfig(model_ema_decay=0.5)) == HASH_BEFORE_EMA  # unused without the average
    on = TrainConfig(model_ema=True)
    assert config_hash(on) != HASH_BEFORE_EMA
    assert config_hash(on) != config_hash(dataclasses.replace(on, model_ema_decay=0.99))
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match=r"model_ema_decay \(--model-ema-decay\) must be in \(0, 1\)"):
            TrainConfig(model_ema_decay=bad)
