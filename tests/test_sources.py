"""The model-source resolver: every source type gives the same model, label order and preprocessing; every
bad source fails with a message naming the fix. Offline: checkpoints and Hub folders are written here."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

import timm_acsi
from timm_acsi import FER7_LABELS
from timm_acsi.checkpoint import save_checkpoint
from timm_acsi.sources import ModelDescription, load_model, resolve_description

pytestmark = pytest.mark.usefixtures("one_thread")

RAFDB_ORDER = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")


def _meta(**extra):
    """The description ``timm-acsi train`` writes (its ``meta_base`` plus epoch and metric)."""
    meta = dict(
        architecture="acsinet18",
        num_classes=7,
        label_names=list(RAFDB_ORDER),
        model_args={},
        input_size=[3, 48, 48],
        crop_pct=48 / 56,
        grayscale=True,
        config_hash="0" * 12,
        dataset="FER-2013",
        epoch=1,
        metric={"name": "val_acc", "value": 0.5},
    )
    return {**meta, **extra}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder holding a freshly initialised 48-px grayscale acsinet18 written as training writes it."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = timm.create_model("acsinet18", num_classes=7).eval()
    save_checkpoint(run / "best.safetensors", model.state_dict(), _meta())
    return run, model


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_file_gives_model_labels_and_preprocessing(trained, x):
    run, model = trained
    loaded = load_model(str(run / "best.safetensors"))
    assert loaded.architecture == "acsinet18"
    assert loaded.label_names == RAFDB_ORDER  # the file's own order, never re-sorted
    assert loaded.grayscale is True and loaded.model.grayscale is True
    assert loaded.data_config == {
        "input_size": (3, 48, 48),
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 48 / 56,
        "crop_mode": "center",
    }
    assert loaded.weights_sha256 == _sha(run / "best.safetensors")
    assert loaded.description["dataset"] == "FER-2013" and loaded.source == str(run / "best.safetensors")
    assert not loaded.model.training
    assert torch.equal(_logits(loaded.model, x), _logits(model, x))


def test_run_folder_uses_best(trained, x):
    run, model = trained
    loaded = load_model(str(run))
    assert loaded.weights_sha256 == _sha(run / "best.safetensors")
    assert torch.equal(_logits(loaded.model, x), _logits(model, x))


@pytest.fixture(scope="module")
def hub_folder(trained, tmp_path_factory):
    """A timm Hub folder (config.json + model.safetensors) with the grayscale flag at the top level."""
    run, _ = trained
    folder = tmp_path_factory.mktemp("hub") / "acsinet18.fer2013"
    desc = resolve_description(_meta(), "test")
    model = timm.create_model("acsinet18", num_classes=7, pretrained_cfg=desc.pretrained_cfg())
    model.load_state_dict(load_file(str(run / "best.safetensors")))
    config = {"label_names": list(RAFDB_ORDER), "pretrained_cfg": desc.pretrained_cfg()}
    save_for_hf(model, folder, model_config=config, safe_serialization=True)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "grayscale": True}))
    return folder


def test_local_dir_and_plain_folder(hub_folder, trained, x):
    _, model = trained
    for source in (f"local-dir:{hub_folder}", str(hub_folder)):
        loaded = load_model(source)
        assert loaded.label_names == RAFDB_ORDER and loaded.grayscale is True
        assert loaded.data_config["input_size"] == (3, 48, 48) and loaded.data_config["crop_pct"] == 48 / 56
        assert loaded.weights_sha256 == _sha(hub_folder / "model.safetensors")
        assert torch.equal(_logits(loaded.model, x), _logits(model, x))


def test_grayscale_inside_pretrained_cfg_is_read_and_kept_from_timm(hub_folder, tmp_path):
    """timm's PretrainedCfg has no ``grayscale`` field: the resolver takes it out before timm sees it."""
    folder = tmp_path / "inner"
    folder.mkdir()
    raw = json.loads((hub_folder / "config.json").read_text())
    raw.pop("grayscale")
    raw["pretrained_cfg"]["grayscale"] = True
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "model.safetensors").write_bytes((hub_folder / "model.safetensors").read_bytes())
    loaded = load_model(f"local-dir:{folder}")
    assert loaded.grayscale is True and "grayscale" not in loaded.model.pretrained_cfg


