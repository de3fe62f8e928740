"""ONNX export and the onnxruntime backend: parity of every model, metadata round trip, damaged files, the
fall-back exporter, a failed parity check that leaves no file, and prediction without torch.

Exports are slow on a small CPU (~5-15 s each with the dynamo exporter), so models are exported at 32-64 px and
one exported file (:func:`exported`) serves most tests.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
skimage_data = pytest.importorskip("skimage.data")

import timm_acsi  # noqa: E402, F401  (registers the models)
from timm_acsi.checkpoint import save_checkpoint  # noqa: E402
from timm_acsi.cli import main as cli_main  # noqa: E402
from timm_acsi.export import OnnxBackend, OnnxMetadata, read_metadata  # noqa: E402
from timm_acsi.export import export as export_lib  # noqa: E402
from timm_acsi.export.export import DEFAULT_TOLERANCE, ParityError, export_onnx, parity_inputs  # noqa: E402
from timm_acsi.export.metadata import METADATA_FORMAT, parse_metadata  # noqa: E402
from timm_acsi.labels import FER7_LABELS  # noqa: E402
from timm_acsi.sources import file_sha256, load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
SHA = "ab" * 32


def _model(name: str = "acsinet18", size: int = SIZE, seed: int = 0, fc_scale: float = 1.0) -> torch.nn.Module:
    """A 7-class model whose data config is ``size`` px; ``fc_scale`` spreads its logits like a trained model's."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained_cfg_overlay=dict(input_size=(3, size, size))).eval()
    with torch.no_grad():
        model.fc.weight.mul_(fc_scale)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A grayscale 64 px acsinet18 checkpoint as ``timm-acsi train`` writes it (logits spread to +-5 or so)."""
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    meta = dict(
        architecture="acsinet18",
        num_classes=7,
        label_names=list(FER7_LABELS),
        model_args={},
        input_size=[3, SIZE, SIZE],
        crop_pct=0.875,
        grayscale=True,
        dataset="FER-2013",
    )
    save_checkpoint(path, _model(fc_scale=100.0).state_dict(), meta)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory, one_thread) -> Path:
    """``timm-acsi export`` of :func:`checkpoint` with free height/width (default exporter)."""
    out = tmp_path_factory.mktemp("onnx") / "acsinet18.onnx"
    assert cli_main(["export", "--model", str(checkpoint), "--output", str(out), "--dynamic-size"]) == 0
    return out


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """A folder of real images as face crops: the astronaut's face, its mirror, the whole photo, the cat, the coffee."""
    folder = tmp_path_factory.mktemp("faces")
    astronaut = skimage_data.astronaut()
    face = astronaut[50:190, 155:295]
    for name, array in (
        ("face", face),
        ("mirror", face[:, ::-1]),
        ("photo", astronaut),
        ("cat", skimage_data.chelsea()),
        ("coffee", skimage_data.coffee()),
    ):
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{name}.png")
    return folder


# ------------------------------------------------------------------------------------------------- export


# acsinet18 is exported (with the default exporter, through the CLI) by the `exported` fixture; each dynamo export
# takes ~10 s of CPU, so it is not exported twice
@pytest.mark.parametrize("name", [n for n in timm.list_models(module="coresnet") if n != "acsinet18"])
def test_every_model_exports_with_parity(name, tmp_path):
    size = SIZE if name.endswith("18") else 32
    model = _model(name, size, fc_scale=100.0)
    result = export_onnx(model, tmp_path / "m.onnx", label_names=FER7_LABELS)

    assert result.exporter == "dynamo" and result.fallback_reason is None
    report = result.parity
    assert report.passed and report.tolerance == 1e-4
    assert report.max_abs_logits < 1e-4 and report.max_abs_softmax < 1e-4 and report.argmax_mismatches == 0
    assert [c.name for c in report.cases] == ["random, batch 1", "random, batch 3", "face: astronaut"]
    assert [c.shape for c in report.cases] == [(1, 3, size, size), (3, 3, size, size), (1, 3, size, size)]
    backend = OnnxBackend(result.path)
    assert backend.metadata == result.metadata and backend.metadata.architecture == name
    x = parity_inputs(timm.data.resolve_data_config(model=model))["random, batch 3"]
    with torch.no_grad():
        np.testing.assert_allclose(backend(x.numpy()), model(x).numpy(), atol=1e-4, rtol=0)


