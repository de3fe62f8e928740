"""Training pipeline: config, run folder, samplers, short training runs, resume, DDP, evaluate, publish.

Runs train acsinet18 on tiny synthetic datasets (tests/fer_fixtures.py: one solid colour per class, 32 px
images, 28 px crops) on the CPU. One shared run (module fixture) serves most assertions.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from fer_fixtures import make_fer2013_folders, make_folder_dataset, make_rafdb_dataset
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset
from train_helpers import train_killed_in_epoch_2

import timm_acsi
from timm_acsi.checkpoint import read_checkpoint_meta, save_checkpoint
from timm_acsi.cli import evaluate as evaluate_cli
from timm_acsi.cli import run_command
from timm_acsi.data import build_dataset, create_fer_transform
from timm_acsi.labels import FER7_LABELS, canonical_label
from timm_acsi.train import (
    RUN_FILES,
    DistInfo,
    DistributedWeightedSampler,
    ShardSampler,
    TrainConfig,
    class_balanced_weights,
    config_from_dict,
    config_hash,
    create_model,
    create_optimizer_and_scheduler,
    evaluate_checkpoint,
    load_config_file,
    prepare_run_dir,
    save_config,
    train,
)
from timm_acsi.train import evaluation as train_evaluation
from timm_acsi.train import loop as train_loop
from timm_acsi.train.model import load_scheduler_state, scheduler_state
from timm_acsi.train.run_folder import RunFolderBusyError, RunFolderLock

LOG_KEYS = {
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_mean_class_acc",
    "images_per_s",
    "time",
}
#: 32 px faces, 28 px crops, 6 steps per epoch; lr 0.02 then 0.01; workers=0 + deterministic for exact resume
TINY = dict(
    img_size=28,
    resize=32,
    batch_size=7,
    workers=0,
    epochs=2,
    lr=0.02,
    decay_epochs=1,
    decay_rate=0.5,
    deterministic=True,
)


def _cfg(data: Path, output: Path, **kwargs) -> TrainConfig:
    return TrainConfig(data=str(data), output=str(output), **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "fer", per_class=6, size=32)


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """One 2-epoch run (lr 0.02, then 0.01); returns (config, run folder, returned metrics)."""
    cfg = _cfg(dataset, tmp_path_factory.mktemp("runs") / "run")
    metrics = train(cfg, progress=False)
    return cfg, Path(cfg.output), metrics


# ----------------------------------------------------------------------------------------------- config


def test_recipe_defaults():
    cfg = TrainConfig()
    assert (cfg.model, cfg.lr, cfg.momentum, cfg.weight_decay) == ("acsinet18", 0.01, 0.9, 5e-4)
    assert (cfg.sched, cfg.decay_epochs, cfg.decay_rate, cfg.epochs, cfg.warmup_epochs) == ("step", 20, 0.1, 60, 0)
    assert (cfg.batch_size, cfg.img_size, cfg.resize, cfg.train_crops) == (32, 224, 256, "five_flip")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer, scheduler = create_optimizer_and_scheduler(model, cfg)
    assert type(optimizer) is torch.optim.SGD
    (group,) = optimizer.param_groups  # weight decay on every parameter, as plain SGD
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, False, 5e-4)
    lrs = {}
    for epoch in (0, 19, 20, 39, 40, 59):  # one update per epoch (the default)
        scheduler.step_update(epoch)
        lrs[epoch] = optimizer.param_groups[0]["lr"]
    assert lrs == pytest.approx({0: 0.01, 19: 0.01, 20: 1e-3, 39: 1e-3, 40: 1e-4, 59: 1e-4})


def test_config_round_trip(tmp_path):
    cfg = TrainConfig(data="d", lr=0.05, balanced=True, model_args={"attn_placement": "stage"}, val_split="test")
    for name in ("c.yaml", "c.json"):
        save_config(cfg, tmp_path / name)
        assert config_from_dict(load_config_file(tmp_path / name)) == cfg
    assert config_hash(cfg) == config_hash(dataclasses.replace(cfg, output="elsewhere"))
    assert config_hash(cfg) != config_hash(dataclasses.replace(cfg, lr=0.01))
    with pytest.raises(ValueError, match="Unknown config key.*'learning_rate'"):
        config_from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"num_classes \(--num-classes\) must be one of 7, 8, got 6"):
        TrainConfig(num_classes=6)


def test_cli_precedence_defaults_file_flags(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"lr": 0.5, "amp": True, "epochs": 7, "data": "from_file"}))
    argv = ["--config", str(tmp_path / "c.yaml"), "--lr", "0.1", "--no-amp", "--model-args", "attn_placement=stage"]
    assert run_command("train", argv + ["--print-config"]) == 0
    printed = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert (printed.lr, printed.amp, printed.epochs, printed.data) == (0.1, False, 7, "from_file")
    assert printed.model_args == {"attn_placement": "stage"}
    assert printed.weight_decay == 5e-4  # untouched default
    assert run_command("train", ["--config", str(tmp_path / "missing.yaml")]) == 2


# --------------------------------------------------------------------------------------------- samplers


def test_balanced_sampler_draws_classes_uniformly():
    targets = [0] * 700 + [1] * 200 + [2] * 90 + [3] * 10
    sampler = DistributedWeightedSampler(class_balanced_weights(targets, 4), num_samples=4000, seed=1)
    counts = torch.bincount(torch.tensor([targets[i] for i in sampler]), minlength=4)
    assert len(sampler) == 4000
    assert ((counts - 1000).abs() < 120).all(), counts  # 1000 each in expectation; plain sampling: 2800/800/360/40


def test_balanced_sampler_shards_one_draw_and_reshuffles_per_epoch():
    weights = class_balanced_weights([0, 0, 0, 1, 2, 2], 3)
    single = DistributedWeightedSampler(weights, 10, seed=5)
    ranks = [DistributedWeightedSampler(weights, 10, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    merged = [i for pair in zip(*(list(s) for s in ranks)) for i in pair]
    assert merged == list(single)
    single.set_epoch(1)
    assert merged != list(single)


def test_shard_sampler_covers_every_sample_once():
    shards = [list(ShardSampler(10, 3, r)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(ShardSampler(10, 3, r)) for r in range(3)] == [4, 3, 3]


# ------------------------------------------------------------------------------------------- run folder


def test_prepare_run_dir_never_overwrites_without_asking(tmp_path):
    run_dir = prepare_run_dir(tmp_path / "r")
    (run_dir / "log.jsonl").write_text("{}\n")
    (run_dir / "last_state.pt").write_bytes(b"state")
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        prepare_run_dir(run_dir)
    prepare_run_dir(run_dir, overwrite=True)
    assert not (run_dir / "log.jsonl").exists() and not (run_dir / "last_state.pt").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"  # only run files are removed


def test_a_run_that_completed_no_epoch_sends_both_ways_to_overwrite(tmp_path):
    """Run files without last_state.pt (a run killed in its first epoch): a plain rerun and --resume both say
    --overwrite, instead of sending the user from one to the other."""
    run_dir = prepare_run_dir(tmp_path / "r")
    (run_dir / "log.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="completed no epoch: pass --overwrite"):
        prepare_run_dir(run_dir)
    with pytest.raises(FileNotFoundError, match="no last_state.pt .*start it again with --overwrite"):
        prepare_run_dir(run_dir, resume=True)
    with pytest.raises(FileExistsError, match="is a file"):
        prepare_run_dir(run_dir / "log.jsonl")


def test_gradient_accumulation_matches_large_batch():
    """accum_steps=2 of batch 4 takes the same steps as batch 8 (no BN: batch statistics would differ)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        cfg = TrainConfig(batch_size=batch_size, accum_steps=accum, lr=0.1)
        optimizer, _ = create_optimizer_and_scheduler(model, cfg)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        stats = train_loop._train_one_epoch(
            model, loader, torch.nn.CrossEntropyLoss(), optimizer, scaler, cfg, DistInfo(), "t", False
        )
        results.append((model.weight.detach().clone(), stats["train_loss"]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    assert results[0][1] == pytest.approx(results[1][1])


def test_amp_on_cpu_runs_in_bfloat16():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )
    dtypes = []
    model[3].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    before = model[3].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)), 4)
    cfg = TrainConfig(amp=True, label_smoothing=0.1)
    optimizer, _ = create_optimizer_and_scheduler(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp16 loss scaling is for CUDA only
    stats = train_loop._train_one_epoch(
        model, loader, torch.nn.CrossEntropyLoss(label_smoothing=0.1), optimizer, scaler, cfg, DistInfo(), "t", False
    )
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert model[3].weight.dtype == torch.float32 and not torch.equal(model[3].weight, before)
    assert torch.isfinite(torch.tensor(stats["train_loss"]))


def test_init_checkpoint_loads_resnet18_weights(tmp_path):
    """acsinet18.tv_in1k + a local file: the ImageNet-shaped ResNet-18 weights load, the 7-class head is new."""
    resnet = timm.create_model("resnet18")
    save_file(resnet.state_dict(), str(tmp_path / "resnet18.safetensors"))
    cfg = TrainConfig(model="acsinet18.tv_in1k", init_checkpoint=str(tmp_path / "resnet18.safetensors"))
    model = create_model(cfg)
    assert torch.equal(model.conv1.weight, resnet.conv1.weight)
    assert torch.equal(model.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)
    assert model.fc.out_features == 7
    # the default tag is the 7-class FER config: the 1000-class ImageNet head is dropped all the same
    plain = create_model(dataclasses.replace(cfg, model="acsinet18"))
    assert torch.equal(plain.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight) and plain.fc.out_features == 7
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        create_model(dataclasses.replace(cfg, init_checkpoint=str(tmp_path / "nope.safetensors")))


def test_init_checkpoint_reads_wrapped_pth_once_and_checks_keys(tmp_path):
    """A .pth training checkpoint ({"model_state_dict": ...}, DDP "module." keys) loads; a file of another
    architecture is refused with a short description instead of loading partly."""
    resnet = timm.create_model("resnet18")
    wrapped = {"model_state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "resnet18.pth")
    model = create_model(TrainConfig(init_checkpoint=str(tmp_path / "resnet18.pth")))
    assert torch.equal(model.conv1.weight, resnet.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    assert torch.equal(model.layer2[0].bn1.running_mean, resnet.layer2[0].bn1.running_mean)

    broken = {k: v for k, v in resnet.state_dict().items() if not k.startswith("layer4.1.")}
    broken["neck.weight"] = torch.zeros(3)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing keys \(layer4\.1\.conv1\.weight.*1 unexpected keys \(neck\.weight\)"
    ):
        create_model(TrainConfig(init_checkpoint=str(tmp_path / "broken.safetensors")))


def test_init_checkpoint_keeps_a_same_size_head_in_label_order(tmp_path):
    """A 7-class checkpoint whose head lists the classes in another order: rows are matched by name."""
    torch.manual_seed(0)
    source = timm.create_model("acsinet18", num_classes=7)
    state = source.state_dict()
    order = [5, 0, 6, 1, 4, 2, 3]  # RAF-DB's order: surprise, fear, disgust... (any permutation will do)
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][order], state["fc.bias"][order]
    meta = {"architecture": "acsinet18", "num_classes": 7, "label_names": [FER7_LABELS[i] for i in order]}
    save_checkpoint(tmp_path / "permuted.safetensors", state, meta)
    model = create_model(TrainConfig(init_checkpoint=str(tmp_path / "permuted.safetensors")))
    assert torch.equal(model.fc.weight, source.fc.weight) and torch.equal(model.fc.bias, source.fc.bias)
    assert torch.equal(model.layer1[0].se.conv_h.weight, source.layer1[0].se.conv_h.weight)


def test_pretrained_without_weights_fails_before_reading_data(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(tmp_path / "no-data"), "--output", str(out), "--quiet"]
    assert run_command("train", argv + ["--model", "coresnet34", "--pretrained"]) == 2
    assert capsys.readouterr().err == (
        "timm-acsi train: error: --pretrained: coresnet34.rafdb has no published weights. Use an ImageNet tag "
        "(--model coresnet34.tv_in1k) or --init-checkpoint FILE.\n"
    )
    assert run_command("train", argv + ["--model", "acsinet19"]) == 2
    assert "Unknown model 'acsinet19'" in capsys.readouterr().err
    assert not out.exists()  # refused before the run folder or the data were touched


def test_train_one_epoch_waits_for_the_device_once_per_epoch(monkeypatch):
    """No host-device sync per batch: the number of tensor -> Python conversions does not grow with the batches."""
    conversions = []
    for name in ("__float__", "item", "__bool__", "__int__", "tolist", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real: conversions.append(1) or _real(t, *a))
    counts = []
    for batches in (2, 6):
        g = torch.Generator().manual_seed(0)
        loader = DataLoader(TensorDataset(torch.randn(4 * batches, 5, generator=g), torch.arange(4 * batches) % 3), 4)
        model = torch.nn.Linear(5, 3)
        optimizer, _ = create_optimizer_and_scheduler(model, TrainConfig(batch_size=4))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        conversions.clear()
        train_loop._train_one_epoch(
            model,
            loader,
            torch.nn.CrossEntropyLoss(),
            optimizer,
            scaler,
            TrainConfig(batch_size=4),
            DistInfo(),
            "t",
            False,
        )
        counts.append(len(conversions))
    # per epoch, whatever the batches: the DataLoader's seed (.item()), then at the end .cpu() of the totals and
    # float() of the loss, accuracy and sample count
    assert counts == [5, 5]


# --------------------------------------------------------------------------------------------- training


def test_short_run_learns_and_writes_run_folder(run):
    cfg, run_dir, metrics = run
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]
    assert all(set(e) == LOG_KEYS for e in log)
    assert [e["lr"] for e in log] == pytest.approx([0.02, 0.01])
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    best = max(log, key=lambda e: e["val_acc"])
    assert best["val_acc"] > 0.8  # chance: 1/7
    # metrics.json = the best epoch, re-evaluated on the whole val split
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert (metrics["dataset"], metrics["split"], metrics["num_samples"]) == ("fer", "val", 42)
    assert metrics["accuracy"] == pytest.approx(best["val_acc"])
    assert metrics["mean_class_accuracy"] == pytest.approx(best["val_mean_class_acc"])
    assert (run_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_meta(run):
    cfg, run_dir, _ = run
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    best_entry = max(log, key=lambda e: e["val_acc"])  # first maximum: later ties do not replace the best
    meta = read_checkpoint_meta(run_dir / "best.safetensors")
    assert meta == json.loads((run_dir / "best.json").read_text())
    assert meta["architecture"] == "acsinet18"
    assert meta["num_classes"] == 7
    assert meta["label_names"] == list(FER7_LABELS)
    assert meta["model_args"] == {}
    assert meta["input_size"] == [3, 28, 28]
    assert meta["crop_pct"] == 28 / 32  # img_size / resize: evaluation resizes to round(img_size / crop_pct)
    assert meta["epoch"] == best_entry["epoch"]
    assert meta["metric"] == {"name": "val_acc", "value": best_entry["val_acc"]}
    assert meta["dataset"] == "fer"
    reloaded = config_from_dict(load_config_file(run_dir / "config.yaml"))
    assert reloaded == cfg
    assert meta["config_hash"] == config_hash(reloaded)
    assert read_checkpoint_meta(run_dir / "last.safetensors")["epoch"] == 2
    state = torch.load(run_dir / "last_state.pt", weights_only=True)  # no unpickling needed
    assert state["epoch"] == 2 and set(state) >= {"model", "optimizer", "scheduler", "rng", "best"}
    last = load_file(str(run_dir / "last.safetensors"))
    assert all(torch.equal(state["model"][k], last[k]) for k in last) and state["model"].keys() == last.keys()
    assert set(load_file(str(run_dir / "best.safetensors"))) == set(
        timm.create_model("acsinet18", num_classes=7).state_dict()
    )


def test_cli_refuses_to_overwrite_a_run(run, capsys):
    cfg, run_dir, _ = run
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    rc = run_command("train", ["--data", cfg.data, "--output", str(run_dir), "--epochs", "1", "--quiet"])
    assert rc == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_resume_continues_exactly(run, tmp_path):
    """A run killed during epoch 2 and resumed ends bit-identical to the uninterrupted run (the lr changes
    at epoch 2, so the scheduler state matters too)."""
    cfg, run_dir, _ = run
    out = tmp_path / "resumed"
    train_killed_in_epoch_2(cfg, out)
    assert read_checkpoint_meta(out / "last.safetensors")["epoch"] == 1
    assert run_command("train", ["--output", str(out), "--resume", "--quiet"]) == 0  # config from the folder

    expected, resumed = load_file(str(run_dir / "last.safetensors")), load_file(str(out / "last.safetensors"))
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)

    def results(path):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")}
            for line in path.read_text().splitlines()
        ]

    assert results(out / "log.jsonl") == results(run_dir / "log.jsonl")
    assert json.loads((out / "metrics.json").read_text()) == json.loads((run_dir / "metrics.json").read_text())


