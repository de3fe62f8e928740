"""Weights that ship inside the package: the FER-2013 tags load offline, carry their labels and preprocessing,
predict a fixed image exactly as when they were trained, and are inside the wheel."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from timm_acsi import FER7_LABELS
from timm_acsi.models.coresnet import FER2013_SHIPPED, WEIGHTS_DIR

REPO = Path(__file__).resolve().parent.parent
HUB_FILES = ("README.md", "config.json", "model.safetensors")

#: Logits of each shipped model on :func:`_smiley` (fp32 model, weights as shipped); they pin the weights.
EXPECTED_LOGITS = {
    "coresnet18": [-1.1029, -0.3911, -0.6855, 3.6785, -0.3283, -0.2972, -0.9508],  # happiness
    "acsinet18": [-0.8847, -0.8481, -0.6186, 3.4998, -0.4958, -0.076, -0.5774],  # happiness
}


def _smiley() -> Image.Image:
    """A drawn colour 'face' (yellow disc, eyes, smile), 64x64: a fixed input made by the test."""
    img = Image.new("RGB", (64, 64), (90, 120, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((6, 4, 58, 60), fill=(235, 200, 60))
    draw.ellipse((19, 20, 27, 30), fill=(30, 30, 30))
    draw.ellipse((37, 20, 45, 30), fill=(30, 30, 30))
    draw.arc((16, 26, 48, 50), start=20, end=160, fill=(120, 20, 20), width=3)
    return img


def _input(model: torch.nn.Module) -> torch.Tensor:
    """The smiley through the model's own preprocessing: timm's data config, grayscale as the model says."""
    cfg = timm.data.resolve_data_config({}, model=model)
    img = _smiley().convert("L").convert("RGB") if model.grayscale else _smiley()
    return timm.data.create_transform(**cfg)(img).unsqueeze(0)


@pytest.mark.parametrize("arch", FER2013_SHIPPED)
def test_fer2013_tag_is_the_default_and_loads_offline(arch):
    model = timm.create_model(arch, pretrained=True).eval()
    cfg = model.pretrained_cfg
    assert cfg["tag"] == "fer2013" and cfg["architecture"] == arch
    assert tuple(cfg["label_names"]) == FER7_LABELS and model.num_classes == 7
    assert cfg["input_size"] == (3, 48, 48) and cfg["crop_pct"] == 1.0 and model.grayscale is True
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with safe_open(WEIGHTS_DIR / f"{arch}.fer2013" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} >= {"F16"}  # stored in fp16 to halve the size
    with torch.no_grad():
        logits = model(_input(model))[0]
    expected = torch.tensor(EXPECTED_LOGITS[arch])
    assert torch.allclose(logits, expected, atol=2e-4), logits.tolist()
    assert FER7_LABELS[int(logits.argmax())] == FER7_LABELS[int(expected.argmax())]


@pytest.mark.parametrize("arch", FER2013_SHIPPED)
def test_shipped_folder_is_a_hub_folder(arch):
    """The folder loads through timm's own local-dir: (the Hub format) with the same logits as the tag."""
    folder = WEIGHTS_DIR / f"{arch}.fer2013"
    assert sorted(p.name for p in folder.iterdir()) == sorted(HUB_FILES)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == arch and config["model_args"]["grayscale"] is True
    assert config["label_names"] == list(FER7_LABELS)
    card = (folder / "README.md").read_text()
    assert "PrivateTest" in card and "PublicTest" in card and "FER-2013" in card
    assert '.convert("L").convert("RGB")  # an aligned face crop, in grayscale as trained' in card
    assert f'timm.create_model("{arch}.fer2013",\npretrained=True)' in card  # the offline copy, named in the notes
    tag = timm.create_model(arch, pretrained=True).eval()
    hub = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert hub.grayscale is True and hub.pretrained_cfg["input_size"] == (3, 48, 48)
    x = _input(tag)
    with torch.no_grad():
        assert torch.equal(tag(x), hub(x))


def test_wheel_holds_the_weights(tmp_path):
    """``pip wheel .`` packs every shipped folder and the demo's examples (package_data), so a plain install
    works offline."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(REPO),
        "--no-deps",
        "--no-build-isolation",
        "--no-index",  # offline: nothing is fetched, not even pip's own version check
        "--disable-pip-version-check",
        "-q",
        "-w",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = tmp_path.glob("timm_acsi-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for arch in FER2013_SHIPPED:
        for f in HUB_FILES:
            assert f"timm_acsi/weights/{arch}.fer2013/{f}" in names
    sizes = {i.filename: i.file_size for i in zipfile.ZipFile(wheel).infolist()}
    for arch in FER2013_SHIPPED:
        on_disk = (WEIGHTS_DIR / f"{arch}.fer2013" / "model.safetensors").stat().st_size
        assert sizes[f"timm_acsi/weights/{arch}.fer2013/model.safetensors"] == on_disk
    # the demo's example photos, so `timm-acsi demo` from a plain install offers them
    assert {"timm_acsi/demo/examples/astronauts.jpg", "timm_acsi/demo/examples/cat.jpg"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert all(n.startswith("timm_acsi") for n in names)
