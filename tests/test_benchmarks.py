"""The speed benchmarks run end to end on tiny settings (their numbers are measured, never asserted: see
docs/speed.md), and the op profiler attributes each op to the module group it belongs to."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from timm_acsi.profiling import Latency

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _script(name: str, *argv: str, returncode: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCHMARKS / name), "--threads", "1", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == returncode, result.stderr
    return result


def _markdown_rows(path: Path) -> list:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_scaling_sweep_writes_a_ratio_table_and_a_plot(tmp_path):
    md, png = tmp_path / "scaling.md", tmp_path / "plot" / "scaling.png"
    argv = ["--models", "resnet18", "coresnet18", "--batch-sizes", "2", "3", "--img-sizes", "32", "40"]
    _script("scaling_sweep.py", *argv, "--rounds", "1", "--min-time", "0", "--markdown", str(md), "--plot", str(png))
    header, _, *rows = _markdown_rows(md)
    assert header == ["mode", "img", "batch", "resnet18 ms", "coresnet18 / resnet18"]
    cells = [(mode, int(img), int(batch)) for mode, img, batch, *_ in rows]
    assert cells == [(mode, img, batch) for mode in ("inference", "training") for img in (32, 40) for batch in (2, 3)]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)
    # two panels (one per mode) side by side, a legend line per model and one for the input sizes
    assert Image.open(png).size == (70 + 2 * (560 + 70) + 10, 60 + 400 + 60 + 24 * 2)


def test_scaling_sweep_refuses_to_overwrite_before_measuring(tmp_path):
    md = tmp_path / "scaling.md"
    md.write_text("kept")
    argv = ["--models", "resnet18", "--batch-sizes", "2", "--img-sizes", "32", "--rounds", "1", "--min-time", "0"]
    err = _script("scaling_sweep.py", *argv, "--markdown", str(md), returncode=2).stderr
    assert f"error: {md} exists: pass --overwrite to replace it." in err and md.read_text() == "kept"
    out = _script("scaling_sweep.py", *argv, "--markdown", str(md), "--overwrite").stdout
    assert md.read_text().startswith("Time ratio to resnet18") and "wrote" in out and ".png" not in out  # no --plot


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("train_throughput.py", ["--clock", "cpu", "--threads", "2"], "--clock cpu needs --threads 1"),
        ("train_throughput.py", ["--iters", "0"], "argument --iters: must be at least 1, got 0"),
        ("compile_speedup.py", ["--warmup", "0"], "argument --warmup: must be at least 1, got 0"),
        ("predict_throughput.py", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
        ("export_latency.py", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ],
)
def test_benchmark_options_are_checked(name, argv, message):
    """Bad settings stop at the command line (exit 2), not in a ZeroDivisionError or a misleading number."""
    assert message in _script(name, *argv, returncode=2).stderr


def test_predict_throughput_times_every_step_and_model():
    out = _script(
        "predict_throughput.py", "--models", "coresnet18", "--sizes", "32", "--batch-sizes", "2",
        "--rounds", "1", "--iters", "1", "--clock", "cpu",
    ).stdout  # fmt: skip
    assert "(1 torch threads, 1 OpenCV threads), cpu clock" in out
    assert "CPU ms/image" in out and "crop -> 32x32" in out and "end to end rec(photo), acsinet18 at 32" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("resnet18 ", "coresnet18 "))}
    assert rows["resnet18"][1:3] == ["32", "2"] and rows["resnet18"][-1] == "1.000"
    assert float(rows["coresnet18"][-1]) > 0


def test_export_latency_times_both_runtimes():
    out = _script(
        "export_latency.py", "--models", "resnet18", "--img-size", "32", "--batch-sizes", "1",
        "--warmup", "0", "--rounds", "1", "--iters", "1", "--clock", "cpu",
    ).stdout  # fmt: skip
    assert "exported resnet18" in out and "(tolerance 1e-04: passed)" in out
    header, row = out.splitlines()[-2:]
    assert header.split()[-3:] == ["t/r18", "ORT", "img/cpu-s"]
    assert row.split()[:2] == ["resnet18", "1"] and row.split()[5:7] == ["1.000", "1.000"]


def test_train_throughput_prints_every_model_with_its_ratio():
    out = _script(
        "train_throughput.py", "--models", "coresnet18", "--img-size", "32", "--batch-size", "2",
        "--warmup", "1", "--iters", "1", "--rounds", "2", "--clock", "cpu",
    ).stdout  # fmt: skip
    assert "batch 2 at 32x32" in out and "cpu clock, median of 2 rounds x 1 steps" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert set(rows) == {"resnet18", "coresnet18"}
    assert rows["resnet18"][-1] == "1.000" and float(rows["coresnet18"][-1]) > 0


def test_compile_speedup_times_each_model_eager_and_compiled():
    """Every model, resnet18 added, gets an eager and a compiled time; resnet18's own ratios are 1.000."""
    out = _script(
        "compile_speedup.py", "--models", "coresnet18", "--img-size", "32", "--batch-size", "2",
        "--warmup", "1", "--iters", "1", "--rounds", "1",
    ).stdout  # fmt: skip
    assert "batch 2 at 32x32" in out and "median of 1 interleaved rounds x 1 forwards" in out
    header, *lines = out.splitlines()[1:]
    assert header.split() == "model eager ms compiled ms compiled/eager eager x resnet18 compiled x resnet18".split()
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines}
    assert set(rows) == {"resnet18", "coresnet18"}
    assert rows["resnet18"][3:] == [1.0, 1.0]
    for eager, compiled, ratio, *_ in rows.values():
        assert eager > 0 and compiled > 0 and ratio > 0


