"""``timm-acsi predict``: folders, videos, the table, JSON/CSV schema, pictures, and every bad input."""

import csv
import json
import re
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from timm_acsi import FER7_LABELS
from timm_acsi.checkpoint import save_checkpoint
from timm_acsi.cli import main as cli_main
from timm_acsi.cli import predict
from timm_acsi.inference import ExpressionRecognizer

pytestmark = pytest.mark.usefixtures("one_thread")

ASTRONAUT_FACE = [177, 67, 93, 93]
CSV_HEADER = ["file", "frame", "face", "x", "y", "w", "h", "detection_score", "label", "score", *FER7_LABELS]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A run folder with a freshly initialised 48-px acsinet18 and its description."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    net = timm.create_model("acsinet18", num_classes=7)
    meta = dict(
        architecture="acsinet18",
        num_classes=7,
        label_names=list(FER7_LABELS),
        model_args={},
        input_size=[3, 48, 48],
        crop_pct=48 / 56,
        grayscale=False,
    )
    save_checkpoint(run / "best.safetensors", net.state_dict(), meta)
    save_file(net.state_dict(), str(run / "bare.safetensors"))
    return run


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """astronaut.png (one face), sub/chelsea.jpg (a cat: no face), sub/broken.jpg (corrupt), notes.txt."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(skdata.astronaut()).save(root / "astronaut.png")
    Image.fromarray(skdata.chelsea()).save(root / "sub" / "chelsea.jpg")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def run(capsys, *argv):
    code = cli_main(["predict", *map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_folder_table_json_csv_and_pictures(model, photos, tmp_path, capsys):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    ann, cams = tmp_path / "ann", tmp_path / "cam"
    code, out, err = run(
        capsys, photos, "--model", model, "--json", out_json, "--csv", out_csv, "--annotate", ann, "--cam", cams
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["file", "frame", "face", "box", "x,y,w,h", "det", "label", "score"] + [
        n[:5] for n in FER7_LABELS
    ]
    assert lines[1].split()[:4] == [str(photos / "astronaut.png"), "-", "0", "177,67,93,93"]
    assert lines[2].split() == [str(photos / "sub" / "chelsea.jpg"), "-", "-", "-", "-", "no", "face", "found"]
    assert lines[3] == "2 images: 1 face, 1 without a face; 1 unreadable file skipped."
    assert "broken.jpg is not a readable image" in err

    doc = json.loads(out_json.read_text())
    assert set(doc) == {"model", "label_names", "detector", "tta_flip", "rows", "small_faces", "unreadable"}
    assert doc["label_names"] == list(FER7_LABELS) and doc["detector"] == "haar" and doc["tta_flip"] is False
    face, empty = doc["rows"]
    assert set(face) == {"file", "frame", "face", "box", "detection_score", "label", "score", "probabilities"}
    assert face["box"] == ASTRONAUT_FACE and face["frame"] is None and face["face"] == 0
    assert list(face["probabilities"]) == list(FER7_LABELS)
    assert sum(face["probabilities"].values()) == pytest.approx(1.0)
    assert face["label"] == max(face["probabilities"], key=face["probabilities"].get)
    assert face["score"] == face["probabilities"][face["label"]]
    library = ExpressionRecognizer(str(model))(skdata.astronaut())[0]  # the same photo through the library
    np.testing.assert_allclose(list(face["probabilities"].values()), list(library.probabilities.values()), atol=1e-6)
    assert face["detection_score"] == pytest.approx(library.detection_score, abs=1e-6)
    assert empty["file"].endswith("chelsea.jpg") and empty["face"] is None and empty["label"] is None
    assert [u["file"] for u in doc["unreadable"]] == [str(photos / "sub" / "broken.jpg")]
    assert doc["small_faces"] == []

    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == CSV_HEADER and len(rows) == 3
    assert rows[1][:8] == [
        str(photos / "astronaut.png"),
        "",
        "0",
        "177",
        "67",
        "93",
        "93",
        str(face["detection_score"]),
    ]
    assert [float(v) for v in rows[1][10:]] == list(face["probabilities"].values())
    assert rows[2][0].endswith("chelsea.jpg") and set(rows[2][1:]) == {""}

    assert sorted(p.relative_to(ann).as_posix() for p in ann.rglob("*.png")) == [
        "photos/astronaut.png",
        "photos/sub/chelsea.png",
    ]
    overlay = Image.open(cams / "photos" / "astronaut_face0.png")
    assert [p.name for p in cams.rglob("*.png")] == ["astronaut_face0.png"] and overlay.mode == "RGB"


def test_faces_below_min_face_are_reported(model, photos, tmp_path, capsys):
    code, out, _ = run(
        capsys, photos / "astronaut.png", "--model", model, "--min-face", "100", "--json", tmp_path / "r.json"
    )
    assert code == 0 and out.splitlines()[-1] == "1 image: 0 faces, 1 without a face, 1 face below --min-face skipped."
    small = json.loads((tmp_path / "r.json").read_text())["small_faces"]
    assert [(s["box"], s["frame"]) for s in small] == [(ASTRONAUT_FACE, None)] and small[0]["detection_score"] > 0


def test_existing_output_is_not_overwritten(model, photos, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    out_json.write_text("mine")
    code, _, err = run(capsys, photos / "astronaut.png", "--model", model, "--json", out_json)
    assert code == 2 and "r.json already exists: pass --overwrite" in err and out_json.read_text() == "mine"
    ann = tmp_path / "ann"
    (ann).mkdir()
    (ann / "astronaut.png").write_bytes(b"mine")
    code, _, err = run(capsys, photos / "astronaut.png", "--model", model, "--annotate", ann)
    assert code == 2 and "astronaut.png already exists" in err and (ann / "astronaut.png").read_bytes() == b"mine"
    code, _, err = run(capsys, photos / "astronaut.png", "--model", model, "--json", out_json, "--overwrite")
    assert code == 0 and json.loads(out_json.read_text())["rows"][0]["box"] == ASTRONAUT_FACE


@pytest.mark.parametrize(
    "name, match",
    [
        ("empty", r"nothing to read: .*empty: folder holds no image or video files"),
        ("missing.png", r"nothing to read: .*missing\.png: no such file or folder"),
        ("notes.txt", r"no input could be read \(0 images: 0 faces; 1 unreadable file skipped\.\)"),
        ("broken.jpg", r"no input could be read"),
        ("bad.avi", r"no input could be read"),
    ],
)
def test_nothing_readable_exits_2(model, photos, tmp_path, capsys, name, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("text")
    (tmp_path / "broken.jpg").write_bytes((photos / "sub" / "broken.jpg").read_bytes())
    (tmp_path / "bad.avi").write_bytes(b"RIFF not a video")
    code, out, err = run(capsys, tmp_path / name, "--model", model)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("timm-acsi predict: error: ")
    assert re.search(match, err), err


def test_unopenable_video_is_reported_and_skipped(model, photos, tmp_path, capsys):
    (tmp_path / "bad.avi").write_bytes(b"RIFF not a video")
    code, out, err = run(capsys, photos / "astronaut.png", tmp_path / "bad.avi", "--model", model)
    assert code == 0 and "bad.avi cannot be opened as a video" in err
    assert out.splitlines()[-1] == "1 image: 1 face; 1 unreadable file skipped."


def test_video_every_n_frames(model, tmp_path, capsys):
    import cv2

    frame = np.asarray(Image.fromarray(skdata.astronaut()).resize((256, 256)))
    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (256, 256))
    for _ in range(5):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    code, out, err = run(
        capsys, tmp_path / "clip.avi", "--model", model, "--every", "2", "--csv", tmp_path / "v.csv",
        "--annotate", tmp_path / "ann",
    )  # fmt: skip
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "v.csv").open()))
    assert [r["frame"] for r in rows] == ["0", "2", "4"] and all(r["face"] == "0" for r in rows)
    assert out.splitlines()[-1] == "0 images, 1 video (3 frames): 3 faces."
    assert sorted(p.name for p in (tmp_path / "ann" / "clip").iterdir()) == [
        "frame_000000.png",
        "frame_000002.png",
        "frame_000004.png",
    ]


def test_none_detector_and_checkpoint_without_description(model, photos, capsys):
    code, out, err = run(capsys, photos / "astronaut.png", "--model", model / "bare.safetensors", "--detector", "none")
    assert code == 2 and err.count("\n") == 1
    assert "bare.safetensors does not record its architecture nor the order of its outputs" in err
    assert "pass the model name (--arch, e.g. acsinet18;" in err and "label_names, one per output" in err
    labels = ",".join(FER7_LABELS)
    code, out, err = run(
        capsys, photos / "astronaut.png", "--model", model / "bare.safetensors", "--arch", "acsinet18",
        "--label-names", labels, "--detector", "none",
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[1].split()[:5] == [str(photos / "astronaut.png"), "-", "0", "0,0,512,512", "1.00"]


def test_outputs_never_replace_inputs(model, photos, tmp_path, capsys):
    """--annotate into the input's own folder would write over the photo: refused even with --overwrite."""
    photo = tmp_path / "a.png"
    photo.write_bytes((photos / "astronaut.png").read_bytes())
    before = photo.read_bytes()
    for extra in ((), ("--overwrite",)):
        code, _, err = run(capsys, photo, "--model", model, "--annotate", tmp_path, *extra)
        assert code == 2 and f"the outputs would replace input file {photo}: write --annotate" in err
    code, _, err = run(capsys, tmp_path, "--model", model, "--annotate", tmp_path.parent, "--overwrite")
    assert code == 2 and "would replace input file" in err  # the folder's own name is the output subfolder
    (tmp_path / "a_face0.png").write_bytes(b"mine")
    code, _, err = run(capsys, photo, tmp_path / "a_face0.png", "--model", model, "--cam", tmp_path, "--overwrite")
    assert code == 2 and "a_face0.png" in err and (tmp_path / "a_face0.png").read_bytes() == b"mine"
    assert photo.read_bytes() == before