def test_exported_file_metadata_round_trip(exported, checkpoint):
    meta = read_metadata(exported)
    model = load_model(str(checkpoint)).model
    assert meta.data_config == timm.data.resolve_data_config(model=model)  # keys, values and tuple types
    assert meta.data_config == dict(
        input_size=(3, SIZE, SIZE),
        interpolation="bilinear",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_pct=0.875,
        crop_mode="center",
    )
    assert meta.label_names == FER7_LABELS and meta.architecture == "acsinet18" and meta.grayscale is True
    assert meta.source == str(checkpoint) and meta.timm_acsi_version == timm_acsi.__version__
    assert meta.weights_sha256 == file_sha256(checkpoint)
    assert (meta.exporter, meta.dtype, meta.dynamic_size, meta.opset) == ("dynamo", "float32", True, 20)
    assert meta.parity["inputs"] == ["random, batch 1", "random, batch 3", "random, 96x80", "face: astronaut"]
    assert meta.parity["argmax_same"] == meta.parity["rows"] == 8 and meta.parity["max_abs_logits"] < 1e-4

    raw = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}  # what any ONNX consumer sees
    assert json.loads(raw["label_names"]) == list(FER7_LABELS)
    assert (raw["architecture"], raw["grayscale"], raw["input_size"]) == ("acsinet18", "true", f"[3, {SIZE}, {SIZE}]")
    assert raw["timm_acsi_format"] == str(METADATA_FORMAT)


def test_metadata_parse_is_strict():
    meta = OnnxMetadata(
        architecture="coresnet18",
        label_names=FER7_LABELS,
        input_size=(3, 48, 48),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bicubic",
        crop_pct=1.0,
        crop_mode="center",
        grayscale=False,
        source="hf-hub:org/coresnet18",
        timm_acsi_version="0.1.0",
        exporter="torchscript",
        opset=17,
        dtype="float16",
        dynamic_size=False,
        graph_sha256="00" * 32,
        weights_sha256=None,
    )
    props = meta.to_props()
    assert "weights_sha256" not in props and all(isinstance(v, str) for v in props.values())
    assert parse_metadata(props) == meta

    with pytest.raises(ValueError, match="no timm-acsi metadata.*timm-acsi export"):
        parse_metadata({k: v for k, v in props.items() if k != "timm_acsi_format"})
    with pytest.raises(ValueError, match="format '2'.*upgrade timm-acsi"):
        parse_metadata({**props, "timm_acsi_format": "2"})
    with pytest.raises(ValueError, match="lacks label_names, mean"):
        parse_metadata({k: v for k, v in props.items() if k not in ("label_names", "mean")})
    with pytest.raises(ValueError, match="label_names=.*not valid JSON"):
        parse_metadata({**props, "label_names": "[anger"})
    with pytest.raises(ValueError, match="mean=\\[0.5\\] is not a list of 3 numbers"):
        parse_metadata({**props, "mean": "[0.5]"})
    with pytest.raises(ValueError, match="label_names=.*distinct"):
        parse_metadata({**props, "label_names": '["anger", "anger"]'})
    with pytest.raises(ValueError, match="dtype='int8' is not float32 or float16"):
        parse_metadata({**props, "dtype": "int8"})


def test_parity_failure_leaves_no_file(tmp_path, monkeypatch):
    """A graph that computes something else (another model's weights) fails the check; nothing is written, and an
    existing file given with overwrite=True stays as it was."""
    other = _model("coresnet18", seed=1)
    wrong = export_lib._export_torchscript(other, torch.zeros(2, 3, SIZE, SIZE), {0: "batch"}, None)
    monkeypatch.setattr(export_lib, "_export_graph", lambda *args: (wrong, "torchscript", None))
    out = tmp_path / "m.onnx"
    with pytest.raises(ParityError, match="does not reproduce coresnet18.*FAILED.*No file was written") as e:
        export_onnx(_model("coresnet18", seed=0), out, label_names=FER7_LABELS)
    assert e.value.report.max_abs_logits > 1e-3 and not e.value.report.passed
    assert list(tmp_path.iterdir()) == []

    out.write_bytes(b"previous")
    with pytest.raises(ParityError):
        export_onnx(_model("coresnet18", seed=0), out, label_names=FER7_LABELS, overwrite=True)
    assert out.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [out]