def _load(name: str, monkeypatch):
    """A benchmark script as a module (its folder on sys.path: the scripts import train_throughput)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_columns_divide_the_right_way(monkeypatch):
    """Time ratios are model / resnet18 (above 1: slower), from fixed medians rather than measured ones."""
    compile_speedup = _load("compile_speedup", monkeypatch)
    latency = {
        name: Latency(median_ms=ms, min_ms=ms, rounds=1, iters=1)
        for name, ms in [("resnet18", 10.0), ("resnet18 (compiled)", 5.0), ("a", 20.0), ("a (compiled)", 8.0)]
    }
    rows = compile_speedup.report(latency, ["resnet18", "a"]).splitlines()[1:]
    assert [row.split() for row in rows] == [
        ["resnet18", "10.0", "5.0", "0.500", "1.000", "1.000"],
        ["a", "20.0", "8.0", "0.400", "2.000", "1.600"],
    ]
    scaling_sweep = _load("scaling_sweep", monkeypatch)
    table = scaling_sweep.ratio_table({("inference", 48, 1): {"resnet18": 0.004, "a": 0.005}}, ["resnet18", "a"], True)
    assert table.splitlines()[-1] == "| inference | 48 | 1 | 4.0 | 1.250 |"


@pytest.fixture(scope="module")
def profile_ops():
    spec = importlib.util.spec_from_file_location("profile_ops", BENCHMARKS / "profile_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _profiles(profile_ops, mode: str, batch_size: int) -> dict:
    models = {name: timm.create_model(name, num_classes=7) for name in ("resnet18", "coresnet18", "acsinet18")}
    for model in models.values():
        profile_ops._mark_groups(model)
    x = torch.randn(batch_size, 3, 32, 32)
    return profile_ops.profile_setting(models, x, mode, warmup=0, iters=1)


def test_profile_ops_groups_forward_ops_by_module(profile_ops):
    profiles = _profiles(profile_ops, "forward", batch_size=1)
    calls = {name: {key: c for key, (_, c) in table.items()} for name, table in profiles.items()}
    convs, attn = profile_ops.CONVS, profile_ops.ATTN
    # 12 CoConvs in layer1-3 (layer4's level-1 convs are plain) concatenate their branches; resnet18 has no cat
    assert calls["coresnet18"][(convs, "aten::cat")] == 12 == calls["acsinet18"][(convs, "aten::cat")]
    assert not any(op == "aten::cat" for _, op in calls["resnet18"])
    # branch convs: layer1 level 4, layer2 level 3, layer3 level 2, 4 CoConvs each; resnet18: 12 plain 3x3 convs
    assert calls["coresnet18"][(convs, "aten::conv2d")] == 4 * (4 + 3 + 2)
    assert calls["resnet18"][(convs, "aten::conv2d")] == 12
    # coordinate attention: one module per residual block (8) and one after the stem: 3 convs each
    assert calls["acsinet18"][(attn, "aten::conv2d")] == 3 * 9
    for name in ("resnet18", "coresnet18"):
        assert not any(group == attn for group, _ in calls[name])


def test_profile_ops_gives_backward_ops_to_their_forward_group(profile_ops):
    profiles = _profiles(profile_ops, "train", batch_size=2)  # batch-norm needs 2 at 1x1
    groups = {name: profile_ops._by_group(table) for name, table in profiles.items()}
    assert groups["acsinet18"][profile_ops.ATTN] > 0 and groups["resnet18"][profile_ops.ATTN] == 0
    backward = {op for (group, op) in profiles["acsinet18"] if group == profile_ops.ATTN and "Backward" in op}
    assert {"SigmoidBackward0", "MeanBackward1"} <= backward, backward
    conv_backward = {op for (group, op) in profiles["coresnet18"] if group == profile_ops.CONVS and "Backward" in op}
    assert {"ConvolutionBackward0", "CatBackward0"} <= conv_backward, conv_backward


def test_profile_ops_writes_markdown_tables_and_keeps_an_existing_file(tmp_path):
    md = tmp_path / "ops.md"
    argv = ["--models", "resnet18", "coresnet18", "--batch-sizes", "1", "--img-size", "32", "--modes", "forward"]
    argv += ["--num-classes", "7", "--warmup", "0", "--iters", "1", "--top", "3", "--markdown", str(md)]
    out = _script("profile_ops.py", *argv).stdout
    assert f"wrote {md}" in out
    text = md.read_text()
    assert text.startswith("torch.profiler self CPU time per iteration (ms), 32x32, 1 threads")
    assert text.count("### batch 1, forward (eval)") == 1 and "Top ops of `coresnet18`:" in text
    header, _, *rows = _markdown_rows(md)
    assert header == ["group", "resnet18 ms (share) [vs resnet18]", "coresnet18 ms (share) [vs resnet18]"]
    summary, ops = rows[:4], rows[4:]
    assert [row[0] for row in summary] == ["3x3 convs (layer1-3)", "coordinate attention", "rest", "total"]
    assert summary[1][1:] == ["0.00 (0%)", "0.00 (0%) [+0.00]"]  # neither model has coordinate attention
    # each op table: a header, its alignment row, the top 3 ops and the total, which equals the summary's total
    assert len(ops) == 2 * (2 + 3 + 1) and ops[0] == ops[6] == ["group: op", "self ms", "%", "calls"]
    assert [ops[5][0], ops[11][0]] == ["total (resnet18)", "total (coresnet18)"]
    assert ops[5][1] == summary[3][1] and ops[11][1] == summary[3][2].split()[0]
    md.write_text("kept")
    err = _script("profile_ops.py", *argv, returncode=2).stderr
    assert f"error: {md} exists: pass --overwrite to replace it." in err and md.read_text() == "kept"