def test_fer2013_without_grayscale_is_warned(tmp_path, caplog):
    """FER-2013's faces are gray: a run that does not say so would record a colour model; it is told how to fix it."""
    fer = make_fer2013_folders(tmp_path / "fer2013", {"Training": 1, "PublicTest": 1, "PrivateTest": 1})
    for grayscale, expected in ((False, 1), (True, 0)):
        caplog.clear()
        train_loop._load_data(_cfg(fer, tmp_path / "run", grayscale=grayscale), DistInfo())
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == expected and all("faces are grayscale" in w and "pass --grayscale" in w for w in warned)


@pytest.mark.filterwarnings("ignore:PlateauLRScheduler is deprecated:FutureWarning")  # timm's
def test_plateau_resume_keeps_its_lr_and_counters(dataset, tmp_path):
    """A plateau schedule's lr is state, not a function of the step: a run killed in epoch 2 resumes at the lr
    its warm-up reached (not the warm-up's start again) and ends as the uninterrupted run."""
    cfg = _cfg(dataset, tmp_path / "whole", sched="plateau", epochs=3, warmup_epochs=1, warmup_lr=0.001)
    train(cfg, progress=False)
    out = tmp_path / "resumed"
    train_killed_in_epoch_2(cfg, out)
    assert run_command("train", ["--output", str(out), "--resume", "--quiet"]) == 0
    whole, resumed = _log_results(tmp_path / "whole" / "log.jsonl"), _log_results(out / "log.jsonl")
    assert [e["lr"] for e in whole] == pytest.approx([0.001, 0.02, 0.02])
    assert resumed == whole


