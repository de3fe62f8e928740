"""Params/FLOPs profiler: exact fvcore counts, FlopCounterMode cross-check, CoConv parity (which can fail), CLI."""

import json
import sys
from contextlib import nullcontext
from typing import List

import pytest
import timm
import torch
from torch import nn

import timm_acsi  # noqa: F401  (registers the models)
from timm_acsi import AcsiCoordAttn, CoConv2d, profiling
from timm_acsi.cli import run_command
from timm_acsi.profiling import PAPER_FIGURES, PROFILE_SPECS, profile_model

RESNET18_FLOPS = 1_819_065_856  # fvcore, eval mode, 1x3x224x224 (docs/design.md)
RESNET18_PARAMS = 11_689_512
REGISTERED = ["coresnet18", "coresnet34", "coresnet50", "acsinet18", "acsinet34", "acsinet50"]
SMALL = (1, 3, 64, 64)


def _model(name: str) -> nn.Module:
    return timm.create_model(name, num_classes=1000)  # the paper's head


@pytest.fixture(scope="module")
def models():
    return {name: _model(name) for name in ("resnet18", "coresnet18", "acsinet18")}


@pytest.fixture(scope="module")
def profiles(models):
    return {name: profile_model(model) for name, model in models.items()}


def test_resnet18_exact_counts(profiles):
    prof = profiles["resnet18"]
    assert prof.counter == "fvcore" and prof.notice is None
    assert prof.params == RESNET18_PARAMS
    assert prof.flops == RESNET18_FLOPS
    assert prof.gflops == pytest.approx(1.819065856)
    assert prof.unsupported_ops == {"aten::add_": 8, "aten::max_pool2d": 1}
    assert prof.input_size == (1, 3, 224, 224)


def test_activations_equal_fvcore_activation_count_analysis(models, profiles):
    # activations come from handles added to the FLOP trace; they must equal fvcore's own analysis
    fvnn = profiling._import_fvcore()
    model = models["resnet18"].eval()
    analysis = fvnn.ActivationCountAnalysis(model, torch.zeros(1, 3, 224, 224)).unsupported_ops_warnings(False)
    assert profiles["resnet18"].activations == analysis.total() == 2_484_712


def test_coresnet18_identical_to_resnet18(profiles):
    co, ref = profiles["coresnet18"], profiles["resnet18"]
    assert (co.params, co.flops, co.activations) == (RESNET18_PARAMS, RESNET18_FLOPS, ref.activations)
    parity = profiling.compare_profiles("coresnet18", co, "resnet18", ref)
    assert parity.ok


def test_acsinet18_counts(profiles):
    prof = profiles["acsinet18"]
    assert prof.params == 11_784_936
    assert prof.flops == 1_820_449_728
    assert prof.unsupported_ops == {
        "aten::add_": 8,
        "aten::hardswish": 9,
        "aten::max_pool2d": 1,
        "aten::mean": 18,
        "aten::mul": 18,
        "aten::sigmoid": 18,
    }


@pytest.mark.parametrize("name", ["resnet18", "coresnet18", "acsinet18"])
def test_flop_counter_mode_reproduces_fvcore(models, profiles, name):
    prof = profiles[name]
    assert prof.cross_check_flops == prof.flops and prof.counters_agree
    torch_prof = profile_model(models[name], counter="torch")
    assert torch_prof.counter == "torch"
    assert (torch_prof.flops, torch_prof.activations) == (prof.flops, prof.activations)


def test_acsinet18_count_elementwise_cross_check(models, profiles):
    prof = profile_model(models["acsinet18"], count_elementwise=True)
    # + 3,179,232 for the 9 attention modules' means, hardswish, sigmoids and products (the formula below), and
    # + 752,640 for the 8 residual adds
    assert (profiles["acsinet18"].flops, prof.flops) == (1_820_449_728, 1_820_449_728 + 3_179_232 + 752_640)
    assert prof.cross_check_flops == prof.flops
    assert prof.unsupported_ops == {"aten::max_pool2d": 1}


@pytest.mark.parametrize("counter", ["fvcore", "torch"])
def test_coordinate_attention_elementwise_costs(counter):
    # C=64, H=W=8, rd=max(8, 64 // 32)=8. Default: conv1 64*8*16 + bn 2*8*16 + conv_h/w 2 * 8*64*8 = 16,640.
    # Elementwise: 2 means 2*64*64 + hardswish 8*16 + 2 sigmoids 2*64*8 + 2 muls 2*64*64 = 17,536 more.
    attn = AcsiCoordAttn(64)
    assert profile_model(attn, (1, 64, 8, 8), counter=counter).flops == 16_640
    assert profile_model(attn, (1, 64, 8, 8), count_elementwise=True, counter=counter).flops == 16_640 + 17_536