def test_output_names_stay_unique_next_to_numbered_inputs(tmp_path):
    """a-2.jpg, a.jpg and a.png: the second "a" must not take a-2, the first file's own name."""
    for name in ("a-2.jpg", "a.jpg", "a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    items, _ = predict.collect_inputs([str(tmp_path / n) for n in ("a-2.jpg", "a.jpg", "a.png", "b.jpg")])
    assert [str(i.name) for i in items] == ["a-2", "a", "a-3", "b"]
    items, _ = predict.collect_inputs([str(tmp_path / n) for n in ("a.jpg", "a.png", "a-2.jpg")])
    assert [str(i.name) for i in items] == ["a", "a-3", "a-2"]


def test_bad_arguments(model, photos, capsys):
    code, _, err = run(capsys, photos, "--model", "exported.onnx")
    assert code == 2 and "exported.onnx is an exported ONNX model: run it with --backend onnxruntime" in err
    code, _, err = run(capsys, photos, "--model", "model.onnx", "--backend", "onnxruntime", "--cam", "out")
    assert code == 2 and "--cam needs the torch backend" in err
    code, _, err = run(capsys, photos, "--model", "model.onnx", "--backend", "onnxruntime", "--compile")
    assert code == 2 and "--compile compiles the PyTorch model; an .onnx file runs in onnxruntime" in err
    code, _, err = run(capsys, photos, "--model", "coresnet34")
    assert code == 2 and "coresnet34.rafdb has no weights published" in err
    with pytest.raises(SystemExit) as info:
        run(capsys, photos, "--model", model, "--every", "0")
    assert info.value.code == 2 and "argument --every: must be at least 1, got 0" in capsys.readouterr().err


def test_without_model_the_shipped_acsinet18_recognises(photos, capsys):
    """No --model: the shipped FER-2013 ACSI-Net-18, exactly as when it is named; onnxruntime needs its file."""
    default = run(capsys, photos / "astronaut.png")
    code, out, err = default
    assert code == 0, err
    assert out.splitlines()[1].split()[:7] == [str(photos / "astronaut.png"), "-", "0", "177,67,93,93", "7.45",
                                               "happiness", "0.88"]  # fmt: skip
    assert default == run(capsys, photos / "astronaut.png", "--model", "acsinet18.fer2013")
    code, _, err = run(capsys, photos / "astronaut.png", "--backend", "onnxruntime")
    assert code == 2 and "--backend onnxruntime runs an exported model: pass --model FILE.onnx" in err


def test_compile_runs_the_model_through_torch_compile(model, photos, monkeypatch, capsys):
    compiled = []

    def fake_compile(module, **kwargs):  # a real compile takes minutes on a CPU
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    code, out, err = run(capsys, photos / "astronaut.png", "--model", model, "--compile")
    assert code == 0, err
    assert [type(m).__name__ for m in compiled] == ["CoResNet"]
    assert out.splitlines()[1].split()[:4] == [str(photos / "astronaut.png"), "-", "0", "177,67,93,93"]


@pytest.mark.parametrize(
    "video, argv, blocked, message",
    [
        (
            False,
            ["--backend", "onnxruntime", "--detector", "none"],
            "onnxruntime",
            '--backend onnxruntime needs onnxruntime, which is not installed: pip install "timm-acsi[onnx]"',
        ),
        (
            False,
            [],
            "cv2",
            'Face detection (--detector haar) needs cv2, which is not installed: pip install "timm-acsi[predict]"',
        ),
        (
            True,
            ["--detector", "none"],
            "cv2",
            'Reading videos needs cv2, which is not installed: pip install "timm-acsi[predict]"',
        ),
    ],
)
def test_missing_extra_is_one_line_before_the_model_loads(
    photos, tmp_path, monkeypatch, capsys, video, argv, blocked, message
):
    """A missing optional package is named with the extra that installs it, before any model is read."""
    (tmp_path / "clip.avi").write_bytes(b"RIFF never read")
    inputs = [photos / "astronaut.png"] + ([tmp_path / "clip.avi"] if video else [])
    monkeypatch.setitem(sys.modules, blocked, None)  # any import of it now fails
    model = tmp_path / ("no-such-model.onnx" if "onnxruntime" in argv else "no-such-model.safetensors")
    code, out, err = run(capsys, *inputs, "--model", model, *argv)
    assert (code, out, err) == (2, "", f"timm-acsi predict: error: {message}\n")


def test_failures_of_the_network_exit_1(photos, monkeypatch, capsys):
    """Errors go through timm_acsi.cli.ERRORS like every command's: bad input 2, the Hub or the network 1."""
    from timm_acsi.cli import predict

    def offline(args):
        raise ConnectionError("Could not reach the Hub for hf-hub:org/model")

    monkeypatch.setattr(predict, "make_recognizer", offline)
    code, out, err = run(capsys, photos / "astronaut.png", "--model", "hf-hub:org/model", "--detector", "none")
    assert (code, out, err) == (1, "", "timm-acsi predict: error: Could not reach the Hub for hf-hub:org/model\n")