@pytest.mark.filterwarnings("ignore:PlateauLRScheduler is deprecated:FutureWarning")  # timm's
def test_plateau_state_round_trip_keeps_the_counters():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(sched="plateau", epochs=10)
    _, scheduler = create_optimizer_and_scheduler(model, cfg)
    for epoch, metric in enumerate([0.5, 0.4, 0.4], start=1):
        scheduler.step(epoch, metric)
    saved = scheduler_state(scheduler)
    _, fresh = create_optimizer_and_scheduler(model, cfg)
    load_scheduler_state(fresh, saved)
    assert (fresh.lr_scheduler.best, fresh.lr_scheduler.num_bad_epochs, fresh.lr_scheduler.last_epoch) == (0.5, 2, 3)


def _log_results(path: Path):
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")}
        for line in path.read_text().splitlines()
    ]


def _cosine_epoch_lrs(lr: float, epochs: int, first: int, last: int, updates: int = 6):
    """Mean lr of the updates of epochs ``first..last-1`` under a cosine schedule over ``epochs`` epochs stepped
    per update (lr_min 0, no warm-up); the tiny runs make 6 updates per epoch."""
    total = epochs * updates
    return [
        sum(lr / 2 * (1 + math.cos(math.pi * t / total)) for t in range(e * updates, (e + 1) * updates)) / updates
        for e in range(first, last)
    ]