@pytest.mark.parametrize("name", REGISTERED)
def test_coconv_layer_parity_every_registered_model(name):
    report = profiling.parity_report(_model(name), SMALL)
    num_blocks = 2 + 2 + 2 if name.endswith("18") else 3 + 4 + 6  # stages 1-3 (stage 4 is level 1: a plain conv)
    convs_per_block = 1 if name.endswith("50") else 2
    assert len(report) == num_blocks * convs_per_block
    assert {layer.stride for layer in report} == {1, 2}
    assert all(layer.ok for layer in report), [layer for layer in report if not layer.ok]
    first = report[0]  # layer1.0, at 64x64 input: 16x16 feature map
    assert first.input_shape[-2:] == (16, 16)
    assert first.flops == first.reference_flops == first.input_shape[1] * first.output_shape[1] * 9 * 16 * 16


class _DuplicatedBranch(CoConv2d):
    """A broken CoConv that computes its first branch twice (and adds it, so the output shape is unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        s = self.splits[0]
        again = nn.functional.conv2d(x, self.weight[:s], None, self.stride, self.padding, self.dilation)
        return torch.cat([out[:, :s] + again, out[:, s:]], dim=1)


def _broken_coresnet18() -> nn.Module:
    model = _model("coresnet18")
    bad = _DuplicatedBranch(64, 64, level=4)
    bad.weight = model.layer1[1].conv2.weight
    model.layer1[1].conv2 = bad
    return model


def test_parity_check_fails_on_duplicated_branch():
    report = {layer.name: layer for layer in profiling.parity_report(_broken_coresnet18(), SMALL)}
    assert [n for n, layer in report.items() if not layer.ok] == ["layer1.1.conv2"]
    dup = report["layer1.1.conv2"]
    assert (dup.params, dup.output_shape) == (dup.reference_params, dup.reference_output_shape)  # only FLOPs differ
    assert dup.flops * 4 == dup.reference_flops * 5


def test_parity_check_fails_on_splits_not_summing_to_out_channels():
    layer = CoConv2d(32, 128, level=3)
    layer.splits = [64, 32]  # bypasses validation: 96 of 128 output channels, dilations (1, 2) used
    (parity,) = profiling.parity_report(nn.Sequential(layer), (1, 32, 8, 8))
    assert not parity.ok
    assert parity.params == parity.reference_params
    assert parity.flops * 4 == parity.reference_flops * 3
    assert (parity.output_shape[1], parity.reference_output_shape[1]) == (96, 128)


def test_fallback_without_fvcore(monkeypatch):
    model = _model("coresnet18")
    expected = profile_model(model, SMALL, parity=True)
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)  # makes `import fvcore.nn` raise ImportError
    profiling._reference_flops.cache_clear()  # the reference convs are counted again, by the fallback too
    prof = profile_model(model, SMALL, parity=True)
    assert prof.counter == "torch" and "fvcore could not count" in prof.notice
    assert (prof.flops, prof.activations, prof.params) == (expected.flops, expected.activations, expected.params)
    assert [lp.flops for lp in prof.layer_parity] == [lp.flops for lp in expected.layer_parity]
    assert all(lp.ok for lp in prof.layer_parity)
    with pytest.raises(ImportError):
        profile_model(model, SMALL, counter="fvcore")


def test_compiled_model_profiles_original_module():
    compiled = torch.compile(AcsiCoordAttn(64))  # fvcore cannot trace the wrapper; nothing gets compiled here
    prof = profile_model(compiled, (1, 64, 8, 8))
    assert (prof.flops, prof.counter, prof.notice) == (16_640, "fvcore", None)


def test_counts_in_eval_mode_and_restores_modes():
    model = _model("resnet18").train()
    model.fc.eval()
    assert profile_model(model).flops == RESNET18_FLOPS  # training-mode batch-norm would count more
    assert model.training and model.layer1.training and not model.fc.training


def test_paper_figures_match_spec_params():
    for spec in PROFILE_SPECS.values():
        if spec.paper:
            params = sum(p.numel() for p in profiling.build_model(spec).parameters())
            assert round(params / 1e6, 2) == PAPER_FIGURES[spec.paper].params_m, spec.name


def test_resolve_specs():
    names = [s.name for s in profiling.resolve_specs(["18"])]
    assert names == ["resnet18", "coresnet18", "acsinet18", "acsinet18:stage", "acsinet18:stage+final"] + [
        "acsinet18:block",
        "acsinet18:final",
    ]
    assert [s.name for s in profiling.resolve_specs(["coresnet34"])] == ["resnet34", "coresnet34"]
    assert [s.name for s in profiling.resolve_specs(["seresnet18"])] == ["seresnet18"]
    with pytest.raises(ValueError, match="Unknown model 'nope'"):
        profiling.resolve_specs(["nope"])


def _run(argv: List[str], capsys) -> "tuple[int, str]":
    code = run_command("profile", argv)
    return code, capsys.readouterr().out


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "profile.json", tmp_path / "table.md"
    argv = ["--models", "coresnet18", "--image-size", "64", "--json", str(js), "--markdown", str(md)]
    code, out = _run(argv, capsys)
    assert code == 0
    assert "Parity: PASSED" in out and "1 multiply-add = 1 flop" in out and "aten::max_pool2d x1" in out
    data = json.loads(js.read_text())
    assert [m["name"] for m in data["models"]] == ["resnet18", "coresnet18"]
    assert [m["params"] for m in data["models"]] == [RESNET18_PARAMS, RESNET18_PARAMS]
    assert data["models"][0]["flops"] == data["models"][1]["flops"]
    assert data["parity_passed"] is True and data["model_parity"][0]["ok"] is True
    assert len(data["layer_parity"]["coresnet18"]) == 12
    assert data["settings"]["input_size"] == [1, 3, 64, 64]
    text = md.read_text()
    assert "| `coresnet18`" in text and "11,689,512" in text and "| model" in text

    before = js.read_text()
    code, _ = _run(["--models", "resnet18", "--image-size", "32", "--json", str(js)], capsys)
    assert code == 2 and js.read_text() == before  # nothing overwritten without --overwrite


def test_cli_exit_code_on_failing_parity(monkeypatch, capsys):
    build = profiling.build_model

    def broken(spec, num_classes=1000):
        return _broken_coresnet18() if spec.name == "coresnet18" else build(spec, num_classes)

    monkeypatch.setattr(profiling, "build_model", broken)
    code, out = _run(["--models", "coresnet18", "--image-size", "64"], capsys)
    assert code == 1
    assert "coresnet18: 11/12 layers equal" in out and "DIFF layer1.1.conv2" in out
    assert "DIFF coresnet18 vs resnet18" in out and "Parity: FAILED" in out


def test_cli_latency_and_elementwise(capsys, tmp_path):
    argv = ["--models", "coresnet18", "--image-size", "32", "--latency", "--warmup", "0", "--rounds", "1"]
    argv += ["--iters", "1", "--count-elementwise", "--no-parity", "--json", str(tmp_path / "t.json")]
    code, out = _run(argv, capsys)
    assert code == 0
    assert "ms cpu" in out and "x resnet18" in out and "Latency: median ms" in out and "elementwise ops (add/mul" in out
    assert "Parity:" not in out
    data = json.loads((tmp_path / "t.json").read_text())
    expected_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    assert data["settings"]["latency_devices"] == expected_devices  # GPU measured too when present
    rows = {m["name"]: m for m in data["models"]}
    assert set(rows) == {"resnet18", "coresnet18"}  # the baseline is added and measured in the same run
    assert rows["resnet18"]["latency_ratio"] == {d: 1.0 for d in expected_devices}
    cpu = {name: row["latency"]["cpu"]["median_ms"] for name, row in rows.items()}
    assert cpu["coresnet18"] > 0 and rows["coresnet18"]["latency_ratio"]["cpu"] == pytest.approx(
        cpu["coresnet18"] / cpu["resnet18"]
    )  # model / resnet18: above 1 is slower


def test_cli_paper_flops_columns_only_under_the_papers_convention(capsys):
    """At 224 px the table compares with the paper's GFLOPs, except when elementwise ops are counted too."""
    code, out = _run(["--models", "coresnet18", "--no-parity"], capsys)
    assert code == 0 and "paper G" in out and "paper M" in out
    code, out = _run(["--models", "coresnet18", "--no-parity", "--count-elementwise"], capsys)
    assert code == 0 and "paper G" not in out and "paper M" in out