def test_torchscript_fallback_is_used_and_reported(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("torch.export cannot trace this\nsecond line")

    monkeypatch.setattr(export_lib, "_export_dynamo", broken)
    result = export_onnx(_model("coresnet18"), tmp_path / "m.onnx", label_names=FER7_LABELS)
    assert result.exporter == "torchscript" == read_metadata(result.path).exporter
    assert result.fallback_reason == "RuntimeError: torch.export cannot trace this"
    assert result.parity.passed and result.parity.max_abs_logits < 1e-4

    with pytest.raises(ValueError, match="The dynamo exporter failed: RuntimeError: torch.export cannot trace"):
        export_onnx(_model("coresnet18"), tmp_path / "n.onnx", label_names=FER7_LABELS, exporter="dynamo")
    assert not (tmp_path / "n.onnx").exists()


def test_fp16_export(tmp_path):
    model = _model("coresnet18", 32, fc_scale=100.0)
    # the TorchScript exporter takes 1 s where dynamo takes 10: the fp16 plumbing is the same for both
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", label_names=FER7_LABELS, exporter="torchscript")
    fp16 = export_onnx(model, tmp_path / "fp16.onnx", label_names=FER7_LABELS, exporter="torchscript", fp16=True)
    assert fp16.metadata.dtype == "float16" and fp16.parity.tolerance == DEFAULT_TOLERANCE["float16"] == 5e-2
    assert fp16.parity.passed and fp16.parity.max_abs_logits > fp32.parity.max_abs_logits  # really float16
    assert 0.45 < os.path.getsize(fp16.path) / os.path.getsize(fp32.path) < 0.55
    backend = OnnxBackend(fp16.path)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert backend(x).dtype == np.float32 and backend(x).shape == (2, 7)
    with torch.no_grad():
        np.testing.assert_allclose(backend(x), model(torch.from_numpy(x)).numpy(), atol=5e-2, rtol=0)


def test_export_refuses_bad_arguments(tmp_path):
    model = _model("coresnet18", 32)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="exists.*--overwrite"):
        export_onnx(model, out, label_names=FER7_LABELS)
    assert out.read_bytes() == b"mine"
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(model, tmp_path / "m.pt", label_names=FER7_LABELS)
    with pytest.raises(ValueError, match="6 label names for a model with 7 outputs"):
        export_onnx(model, tmp_path / "n.onnx", label_names=FER7_LABELS[:6])
    with pytest.raises(ValueError, match="Unknown exporter 'jit'"):
        export_onnx(model, tmp_path / "n.onnx", label_names=FER7_LABELS, exporter="jit")
    with pytest.raises(ValueError, match="training mode.*model.eval\\(\\)"):
        export_onnx(model.train(), tmp_path / "n.onnx", label_names=FER7_LABELS)
    assert list(tmp_path.iterdir()) == [out]


def test_cli_errors(checkpoint, exported, tmp_path, capsys):
    assert cli_main(["export", "--model", str(checkpoint), "--output", str(exported)]) == 2
    assert capsys.readouterr().err == (
        f"timm-acsi export: error: {exported} exists: pass another output, or overwrite=True (--overwrite) to "
        "replace it.\n"
    )
    with pytest.raises(SystemExit) as info:  # argparse, before any model loads
        cli_main(["export", "--model", str(checkpoint), "--output", str(tmp_path / "b.onnx"), "--batch-size", "-1"])
    assert info.value.code == 2 and "argument --batch-size: must be at least 1, got -1" in capsys.readouterr().err
    missing = tmp_path / "none.safetensors"
    assert cli_main(["export", "--model", str(missing), "--output", str(tmp_path / "a.onnx")]) == 2
    assert capsys.readouterr().err.startswith("timm-acsi export: error: No such checkpoint")