def test_resume_follows_changed_schedule_settings(dataset, tmp_path, caplog):
    """A 2-epoch cosine run resumed with --epochs 4 trains epochs 3-4 at a fresh 4-epoch cosine schedule's lrs
    (the saved scheduler state would bring back the 2-epoch schedule: lr 0), and says what changed. The lr moves
    at every update: the log holds each epoch's mean."""
    cfg = _cfg(dataset, tmp_path / "cosine", sched="cosine")
    train(cfg, progress=False)
    longer = dataclasses.replace(cfg, epochs=4)
    with caplog.at_level("WARNING", logger="timm_acsi.train"):
        train(longer, resume=True, progress=False)
    log = _log_results(Path(cfg.output) / "log.jsonl")
    expected = _cosine_epoch_lrs(0.02, 2, 0, 2) + _cosine_epoch_lrs(0.02, 4, 2, 4)
    assert [e["lr"] for e in log] == pytest.approx(expected, rel=1e-12)
    assert config_from_dict(load_config_file(Path(cfg.output) / "config.yaml")) == longer
    assert "changed settings (config.yaml is updated): epochs 2 -> 4" in caplog.text


def test_resume_after_kill_between_checkpoint_writes(run, tmp_path, monkeypatch):
    """Killed after writing epoch 2's best.safetensors and last.safetensors, before last_state.pt: the resume
    state (epoch 1, with its own weights) is the commit point, epoch 2 is redone and the run ends as the
    uninterrupted one. A best.safetensors older than the state says is refused."""
    cfg, run_dir, _ = run
    out = tmp_path / "killed"
    real, calls = train_loop.save_resume_state, []

    def killed_at_epoch_2(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(train_loop, "save_resume_state", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(cfg, output=str(out)), progress=False)
    monkeypatch.setattr(train_loop, "save_resume_state", real)
    assert torch.load(out / "last_state.pt", weights_only=True)["epoch"] == 1
    assert read_checkpoint_meta(out / "best.safetensors")["epoch"] == 2  # newer than the state's best epoch (1)
    train(dataclasses.replace(cfg, output=str(out)), resume=True, progress=False)

    for name in ("last.safetensors", "best.safetensors"):
        expected, resumed = load_file(str(run_dir / name)), load_file(str(out / name))
        assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected), name
    assert _log_results(out / "log.jsonl") == _log_results(run_dir / "log.jsonl")
    assert json.loads((out / "metrics.json").read_text()) == json.loads((run_dir / "metrics.json").read_text())

    meta = read_checkpoint_meta(out / "best.safetensors")
    save_checkpoint(out / "best.safetensors", load_file(str(out / "best.safetensors")), {**meta, "epoch": 1})
    with pytest.raises(ValueError, match="best.safetensors is from epoch 1, but last_state.pt .* best epoch is 2"):
        train(dataclasses.replace(cfg, output=str(out), epochs=3), resume=True, progress=False)


# --------------------------------------------------------------------------------------------- evaluate