def test_cli_latency_on_missing_cuda_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = run_command("profile", ["--models", "resnet18", "--latency", "--device", "cpu", "cuda"])
    assert code == 2 and "CUDA, which is not available" in capsys.readouterr().err


def test_cli_unknown_model(capsys):
    assert run_command("profile", ["--models", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-acsi profile: error: Unknown model 'nope'") and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image-size", "0"], "argument --img-size/--image-size: must be at least 1, got 0"),
        (["--img-size", "-5"], "argument --img-size/--image-size: must be at least 1, got -5"),
        (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),  # was "Parity: PASSED" at 0 FLOPs
    ],
)
def test_cli_bad_sizes_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        run_command("profile", ["--models", "resnet18", *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(f"timm-acsi profile: error: {message}\n")


def test_cli_output_folder_is_refused_before_profiling(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profiling, "profile_model", lambda *a, **k: pytest.fail("profiled"))
    for flag in ("--markdown", "--json"):
        assert run_command("profile", ["--models", "resnet18", flag, str(tmp_path), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert (
            err == f"timm-acsi profile: error: {tmp_path} is a folder: pass a file path (e.g. {tmp_path}/table.md).\n"
        )


def test_profile_models_reports_counts_parity_and_latency():
    """The library computes the whole report (the CLI only formats it): counts, parity verdicts, latency rows."""
    specs = profiling.resolve_specs(["coresnet18"])
    report = profiling.profile_models(specs, (1, 3, 32, 32), num_classes=7)
    assert [s.name for s in report.specs] == ["resnet18", "coresnet18"] and report.latency is None
    assert report.profiles["coresnet18"].params == report.profiles["resnet18"].params == 11_180_103
    assert report.parity_passed is True and len(report.layer_parity["coresnet18"]) == 12
    assert [(mp.name, mp.reference, mp.ok) for mp in report.model_parity] == [("coresnet18", "resnet18", True)]
    assert report.cross_checked == ["resnet18", "coresnet18"]

    timing = profiling.LatencySettings(("cpu",), warmup=0, rounds=1, iters=1)
    report = profiling.profile_models(
        profiling.resolve_specs(["acsinet18"]), (1, 3, 32, 32), parity=False, latency=timing
    )
    assert [s.name for s in report.specs] == ["resnet18", "acsinet18"]  # the latency baseline is added
    assert report.parity_passed is None and report.model_parity == [] and report.layer_parity == {}
    assert set(report.latency["cpu"]) == {"resnet18", "acsinet18"} and report.latency_settings == timing


class _FakeCompile:
    """Stands in for torch.compile: records what it compiled and, per forward, dynamo's recompile limit."""

    def __init__(self):
        self.compiled, self.limits = [], []

    def __call__(self, model):
        from torch._dynamo import config

        self.compiled.append(model)

        def forward(x):
            self.limits.append(config.recompile_limit)
            return model(x)

        return forward


def test_measure_latency_compiles_in_the_warm_up(monkeypatch):
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    from torch._dynamo import config

    default_limit = config.recompile_limit
    models = {"a": _model("resnet18"), "b": _model("coresnet18")}
    result = profiling.measure_latency(models, (1, 3, 32, 32), warmup=0, rounds=2, iters=1, compile=True)
    assert fake.compiled == list(models.values())
    assert len(fake.limits) == 2 * (1 + 2)  # one compiling forward each, then 2 rounds x 1 forward, all compiled
    assert set(fake.limits) == {1024} and config.recompile_limit == default_limit  # room for every model's graph
    assert all(lat.compiled and lat.rounds == 2 for lat in result.values())
    fake.compiled.clear()
    assert not profiling.measure_latency(models, (1, 3, 32, 32), warmup=0, rounds=1, iters=1)["a"].compiled
    assert fake.compiled == []


class _CallerCompiled(nn.Module):
    """Stands for a model the caller passed through ``torch.compile``: it wraps the module as ``_orig_mod``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._orig_mod = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


def test_measure_latency_makes_room_for_graphs_of_models_the_caller_compiled(monkeypatch):
    """benchmarks/compile_speedup.py times eager and compiled models side by side with ``compile=False``."""
    limits = []
    monkeypatch.setattr(profiling, "_compiled_graphs_limit", lambda on: limits.append(on) or nullcontext())
    eager = nn.Conv2d(3, 4, 3)
    profiling.measure_latency({"eager": eager}, (1, 3, 8, 8), warmup=0, rounds=1, iters=1)
    profiling.measure_latency({"eager": eager, "compiled": _CallerCompiled(eager)}, (1, 3, 8, 8), warmup=0, rounds=1)
    assert limits == [False, True]


def test_cli_compile(monkeypatch, capsys, tmp_path):
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    argv = ["--models", "resnet18", "--img-size", "32", "--no-parity", "--latency", "--device", "cpu", "--compile"]
    argv += ["--warmup", "0", "--rounds", "1", "--iters", "1", "--json", str(tmp_path / "t.json")]
    argv += ["--markdown", str(tmp_path / "t.md")]
    code, out = _run(argv, capsys)
    assert code == 0 and len(fake.compiled) == 1
    assert "threads, torch.compile), 1 rounds x 1 forwards after 0 warm-up and one compiling forward," in out
    assert json.loads((tmp_path / "t.json").read_text())["models"][0]["latency"]["cpu"]["compiled"] is True
    assert "--latency --device cpu --compile`" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit) as info:
        run_command("profile", ["--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--compile latency of the torch.compile'd models (inductor; on CPU it needs a C compiler" in help_text