def test_cli_failed_parity_exits_1(checkpoint, tmp_path, monkeypatch, capsys):
    """A wrong export is the tool's failure (exit 1), reported in one line like every error (timm_acsi.cli.ERRORS)."""

    def wrong(*args, **kwargs):
        raise ParityError("onnxruntime does not reproduce acsinet18:\n  FAILED. No file was written.", report=None)

    monkeypatch.setattr(export_lib, "export_onnx", wrong)
    assert cli_main(["export", "--model", str(checkpoint), "--output", str(tmp_path / "a.onnx")]) == 1
    assert capsys.readouterr() == (
        "",
        "timm-acsi export: error: onnxruntime does not reproduce acsinet18: FAILED. No file was written.\n",
    )


@pytest.mark.parametrize(
    "module, message",
    [
        ("onnx", "ONNX export needs onnx"),
        ("onnxruntime", "The parity check needs onnxruntime"),
        ("skimage", "The parity check without --parity-images needs skimage"),
    ],
)
def test_cli_missing_extra_is_one_line_before_anything(module, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # any import of it now fails
    argv = ["export", "--model", str(tmp_path / "none.safetensors"), "--output", str(tmp_path / "a.onnx")]
    assert cli_main(argv) == 2
    expected = f'timm-acsi export: error: {message}, which is not installed: pip install "timm-acsi[onnx]"\n'
    assert capsys.readouterr() == ("", expected)
    if module == "skimage":  # needed only for the default face: with the user's own faces the export goes on
        Image.new("RGB", (8, 8)).save(tmp_path / "face.png")
        assert cli_main([*argv, "--parity-images", str(tmp_path / "face.png")]) == 2
        assert capsys.readouterr().err.startswith("timm-acsi export: error: No such checkpoint")


# ------------------------------------------------------------------------------------------------ backend


def test_backend_matches_torch_and_checks_batches(exported, checkpoint):
    backend = OnnxBackend(exported)
    model = load_model(str(checkpoint)).model
    assert backend.label_names == FER7_LABELS and backend.grayscale is True and backend.source == str(checkpoint)
    assert backend.input_shape == ("batch", 3, "height", "width")
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(ref).max() > 1  # the test model's logits are spread like a trained model's
    np.testing.assert_allclose(backend(x.numpy()), ref, atol=1e-4, rtol=0)
    expected = r"takes batches of shape \['batch', 3, 'height', 'width'\].*got \[3, 96, 80\]"
    with pytest.raises(ValueError, match=expected):
        backend(x[0].numpy())


def test_fixed_batch_export_takes_any_number_of_faces(tmp_path):
    """A graph exported with --batch-size 2 runs 5 faces as chunks of 2 (the last one zero-padded), as PyTorch does."""
    model = _model("coresnet18", 32, fc_scale=100.0)
    result = export_onnx(model, tmp_path / "b2.onnx", label_names=FER7_LABELS, exporter="torchscript", batch_size=2)
    backend = OnnxBackend(result.path)
    assert backend.input_shape == (2, 3, 32, 32)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    for n in (1, 2, 5):
        np.testing.assert_allclose(backend(x[:n].numpy()), ref[:n], atol=1e-4, rtol=0)
    assert backend(x[:0].numpy()).shape == (0, 7)
    with pytest.raises(ValueError, match=r"takes batches of shape \[2, 3, 32, 32\].*got \[5, 3, 48, 48\]"):
        backend(np.zeros((5, 3, 48, 48), np.float32))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "is not a readable ONNX file.*truncated or corrupt"),
        ("garbage", "is not a readable ONNX file"),
        ("empty", "holds no ONNX graph"),
        ("weights", "graph_sha256 mismatch.*modified or damaged after export"),
        ("labels", "do not match its metadata.*6 logits out"),
        ("no_metadata", "no timm-acsi metadata.*not written by `timm-acsi export`"),
    ],
)
def test_damaged_files_are_refused(exported, tmp_path, damage, message):
    data = exported.read_bytes()
    path = tmp_path / "damaged.onnx"
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x08\x07garbage" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        model = onnx.load_from_string(data)
        props = {p.key: p.value for p in model.metadata_props}
        if damage == "weights":  # one weight changed, metadata untouched
            init = next(i for i in model.graph.initializer if i.dims and np.prod(i.dims) > 100)
            array = onnx.numpy_helper.to_array(init).copy()
            array.flat[0] += 1
            init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
        elif damage == "labels":  # a label dropped from the metadata: the graph still has 7 outputs
            props["label_names"] = json.dumps(list(FER7_LABELS[:6]))
        else:
            props = {}
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, props)
        onnx.save_model(model, str(path))
    with pytest.raises(ValueError, match=message):
        OnnxBackend(path)
    with pytest.raises(FileNotFoundError, match="No such ONNX file"):
        OnnxBackend(tmp_path / "missing.onnx")