def test_evaluate_cli_with_flip_tta(run, tmp_path, capsys):
    cfg, run_dir, metrics = run
    argv = ["--checkpoint", str(run_dir / "best.safetensors"), "--data", cfg.data, "--split", "val", "--workers", "0"]
    assert run_command("evaluate", argv + ["--out", str(tmp_path / "plain"), "--quiet"]) == 0
    assert f"accuracy {100 * metrics['accuracy']:.2f}%" in capsys.readouterr().out
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text()) == metrics  # same model, same split
    assert run_command("evaluate", argv + ["--tta-flip", "--json", "--out", str(tmp_path / "tta"), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "tta" / "metrics.json").read_text())
    assert printed["num_samples"] == 42 and printed["split"] == "val"
    assert (tmp_path / "tta" / "confusion_matrix.png").is_file()
    assert run_command("evaluate", argv[:2] + ["--data", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(SystemExit) as info:  # --layout takes the known layouts only
        run_command("evaluate", argv + ["--layout", "rafbd"])
    assert info.value.code == 2 and "argument --layout: invalid choice: 'rafbd'" in capsys.readouterr().err


def test_flip_tta_averages_the_softmax_of_each_face_and_its_mirror(run):
    """evaluate(tta_flip=True): the loss is that of the mean softmax of each face and its mirror image."""
    cfg, run_dir, _ = run
    model = create_model(cfg, FER7_LABELS)
    model.load_state_dict(load_file(str(run_dir / "best.safetensors")))
    model.eval()
    val = build_dataset(
        cfg.data, "val", transform=create_fer_transform(False, img_size=cfg.img_size, resize=cfg.resize)
    )
    x, y = torch.stack([val[i][0] for i in range(len(val))]), torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        p = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
    loader = DataLoader(val, batch_size=8)
    _, tta_loss = train_evaluation.evaluate(model, loader, 7, DistInfo(), tta_flip=True)
    _, one_view_loss = train_evaluation.evaluate(model, loader, 7, DistInfo())
    assert tta_loss == pytest.approx(-p[range(len(y)), y].log().mean().item(), rel=1e-5)
    assert tta_loss != pytest.approx(one_view_loss, rel=1e-6)


def test_evaluate_maps_outputs_by_label_name(run, tmp_path):
    """A checkpoint whose head lists the classes in another order gives the same confusion matrix."""
    cfg, run_dir, metrics = run
    state = load_file(str(run_dir / "best.safetensors"))
    meta = read_checkpoint_meta(run_dir / "best.safetensors")
    order = [5, 0, 6, 1, 4, 2, 3]
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][order], state["fc.bias"][order]
    meta["label_names"] = [FER7_LABELS[i] for i in order]
    save_checkpoint(tmp_path / "permuted.safetensors", state, meta)
    result = evaluate_checkpoint(tmp_path / "permuted.safetensors", cfg.data, split="val", workers=0)
    assert result["confusion_matrix"] == metrics["confusion_matrix"]
    assert result["label_names"] == list(FER7_LABELS)


def test_evaluate_cli_never_replaces_outputs_without_overwrite(run, tmp_path, capsys, monkeypatch):
    cfg, run_dir, metrics = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("mine")
    argv = ["--checkpoint", str(run_dir / "best.safetensors"), "--data", cfg.data, "--split", "val", "--workers", "0"]
    argv += ["--out", str(out), "--quiet"]
    with monkeypatch.context() as m:  # refused before evaluating anything
        m.setattr(evaluate_cli, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated"))
        assert run_command("evaluate", argv) == 2
    err = capsys.readouterr().err
    assert "already holds metrics.json" in err and "--overwrite" in err
    assert (out / "metrics.json").read_text() == "mine"
    assert run_command("evaluate", argv + ["--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_evaluate_bare_checkpoint_needs_label_names(run, tmp_path, capsys):
    """A .pth without a description in RAF-DB's label order: --label-names gives its order (the class count
    comes from the classifier); without it evaluation is refused rather than scored in the wrong order."""
    cfg, run_dir, metrics = run
    state = load_file(str(run_dir / "best.safetensors"))
    rafdb_order = ["surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"]
    order = [FER7_LABELS.index(canonical_label(n)) for n in rafdb_order]
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][order], state["fc.bias"][order]
    torch.save({"model_state_dict": state}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="no label_names.*--label-names"):
        evaluate_checkpoint(tmp_path / "bare.pth", cfg.data, split="val", model_name="acsinet18", workers=0)
    argv = ["--checkpoint", str(tmp_path / "bare.pth"), "--data", cfg.data, "--split", "val", "--workers", "0"]
    argv += ["--img-size", "28", "--quiet", "--json", "--model", "acsinet18"]  # no description: no input size
    assert run_command("evaluate", argv + ["--label-names", ",".join(rafdb_order)]) == 0
    assert json.loads(capsys.readouterr().out)["confusion_matrix"] == metrics["confusion_matrix"]
    # the wrong architecture: a short description of the file, not torch's key dump
    assert run_command("evaluate", argv[:-1] + ["coresnet18", "--label-names", ",".join(rafdb_order)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "does not fit coresnet18: 72 unexpected keys (layer1.0.se." in err
        and "look like acsinet18, 7-class head" in err
    )


def test_evaluate_bare_placement_variant_needs_model_args(run, tmp_path, capsys):
    """A description-less checkpoint of a placement variant is built with --model-args (as train and publish take
    them); model_args contradicting a checkpoint's description are refused."""
    cfg, run_dir, _ = run
    variant = timm.create_model("acsinet18", num_classes=7, attn_placement="stage", final_attn=False)
    save_file(variant.state_dict(), str(tmp_path / "stage.safetensors"))
    argv = ["--checkpoint", str(tmp_path / "stage.safetensors"), "--data", cfg.data, "--split", "val"]
    argv += ["--workers", "0", "--img-size", "28", "--quiet", "--model", "acsinet18", "--label-names"]
    argv += [",".join(FER7_LABELS)]
    assert run_command("evaluate", argv) == 2
    assert "does not fit acsinet18" in capsys.readouterr().err
    assert run_command("evaluate", argv + ["--model-args", "attn_placement=stage", "final_attn=false"]) == 0
    capsys.readouterr()
    described = ["--checkpoint", str(run_dir / "best.safetensors"), "--data", cfg.data, "--split", "val"]
    assert run_command("evaluate", described + ["--model-args", "attn_placement=stage"]) == 2
    assert "says model_args {}, not {'attn_placement': 'stage'}: drop --model-args" in capsys.readouterr().err


def test_evaluate_refuses_flags_contradicting_the_checkpoint(run, capsys):
    cfg, run_dir, _ = run
    argv = ["--checkpoint", str(run_dir / "best.safetensors"), "--data", cfg.data, "--split", "val", "--workers", "0"]
    assert run_command("evaluate", argv + ["--model", "coresnet18"]) == 2
    assert "says architecture acsinet18, not coresnet18: drop the model name (--model)" in capsys.readouterr().err
    assert run_command("evaluate", argv + ["--num-classes", "8"]) == 2
    assert "says it has 7 classes, not 8: drop num_classes (--num-classes)" in capsys.readouterr().err
    reversed_names = ",".join(reversed(FER7_LABELS))
    assert run_command("evaluate", argv + ["--label-names", reversed_names]) == 2
    assert "drop label_names (--label-names)" in capsys.readouterr().err


def test_evaluate_takes_run_folders_tags_and_hub_folders(run, tmp_path, capsys):
    """A run folder scores as its best.safetensors; the shipped tag, its Hub folder and that folder's bare weights
    file with the facts spelled out all give one result on 48x48 gray FER-2013 faces."""
    cfg, run_dir, metrics = run
    assert evaluate_checkpoint(run_dir, cfg.data, split="val", workers=0) == metrics
    fer = make_fer2013_folders(tmp_path / "fer2013", {"Training": 1, "PublicTest": 1, "PrivateTest": 3})
    folder = Path(timm_acsi.__file__).parent / "weights" / "acsinet18.fer2013"
    by_tag = evaluate_checkpoint("acsinet18.fer2013", fer, workers=0)
    assert by_tag["num_samples"] == 21 and by_tag["label_names"] == list(FER7_LABELS)
    # the same 21 PrivateTest faces through timm alone: its data config and transform, grayscale as the tag says
    model = timm.create_model("acsinet18.fer2013", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    matrix = [[0] * 7 for _ in range(7)]
    for path, target in build_dataset(fer, "test").samples:
        with Image.open(path) as img, torch.no_grad():
            matrix[target][int(model(transform(img.convert("L").convert("RGB"))[None]).argmax())] += 1
    assert by_tag["confusion_matrix"] == matrix
    assert evaluate_checkpoint(folder, fer, workers=0) == by_tag
    assert evaluate_checkpoint(f"local-dir:{folder}", fer, workers=0) == by_tag
    bare = dict(model_name="acsinet18", label_names=FER7_LABELS, img_size=48, resize=48)
    assert evaluate_checkpoint(folder / "model.safetensors", fer, workers=0, **bare) == by_tag
    argv = ["--checkpoint", "acsinet18.fer2013", "--data", str(fer), "--workers", "0", "--quiet"]
    assert run_command("evaluate", argv + ["--model", "acsinet18", "--num-classes", "7"]) == 2
    assert "--model and --num-classes describe a bare weights file; acsinet18.fer2013 describes itself." in (
        capsys.readouterr().err
    )
    assert run_command("evaluate", ["--checkpoint", "acsinet18.rafdb"] + argv[2:]) == 2
    assert "acsinet18.rafdb" in capsys.readouterr().err


def test_evaluate_resizes_by_the_checkpoint_crop_pct(run, tmp_path, monkeypatch):
    cfg, run_dir, _ = run
    meta = {**read_checkpoint_meta(run_dir / "best.safetensors"), "crop_pct": 0.7}
    save_checkpoint(tmp_path / "c.safetensors", load_file(str(run_dir / "best.safetensors")), meta)
    seen = []

    def spy(is_training, img_size, resize, grayscale):
        seen.append((img_size, resize))
        raise KeyboardInterrupt  # stop before reading the data

    monkeypatch.setattr(train_evaluation, "create_fer_transform", spy)
    for kwargs, expected in (({}, (28, 40)), ({"img_size": 56}, (56, 80)), ({"resize": 30}, (28, 30))):
        with pytest.raises(KeyboardInterrupt):
            evaluate_checkpoint(tmp_path / "c.safetensors", cfg.data, split="val", **kwargs)
        assert seen.pop() == expected


def test_evaluate_reads_grayscale_and_a_null_crop_pct_from_the_description(run, tmp_path, monkeypatch):
    """A model trained on grayscale faces is fed grayscale faces; "crop_pct": null means the recipe's 224/256."""
    cfg, run_dir, _ = run
    meta = {**read_checkpoint_meta(run_dir / "best.safetensors"), "grayscale": True, "crop_pct": None}
    save_checkpoint(tmp_path / "gray.safetensors", load_file(str(run_dir / "best.safetensors")), meta)
    seen = []

    def spy(is_training, img_size, resize, grayscale):
        seen.append((img_size, resize, grayscale))
        raise KeyboardInterrupt  # stop before reading the data

    monkeypatch.setattr(train_evaluation, "create_fer_transform", spy)
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(tmp_path / "gray.safetensors", cfg.data, split="val")
    assert seen == [(28, 32, True)]


def test_evaluate_sizes_a_bare_checkpoint_by_its_own_classifier(tmp_path):
    """The class count of a description-less checkpoint comes from the architecture's classifier (timm's
    pretrained_cfg), not from a hard-coded fc.weight: test_efficientnet's is classifier.weight."""
    model = timm.create_model("test_efficientnet", num_classes=7)
    save_file(model.state_dict(), str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="does not record the order of its 7 outputs"):
        evaluate_checkpoint(tmp_path / "bare.safetensors", tmp_path, model_name="test_efficientnet")


def test_evaluate_refuses_bad_input_before_evaluating(run, tmp_path, capsys, monkeypatch):
    cfg, run_dir, _ = run
    (tmp_path / "taken").write_text("mine")
    argv = ["--checkpoint", str(run_dir / "best.safetensors"), "--data", cfg.data, "--split", "val", "--quiet"]
    monkeypatch.setattr(evaluate_cli, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated"))
    assert run_command("evaluate", argv + ["--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == (
        f"timm-acsi evaluate: error: --out {tmp_path / 'taken'} is a file: pass a folder for metrics.json and "
        "confusion_matrix.png.\n"
    )
    assert (tmp_path / "taken").read_text() == "mine"
    for flag in ("--img-size", "--resize", "--batch-size"):
        with pytest.raises(SystemExit) as info:
            run_command("evaluate", argv + [flag, "0"])
        assert info.value.code == 2
        assert capsys.readouterr().err.endswith(
            f"timm-acsi evaluate: error: argument {flag}: must be at least 1, got 0\n"
        )
    for kwargs, message in (
        ({"img_size": 0}, r"img_size \(--img-size\) must be at least 1, got 0"),
        ({"workers": -1}, r"workers \(--workers\) must be at least 0, got -1"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluate_checkpoint(run_dir / "best.safetensors", cfg.data, **kwargs)


def test_evaluate_refuses_non_finite_weights(run, tmp_path, capsys):
    """A diverged model predicts one class for everything (14.29% on 7 balanced classes): refused, as publish does."""
    cfg, run_dir, _ = run
    state = load_file(str(run_dir / "best.safetensors"))
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.safetensors", state, read_checkpoint_meta(run_dir / "best.safetensors"))
    argv = ["--checkpoint", str(tmp_path / "nan.safetensors"), "--data", cfg.data, "--split", "val", "--quiet"]
    assert run_command("evaluate", argv) == 2
    err = capsys.readouterr().err
    assert "nan.safetensors holds NaN/inf weights (1 tensors: layer1.0.conv1.weight)" in err and err.count("\n") == 1


def test_publish_dry_run_of_trained_checkpoint(run, tmp_path, capsys):
    pytest.importorskip("timm_acsi.cli.publish")
    _, run_dir, _ = run
    argv = [
        "--model",
        "acsinet18",
        "--checkpoint",
        str(run_dir / "best.safetensors"),
        "--metrics",
        str(run_dir / "metrics.json"),
        "--repo-id",
        "my-org/acsinet18.test",
        "--dry-run",
        str(tmp_path / "hub"),
    ]
    assert run_command("publish", argv) == 0
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == "acsinet18" and config["num_classes"] == 7
    assert config["label_names"] == list(FER7_LABELS)
    published = load_file(str(tmp_path / "hub" / "model.safetensors"))
    best = load_file(str(run_dir / "best.safetensors"))
    assert published.keys() == best.keys() and all(torch.equal(published[k], best[k]) for k in best)


# ------------------------------------------------------------------------------------ settings and bad input


def test_config_checks_types_and_ranges():
    """Wrong types and values fail when the config is made, naming the field and its flag."""
    for kwargs, message in (
        ({"epochs": "two"}, "epochs (--epochs) must be an integer, got 'two' (str)."),
        ({"lr": "fast"}, "lr (--lr) must be a number, got 'fast' (str)."),
        ({"img_size": 0}, "img_size (--img-size) must be at least 1 (e.g. 224), got 0."),
        ({"label_smoothing": 2}, "label_smoothing (--label-smoothing) must be in [0, 1) (e.g. 0.1), got 2.0."),
        ({"scale": (0.5, 0.2)}, "scale (--scale) must be two area fractions 0 < MIN <= MAX <= 1, got [0.5, 0.2]."),
        ({"balanced": "yes"}, "balanced (--balanced) must be true or false, got 'yes' (str)."),
        ({"train_crops": "ten"}, "train_crops (--train-crops) must be one of five_flip, random, got 'ten'."),
    ):
        with pytest.raises(ValueError) as info:
            TrainConfig(**kwargs)
        assert str(info.value) == message
    assert TrainConfig(lr="1e-3").lr == 0.001  # YAML reads 1e-3 as a string
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_config_file_errors_name_file_key_and_line(tmp_path, capsys):
    cases = {
        "types.yaml": ("data: d\nepochs: two\n", " line 2: epochs (--epochs) must be an integer, got 'two' (str)."),
        "lr.yaml": ("lr: fast\n", " line 1: lr (--lr) must be a number, got 'fast' (str)."),
        "broken.yaml": ("epochs: [1, 2\nlr: 0.1\n", " line 2, column 3: malformed YAML (expected ',' or ']'"),
        "broken.json": ('{"epochs": 2,}', " line 1, column 14: malformed JSON (Expecting property name"),
        "types.json": ('{"epochs": 2.5}', ": epochs (--epochs) must be an integer, got 2.5 (float)."),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError) as info:
            load_config_file(path)
        assert str(info.value).startswith(f"{path}{message}"), str(info.value)
        assert run_command("train", ["--config", str(path), "--output", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"timm-acsi train: error: {path}{message}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_bad_settings_fail_before_the_run_folder_is_created(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(dataset), "--output", str(out), "--quiet", "--workers", "0"]
    no_gpu = "cuda:99" if torch.cuda.is_available() else "cuda"
    for extra, message in (
        (["--img-size", "0"], "img_size (--img-size) must be at least 1"),
        (["--label-smoothing", "2"], "label_smoothing (--label-smoothing) must be in [0, 1)"),
        (["--device", no_gpu], f"--device {no_gpu}: "),
    ):
        assert run_command("train", argv + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"timm-acsi train: error: {message}") and err.count("\n") == 1, err
        assert not out.exists()


def test_classes_without_training_images_are_refused(tmp_path, capsys):
    one_class = make_folder_dataset(tmp_path / "one", per_class=2, size=8, classes=["happy"])
    seven = make_folder_dataset(tmp_path / "seven", per_class=1, size=8)
    argv = ["--output", str(tmp_path / "run"), "--quiet", "--workers", "0", "--batch-size", "1"]
    assert run_command("train", argv + ["--data", str(one_class)]) == 2
    err = capsys.readouterr().err
    assert "no training images of class(es) anger, disgust, fear, sadness, surprise, neutral (7 classes" in err
    assert run_command("train", argv + ["--data", str(seven), "--num-classes", "8"]) == 2
    err = capsys.readouterr().err
    assert "no training images of class(es) contempt (8 classes asked for). Pass --num-classes 7" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_unreadable_image_is_one_line_with_worker_processes(tmp_path, capsys):
    """The same one-line error with --workers 0 and 1 (torch prefixes a worker's error with its traceback)."""
    data = make_folder_dataset(tmp_path / "fer", per_class=2, size=8)
    (data / "train" / "happy" / "000.png").write_bytes(b"not a png")
    errors = []
    for workers in ("0", "1"):
        argv = ["--data", str(data), "--output", str(tmp_path / f"run{workers}"), "--quiet", "--batch-size", "14"]
        assert run_command("train", argv + ["--workers", workers, "--train-crops", "random"]) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and errors[0].count("\n") == 1 and "000.png" in errors[0]
    assert not (tmp_path / "run0").exists() and not (tmp_path / "run1").exists()


def test_diverging_run_stops_and_keeps_nothing_of_the_epoch(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(dataset), "--output", str(out), "--quiet", "--workers", "0", "--epochs", "1"]
    argv += ["--img-size", "28", "--resize", "32", "--batch-size", "7", "--lr", "1e6"]
    assert run_command("train", argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-acsi train: error: Training diverged in epoch 1: train loss ")
    assert "Nothing was saved: run it again and a lower --lr" in err and err.count("\n") == 1
    assert not out.exists()  # nothing blocks a rerun


def test_a_non_finite_metric_is_never_the_best():
    state = train_loop._State()
    model = torch.nn.Linear(1, 1)
    assert not train_loop._record(state, {"epoch": 1, "val_acc": float("nan")}, "val_acc", model)
    assert state.best_weights is None and state.best_epoch == 0
    assert train_loop._record(state, {"epoch": 2, "val_acc": 0.5}, "val_acc", model) and state.best_epoch == 2


def test_resume_refuses_another_model_or_fewer_epochs(run, tmp_path, capsys):
    """Checked up front (the weights could not load; fewer epochs would rewrite a finished run): nothing changes."""
    cfg, run_dir, _ = run
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    argv = ["--output", str(out), "--resume", "--quiet"]
    for extra, message in (
        (["--model", "coresnet18"], "the run was acsinet18, 7 classes, not coresnet18, 7 classes. Drop --model"),
        (["--num-classes", "8"], "the run was acsinet18, 7 classes, not acsinet18, 8 classes."),
        (["--model-args", "final_attn=false"], 'not acsinet18 with model_args {"final_attn": false}, 7 classes'),
        (["--epochs", "1"], "it has completed 2 epochs, more than --epochs 1. Pass --epochs above 2"),
    ):
        assert run_command("train", argv + extra) == 2
        err = capsys.readouterr().err
        assert f"timm-acsi train: error: Cannot resume {out}: " in err and message in err and err.count("\n") == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_run_folder_another_training_writes_is_refused(run, tmp_path, capsys):
    """A second --resume, or an --overwrite, on a folder that a running training holds is refused before it reads or
    changes anything; once that training ends (its lock goes with its process), the folder is free again."""
    cfg, run_dir, _ = run
    out = tmp_path / "busy"
    shutil.copytree(run_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    message = f"{out} is in use: another timm-acsi train is writing to it. Wait for that run to end"
    with RunFolderLock() as running:
        running.acquire(out)
        for flag in ("--resume", "--overwrite"):
            argv = ["--data", str(cfg.data), "--output", str(out), flag, "--epochs", "3", "--quiet"]
            assert run_command("train", argv) == 2
            assert f"timm-acsi train: error: {message}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    train(dataclasses.replace(cfg, output=str(out), epochs=3), resume=True, progress=False)
    with RunFolderLock() as after:
        after.acquire(out)  # train released it


def test_a_new_run_into_a_folder_in_use_is_refused(run, tmp_path):
    """Two new runs started into one folder: the second stops before its first epoch writes or removes anything."""
    cfg, _, _ = run
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with RunFolderLock() as first:
        first.acquire(folder)
        with pytest.raises(RunFolderBusyError, match="is in use"):
            train(dataclasses.replace(cfg, output=str(folder)), progress=False)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_resume_with_another_best_metric_compares_like_with_like(run, tmp_path):
    """The kept best epoch is judged by the new metric (its value from the log), not by the old metric's best:
    here its val_acc is 1.0 and its mean-class accuracy 0.0, so any learning epoch 3 beats it."""
    cfg, run_dir, _ = run
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    best_epoch = read_checkpoint_meta(out / "best.safetensors")["epoch"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    log[best_epoch - 1].update(val_acc=1.0, val_mean_class_acc=0.0)
    (out / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    state = torch.load(out / "last_state.pt", weights_only=True)
    torch.save({**state, "best": 1.0}, out / "last_state.pt")
    train(
        dataclasses.replace(cfg, output=str(out), epochs=3, best_metric="val_mean_class_acc"),
        resume=True,
        progress=False,
    )
    meta = read_checkpoint_meta(out / "best.safetensors")
    assert meta["epoch"] == 3 and meta["metric"]["name"] == "val_mean_class_acc"


def test_scaler_state_of_a_run_without_amp_is_not_loaded():
    """Resuming with --amp on CUDA a run saved without it: the saved scaler state is empty ({}), which an enabled
    GradScaler refuses; the scaler starts afresh instead (a saved state is loaded)."""
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="source state dict is empty"):
        scaler.load_state_dict({})
    train_loop.restore_scaler(scaler, {})
    assert scaler.get_scale() == 65536.0
    saved = {**scaler.state_dict(), "scale": 8.0}
    train_loop.restore_scaler(scaler, saved)
    assert scaler.get_scale() == 8.0


def test_warmup_rises_at_every_update_within_the_first_epoch():
    """--warmup-epochs 2 with 4 updates per epoch: the lr climbs from warmup_lr over 8 updates instead of
    spending the whole first epoch at warmup_lr; the epoch reports the mean lr of its updates."""
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 5, generator=g), torch.arange(16) % 3), batch_size=4)
    cfg = TrainConfig(batch_size=4, lr=0.01, warmup_epochs=2, warmup_lr=1e-5, sched="cosine", epochs=4)
    model = torch.nn.Linear(5, 3)
    optimizer, scheduler = create_optimizer_and_scheduler(model, cfg, updates_per_epoch=4)
    scheduler.step_update(0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train_loop._train_one_epoch(
        model, loader, torch.nn.CrossEntropyLoss(), optimizer, scaler, cfg, DistInfo(), "t", False, scheduler, 0
    )
    step = (0.01 - 1e-5) / 8
    assert stats["lr"] == pytest.approx(1e-5 + step * (0 + 1 + 2 + 3) / 4, rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 + 4 * step, rel=1e-12)  # the next update's


# ------------------------------------------------------------------------------------------ distributed


#: torchrun with 2 processes on this machine; --standalone lets it pick a free rendezvous port itself.
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def test_ddp_two_processes_cover_val_set_once(tmp_path):
    """torchrun, 2 CPU processes (gloo), balanced sampling + accumulation + label smoothing; 21 val images
    split 11/10 with no padding duplicate: metrics.json holds each val image once and matches a
    single-process evaluation of best.safetensors."""
    data = make_rafdb_dataset(tmp_path / "rafdb", per_class=3, size=32)  # 21 train / 21 test, val = test
    out = tmp_path / "ddp"
    cmd = list(TORCHRUN_2)
    launch = tmp_path / "launch.py"  # the CLI, then whether it left its process group behind
    launch.write_text(
        "import sys\nimport torch.distributed as dist\nfrom timm_acsi.cli import run_command\n"
        "rc = run_command('train', sys.argv[1:])\n"
        # one write of one line: the two ranks share the pipe, and separate writes can interleave
        "sys.stdout.flush()\nsys.stdout.write(f'process group left: {dist.is_initialized()}\\n')\nsys.stdout.flush()\n"
        "sys.exit(rc)\n"
    )
    cmd += [str(launch), "--data", str(data), "--output", str(out), "--epochs", "1"]
    cmd += ["--img-size", "28", "--resize", "32", "--batch-size", "4", "--workers", "0", "--quiet"]
    cmd += ["--balanced", "--accum-steps", "2", "--label-smoothing", "0.1", "--channels-last"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    assert result.stdout.count("RAF-DB [test]: accuracy") == 1  # only rank 0 prints
    assert result.stdout.count("process group left: False") == 2  # train() destroys the group it created
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["epoch"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["split"], metrics["num_samples"]) == ("RAF-DB", "test", 21)
    assert [sum(row) for row in metrics["confusion_matrix"]] == [3] * 7
    single = evaluate_checkpoint(out / "best.safetensors", data, split="test", workers=0)
    assert single["confusion_matrix"] == metrics["confusion_matrix"]
    assert yaml.safe_load((out / "config.yaml").read_text())["balanced"] is True


def test_ddp_damaged_resume_state_fails_on_every_rank(run, tmp_path):
    """A corrupt last_state.pt, read by rank 0 only: every rank stops with the error (none waits forever)."""
    cfg, run_dir, _ = run
    out = tmp_path / "damaged"
    shutil.copytree(run_dir, out)
    (out / "last_state.pt").write_bytes(b"not a torch file")
    cmd = list(TORCHRUN_2)
    cmd += ["-m", "timm_acsi.cli.train", "--output", str(out), "--resume", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert result.stderr.count("last_state.pt cannot be read (UnpicklingError") == 2, result.stderr


# ---------------------------------------------------------------------------------------------- compile


class _Compiled(torch.nn.Module):
    """torch.compile's OptimizedModule in small (a real compile takes minutes on a CPU): the model as
    ``_orig_mod``, so that its state dict carries the ``_orig_mod.`` prefix; counts the forwards through it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self._orig_mod(x)


def test_compile_trains_through_the_compiled_model_and_saves_plain_names(dataset, tmp_path, monkeypatch, capsys):
    compiled = []

    def fake_compile(model: torch.nn.Module, **kwargs) -> _Compiled:
        compiled.append(_Compiled(model))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = _cfg(dataset, tmp_path / "run", epochs=1, compile=True)
    train(cfg, progress=False)
    assert len(compiled) == 1 and type(compiled[0]._orig_mod).__name__ == "CoResNet"
    assert compiled[0].calls == 6  # the 6 training batches; validation runs the plain model
    run_dir = Path(cfg.output)
    names = set(timm.create_model("acsinet18", num_classes=7).state_dict())
    assert set(load_file(str(run_dir / "best.safetensors"))) == names
    assert set(load_file(str(run_dir / "last.safetensors"))) == names
    assert set(torch.load(run_dir / "last_state.pt", weights_only=True)["model"]) == names
    assert load_config_file(run_dir / "config.yaml")["compile"] is True
    # compile changes how a run is computed, not what: the config hash ignores it
    assert read_checkpoint_meta(run_dir / "best.safetensors")["config_hash"] == config_hash(
        dataclasses.replace(cfg, compile=False)
    )
    assert config_hash(cfg) != config_hash(dataclasses.replace(cfg, lr=0.5))
    assert run_command("train", ["--compile", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["compile"] is True
