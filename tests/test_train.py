"""Training pipeline: config, run folder, samplers, short training runs, resume, DDP, evaluate, publish.

Runs train acsinet18 on tiny synthetic datasets (tests/fer_fixtures.py: one solid colour per class, 32 px
images, 28 px crops) on the CPU. One shared run (module fixture) serves most assertions.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from fer_fixtures import make_folder_dataset, make_rafdb_dataset
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

import timm_acsi.train as train_mod
from timm_acsi.checkpoint import read_checkpoint_meta, save_checkpoint
from timm_acsi.cli import evaluate as evaluate_cli
from timm_acsi.cli import train as train_cli
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
    for epoch in (0, 19, 20, 39, 40, 59):
        scheduler.step(epoch)
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
    with pytest.raises(ValueError, match="num_classes must be 7"):
        TrainConfig(num_classes=6)


def test_cli_precedence_defaults_file_flags(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"lr": 0.5, "amp": True, "epochs": 7, "data": "from_file"}))
    argv = ["--config", str(tmp_path / "c.yaml"), "--lr", "0.1", "--no-amp", "--model-args", "attn_placement=stage"]
    assert train_cli.main(argv + ["--print-config"], prog="t") == 0
    printed = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert (printed.lr, printed.amp, printed.epochs, printed.data) == (0.1, False, 7, "from_file")
    assert printed.model_args == {"attn_placement": "stage"}
    assert printed.weight_decay == 5e-4  # untouched default
    assert train_cli.main(["--config", str(tmp_path / "missing.yaml")], prog="t") == 2


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
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        prepare_run_dir(run_dir)
    with pytest.raises(FileNotFoundError, match="last_state.pt"):
        prepare_run_dir(run_dir, resume=True)
    prepare_run_dir(run_dir, overwrite=True)
    assert not (run_dir / "log.jsonl").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"  # only run files are removed


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
        stats = train_mod._train_one_epoch(
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
    stats = train_mod._train_one_epoch(
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
    assert train_cli.main(argv + ["--pretrained"], prog="t") == 2
    assert capsys.readouterr().err == (
        "t: error: --pretrained: acsinet18.rafdb has no published weights. Use an ImageNet tag "
        "(--model acsinet18.tv_in1k) or --init-checkpoint FILE.\n"
    )
    assert train_cli.main(argv + ["--model", "acsinet19"], prog="t") == 2
    assert "Unknown model 'acsinet19'" in capsys.readouterr().err
    assert not out.exists()  # refused before the run folder or the data were touched


def test_train_one_epoch_waits_for_the_device_once_per_epoch(monkeypatch):
    """No host-device sync per batch: the number of tensor -> Python conversions does not grow with the batches."""
    conversions = []
    for name in ("__float__", "item", "__bool__", "__int__"):
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
        train_mod._train_one_epoch(
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
    assert counts[0] == counts[1]


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
    rc = train_cli.main(["--data", cfg.data, "--output", str(run_dir), "--epochs", "1", "--quiet"], prog="t")
    assert rc == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_resume_continues_exactly(run, tmp_path, monkeypatch):
    """A run killed during epoch 2 and resumed ends bit-identical to the uninterrupted run (the lr changes
    at epoch 2, so the scheduler state matters too)."""
    cfg, run_dir, _ = run
    out = tmp_path / "resumed"
    calls, real = [], train_mod._train_one_epoch

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(cfg, output=str(out)), progress=False)
    monkeypatch.setattr(train_mod, "_train_one_epoch", real)
    assert read_checkpoint_meta(out / "last.safetensors")["epoch"] == 1
    assert train_cli.main(["--output", str(out), "--resume", "--quiet"], prog="t") == 0  # config from the folder

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


def _log_results(path: Path):
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")}
        for line in path.read_text().splitlines()
    ]


def test_resume_follows_changed_schedule_settings(dataset, tmp_path, caplog):
    """A 2-epoch cosine run resumed with --epochs 4 trains epochs 3-4 at a fresh 4-epoch cosine schedule's lrs
    (the saved scheduler state would bring back the 2-epoch schedule: lr 0), and says what changed."""
    cfg = _cfg(dataset, tmp_path / "cosine", sched="cosine")
    train(cfg, progress=False)
    longer = dataclasses.replace(cfg, epochs=4)
    with caplog.at_level("WARNING", logger="timm_acsi.train"):
        train(longer, resume=True, progress=False)
    _, scheduler = create_optimizer_and_scheduler(torch.nn.Linear(1, 1), longer)
    expected = []
    for epoch in range(4):
        scheduler.step(epoch)
        expected.append(scheduler.optimizer.param_groups[0]["lr"])
    assert expected == pytest.approx([0.02, 0.02 * (1 + 2**-0.5) / 2, 0.01, 0.02 * (1 - 2**-0.5) / 2])
    log = _log_results(Path(cfg.output) / "log.jsonl")
    assert [e["lr"] for e in log] == pytest.approx([0.02, 0.01, *expected[2:]])  # epochs 1-2: 2-epoch cosine
    assert config_from_dict(load_config_file(Path(cfg.output) / "config.yaml")) == longer
    assert "changed settings (config.yaml is updated): epochs 2 -> 4" in caplog.text


def test_resume_after_kill_between_checkpoint_writes(run, tmp_path, monkeypatch):
    """Killed after writing epoch 2's best.safetensors and last.safetensors, before last_state.pt: the resume
    state (epoch 1, with its own weights) is the commit point, epoch 2 is redone and the run ends as the
    uninterrupted one. A best.safetensors older than the state says is refused."""
    cfg, run_dir, _ = run
    out = tmp_path / "killed"
    real, calls = train_mod._save_resume_state, []

    def killed_at_epoch_2(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(train_mod, "_save_resume_state", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(cfg, output=str(out)), progress=False)
    monkeypatch.setattr(train_mod, "_save_resume_state", real)
    assert torch.load(out / "last_state.pt", weights_only=True)["epoch"] == 1
    assert read_checkpoint_meta(out / "best.safetensors")["epoch"] == 2  # newer than the state's best epoch (1)
    train(dataclasses.replace(cfg, output=str(out)), resume=True, progress=False)

    for name in ("last.safetensors", "best.safetensors"):
        expected, resumed = load_file(str(run_dir / name)), load_file(str(out / name))
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), name
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
    assert evaluate_cli.main(argv + ["--out", str(tmp_path / "plain"), "--quiet"], prog="e") == 0
    assert f"accuracy {100 * metrics['accuracy']:.2f}%" in capsys.readouterr().out
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text()) == metrics  # same model, same split
    assert evaluate_cli.main(argv + ["--tta-flip", "--json", "--out", str(tmp_path / "tta"), "--quiet"], prog="e") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "tta" / "metrics.json").read_text())
    assert printed["num_samples"] == 42 and printed["split"] == "val"
    assert (tmp_path / "tta" / "confusion_matrix.png").is_file()
    assert evaluate_cli.main(argv[:2] + ["--data", str(tmp_path / "nowhere")], prog="e") == 2
    with pytest.raises(SystemExit):  # --layout takes the known layouts only
        evaluate_cli.main(argv + ["--layout", "rafbd"], prog="e")


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
        assert evaluate_cli.main(argv, prog="e") == 2
    err = capsys.readouterr().err
    assert "already holds metrics.json" in err and "--overwrite" in err
    assert (out / "metrics.json").read_text() == "mine"
    assert evaluate_cli.main(argv + ["--overwrite"], prog="e") == 0
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
    assert evaluate_cli.main(argv + ["--label-names", ",".join(rafdb_order)], prog="e") == 0
    assert json.loads(capsys.readouterr().out)["confusion_matrix"] == metrics["confusion_matrix"]
    # the wrong architecture: a short description of the file, not torch's key dump
    assert evaluate_cli.main(argv[:-1] + ["coresnet18", "--label-names", ",".join(rafdb_order)], prog="e") == 2
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
    assert evaluate_cli.main(argv, prog="e") == 2
    assert "does not fit acsinet18" in capsys.readouterr().err
    assert evaluate_cli.main(argv + ["--model-args", "attn_placement=stage", "final_attn=false"], prog="e") == 0
    capsys.readouterr()
    described = ["--checkpoint", str(run_dir / "best.safetensors"), "--data", cfg.data, "--split", "val"]
    assert evaluate_cli.main(described + ["--model-args", "attn_placement=stage"], prog="e") == 2
    assert "says model_args {}, not {'attn_placement': 'stage'}: drop --model-args" in capsys.readouterr().err


def test_evaluate_refuses_flags_contradicting_the_checkpoint(run, capsys):
    cfg, run_dir, _ = run
    argv = ["--checkpoint", str(run_dir / "best.safetensors"), "--data", cfg.data, "--split", "val", "--workers", "0"]
    assert evaluate_cli.main(argv + ["--model", "coresnet18"], prog="e") == 2
    assert "says architecture acsinet18, not coresnet18: drop the model name (--model)" in capsys.readouterr().err
    assert evaluate_cli.main(argv + ["--num-classes", "8"], prog="e") == 2
    assert "says it has 7 classes, not 8: drop num_classes (--num-classes)" in capsys.readouterr().err
    reversed_names = ",".join(reversed(FER7_LABELS))
    assert evaluate_cli.main(argv + ["--label-names", reversed_names], prog="e") == 2
    assert "drop label_names (--label-names)" in capsys.readouterr().err


def test_evaluate_resizes_by_the_checkpoint_crop_pct(run, tmp_path, monkeypatch):
    cfg, run_dir, _ = run
    meta = {**read_checkpoint_meta(run_dir / "best.safetensors"), "crop_pct": 0.7}
    save_checkpoint(tmp_path / "c.safetensors", load_file(str(run_dir / "best.safetensors")), meta)
    seen = []

    def spy(is_training, img_size, resize):
        seen.append((img_size, resize))
        raise KeyboardInterrupt  # stop before reading the data

    monkeypatch.setattr(train_mod, "create_fer_transform", spy)
    for kwargs, expected in (({}, (28, 40)), ({"img_size": 56}, (56, 80)), ({"resize": 30}, (28, 30))):
        with pytest.raises(KeyboardInterrupt):
            evaluate_checkpoint(tmp_path / "c.safetensors", cfg.data, split="val", **kwargs)
        assert seen.pop() == expected


def test_publish_dry_run_of_trained_checkpoint(run, tmp_path, capsys):
    publish_cli = pytest.importorskip("timm_acsi.cli.publish")
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
    assert publish_cli.main(argv, prog="p") == 0
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == "acsinet18" and config["num_classes"] == 7
    assert config["label_names"] == list(FER7_LABELS)
    published = load_file(str(tmp_path / "hub" / "model.safetensors"))
    best = load_file(str(run_dir / "best.safetensors"))
    assert all(torch.equal(published[k], best[k]) for k in best)


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
        "import sys\nimport torch.distributed as dist\nfrom timm_acsi.cli.train import main\n"
        "rc = main(sys.argv[1:], 't')\nprint('process group left:', dist.is_initialized())\nsys.exit(rc)\n"
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