# ------------------------------------------------------------------------------------------------ predict


def _predict(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert cli_main(["predict", *args, "--detector", "none", "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())["rows"]


def test_predict_onnxruntime_gives_the_torch_labels(exported, checkpoint, faces, tmp_path):
    torch_rows = _predict([str(faces), "--model", str(checkpoint)], tmp_path, "torch")
    ort_rows = _predict([str(faces), "--model", str(exported), "--backend", "onnxruntime"], tmp_path, "ort")
    assert (
        [r["file"] for r in ort_rows]
        == [r["file"] for r in torch_rows]
        == [str(faces / f"{n}.png") for n in ("cat", "coffee", "face", "mirror", "photo")]
    )
    assert [r["label"] for r in ort_rows] == [r["label"] for r in torch_rows]
    assert len({r["label"] for r in torch_rows}) > 1  # the images are told apart: labels are not all the same
    for t, o in zip(torch_rows, ort_rows):
        assert list(o["probabilities"]) == list(FER7_LABELS)
        np.testing.assert_allclose(list(o["probabilities"].values()), list(t["probabilities"].values()), atol=1e-4)


def test_predict_onnxruntime_with_flip_tta(exported, checkpoint, faces, tmp_path):
    """--tta-flip on the onnxruntime backend gives torch's probabilities, which differ from one view's."""

    def probabilities(args, name):
        return {Path(r["file"]).stem: r["probabilities"] for r in _predict(args, tmp_path, name)}

    ort = probabilities([str(faces), "--model", str(exported), "--backend", "onnxruntime", "--tta-flip"], "ort_tta")
    torch_tta = probabilities([str(faces), "--model", str(checkpoint), "--tta-flip"], "torch_tta")
    assert sorted(ort) == sorted(torch_tta) == ["cat", "coffee", "face", "mirror", "photo"]
    for name, probs in ort.items():
        np.testing.assert_allclose(list(probs.values()), list(torch_tta[name].values()), atol=1e-4)
    one_view = probabilities([str(faces / "face.png"), "--model", str(exported), "--backend", "onnxruntime"], "ort1")
    assert max(abs(ort["face"][n] - one_view["face"][n]) for n in FER7_LABELS) > 1e-3


BLOCK_TORCH = """
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, BlockTorch())
"""


def test_onnxruntime_path_imports_no_torch(exported, checkpoint, faces, tmp_path):
    """OnnxBackend and ``predict --backend onnxruntime`` in a clean interpreter where torch cannot be imported."""
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        import json
        import numpy as np
        from timm_acsi.export import OnnxBackend
        from timm_acsi.cli import main

        backend = OnnxBackend({str(exported)!r})
        logits = backend(np.zeros((2, 3, 64, 64), np.float32))
        rc = main(["predict", {str(faces / "face.png")!r}, "--model", {str(exported)!r}, "--backend", "onnxruntime",
                   "--detector", "none", "--json", {str(tmp_path / "p.json")!r}, "--quiet"])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision"))
        print(json.dumps(dict(shape=logits.shape, rc=rc, loaded=loaded)))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == dict(shape=[2, 7], rc=0, loaded=[])
    (row,) = json.loads((tmp_path / "p.json").read_text())["rows"]
    (torch_row,) = _predict([str(faces / "face.png"), "--model", str(checkpoint)], tmp_path, "torch")
    assert row["label"] == torch_row["label"]  # the model the file was exported from, run by PyTorch
    np.testing.assert_allclose(
        list(row["probabilities"].values()), list(torch_row["probabilities"].values()), atol=1e-4
    )