def test_hf_hub_from_an_offline_cache(hub_folder, trained, x, tmp_path):
    """``hf-hub:`` through huggingface_hub's cache layout, with HF_HUB_OFFLINE=1 (a fresh process)."""
    snapshot = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--test-org--acsinet18.fer2013"
    (repo / "snapshots" / snapshot).mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (repo / "snapshots" / snapshot / name).write_bytes((hub_folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot)
    save_file({"x": x, "logits": _logits(trained[1], x)}, str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from timm_acsi.sources import load_model
        torch.set_num_threads(1)  # as the test process: same kernels, bit-identical logits
        exp = load_file({str(tmp_path / "expected.safetensors")!r})
        loaded = load_model("hf-hub:test-org/acsinet18.fer2013")
        with torch.no_grad():
            assert torch.equal(loaded.model(exp["x"]), exp["logits"])
        assert loaded.label_names == {RAFDB_ORDER!r} and loaded.grayscale, loaded
        assert loaded.data_config["input_size"] == (3, 48, 48), loaded.data_config
        print(loaded.weights_sha256)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == _sha(hub_folder / "model.safetensors")


def test_tag_with_weights(hub_folder, trained, x):
    """A registered tag whose weights file is given: its pretrained cfg gives labels and preprocessing."""
    loaded = load_model("acsinet18.rafdb", pretrained_cfg_overlay=dict(file=str(hub_folder / "model.safetensors")))
    assert loaded.architecture == "acsinet18" and loaded.label_names == FER7_LABELS and not loaded.grayscale
    assert loaded.data_config["input_size"] == (3, 224, 224) and loaded.data_config["crop_pct"] == 0.875
    assert loaded.weights_sha256 == _sha(hub_folder / "model.safetensors")
    assert torch.equal(_logits(loaded.model, x), _logits(trained[1], x))


def test_shipped_fer2013_tag_is_the_default_and_grayscale():
    """The FER-2013 weights inside the package: a tag with weights that loads offline."""
    loaded = load_model("acsinet18")
    shipped = Path(timm_acsi.__file__).parent / "weights" / "acsinet18.fer2013" / "model.safetensors"
    assert loaded.source == "acsinet18" and loaded.description["tag"] == "fer2013"
    assert loaded.label_names == FER7_LABELS and loaded.grayscale is True and loaded.model.grayscale is True
    assert loaded.data_config["input_size"] == (3, 48, 48) and loaded.data_config["crop_pct"] == 1.0
    assert loaded.weights_sha256 == _sha(shipped)


def test_checkpoint_without_description_needs_architecture_and_labels(trained, tmp_path, x):
    bare = tmp_path / "bare.safetensors"
    save_file(dict(trained[1].state_dict()), str(bare))
    with pytest.raises(
        ValueError,
        match=r"bare\.safetensors does not record its architecture nor the order of its outputs \(no architecture "
        r"and no label_names in its description\): pass the model name \(--arch, e\.g\. acsinet18; .*\) and "
        r"label_names, one per output",
    ):
        load_model(str(bare))
    with pytest.raises(ValueError, match=r"does not record the order of its 7 outputs \(no label_names"):
        load_model(str(bare), architecture="acsinet18")  # the count comes from the file's classifier
    loaded = load_model(str(bare), architecture="acsinet18", label_names=list(RAFDB_ORDER))
    assert loaded.label_names == RAFDB_ORDER and not loaded.grayscale
    assert loaded.data_config["input_size"] == (3, 224, 224) and loaded.data_config["crop_pct"] == 0.875
    assert torch.equal(_logits(loaded.model, x), _logits(trained[1], x))
    with pytest.raises(
        ValueError, match=r"does not fit coresnet18: 72 unexpected keys .* look like acsinet18.*architecture \(--arch\)"
    ):
        load_model(str(bare), architecture="coresnet18", label_names=list(RAFDB_ORDER))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(architecture="coresnet18"),
            r"says architecture acsinet18, not coresnet18: drop the model name \(--arch\)",
        ),
        (dict(label_names=list(FER7_LABELS)), r"says its outputs are \['surprise', .*\], not \['anger', .*\]: drop"),
        (dict(grayscale=False), r"says grayscale=True, not False: drop grayscale \(--grayscale\)"),
    ],
)
def test_arguments_contradicting_the_description_are_refused(trained, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model(str(trained[0]), **kwargs)


def test_label_spellings_agreeing_with_the_description_are_accepted(trained):
    spelled = ["surprised", "fearful", "disgusted", "happy", "sad", "angry", "neutral"]
    assert load_model(str(trained[0]), label_names=spelled).label_names == RAFDB_ORDER


@pytest.mark.parametrize(
    "source, error, match",
    [
        ("{tmp}/missing.safetensors", FileNotFoundError, r"No such checkpoint or folder: .*missing\.safetensors"),
        ("{tmp}", ValueError, r"folder without best\.safetensors \(a run folder of timm-acsi train\)"),
        ("nosuchmodel", ValueError, r"neither a file or folder nor a timm model name"),
        ("coresnet34", ValueError, r"coresnet34\.rafdb has no weights published: pass a trained checkpoint .*NAME\.$"),
        ("acsinet18.rafdb", ValueError, r"acsinet18\.rafdb has no weights published: pass a trained checkpoint"),
        ("acsinet18.nosuchtag", ValueError, r"Invalid pretrained tag \(nosuchtag\).*Tags of acsinet18"),
        ("resnet18.a1_in1k", ValueError, r"lists no label_names \(1000 classes\): it is not an expression model"),
        ("local-dir:{tmp}", FileNotFoundError, r"no config\.json in"),
    ],
)
def test_bad_sources_name_the_fix(source, error, match, tmp_path):
    with pytest.raises(error, match=match):
        load_model(source.format(tmp=tmp_path))


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "best.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        load_model(str(tmp_path))


def test_bad_crop_in_description_is_refused():
    with pytest.raises(ValueError, match=r"crop_pct 'wide' is not a positive number"):
        resolve_description(_meta(crop_pct="wide"), "ckpt")
    assert resolve_description(_meta(crop_pct=224 / 200), "ckpt").crop_pct == 1.12  # train's resize < img-size
    assert resolve_description(_meta(crop_pct=None), "ckpt").crop_pct == 0.875  # null: the paper's 224/256


def test_description_builds_timm_pretrained_cfg():
    desc = resolve_description(_meta(), "ckpt")
    assert desc == ModelDescription(
        architecture="acsinet18",
        num_classes=7,
        label_names=RAFDB_ORDER,
        model_args={},
        input_size=(3, 48, 48),
        crop_pct=48 / 56,
        grayscale=True,
        dataset="FER-2013",
    )
    model = timm.create_model("acsinet18", pretrained_cfg=desc.pretrained_cfg())
    assert model.pretrained_cfg["label_names"] == RAFDB_ORDER and "grayscale" not in model.pretrained_cfg
    assert desc.pretrained_cfg()["pool_size"] == (2, 2)  # 48 px gives a 2x2 final map (48 / 32 rounded up)
    other = resolve_description(_meta(architecture="test_efficientnet"), "ckpt").pretrained_cfg()
    assert (other["first_conv"], other["classifier"]) == ("conv_stem", "classifier")  # the architecture's own


def test_class_count_of_the_label_names_is_the_description_s():
    """A description without num_classes has as many classes as label names: another count contradicts it."""
    with pytest.raises(ValueError, match=r"^ckpt says it has 7 classes, not 8: drop num_classes \(--num-classes\)\.$"):
        resolve_description(_meta(num_classes=None), "ckpt", num_classes=8)
    assert resolve_description(_meta(num_classes=None), "ckpt").num_classes == 7
