"""Canonical FER labels, and checkpoint files: safetensors + JSON meta, atomic writes, safe reads."""

import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import timm_acsi.checkpoint as ckpt
from timm_acsi import FER7_LABELS, FER8_LABELS, canonical_label
from timm_acsi.checkpoint import atomic_write, load_checkpoint, read_checkpoint_meta, save_checkpoint, sidecar_path
from timm_acsi.labels import check_label_names, label_names_for

# ---------------------------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------------------------


def test_canonical_orders():
    assert FER7_LABELS == ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
    assert FER8_LABELS == FER7_LABELS + ("contempt",)
    assert all(canonical_label(n) == n for n in FER8_LABELS)


@pytest.mark.parametrize(
    "spelling, canonical",
    [
        ("anger", "anger"),
        ("Angry", "anger"),
        ("ANGER", "anger"),
        ("disgusted", "disgust"),
        ("Disgust", "disgust"),
        ("fearful", "fear"),
        ("afraid", "fear"),
        ("scared", "fear"),
        ("happy", "happiness"),
        ("Happiness", "happiness"),
        ("joy", "happiness"),
        ("sad", "sadness"),
        (" Sadness ", "sadness"),
        ("surprised", "surprise"),
        ("Surprise", "surprise"),
        ("normal", "neutral"),
        ("Neutral", "neutral"),
        ("contempt", "contempt"),
    ],
)
def test_canonical_label_spellings(spelling, canonical):
    assert canonical_label(spelling) == canonical


@pytest.mark.parametrize("name", ["smile", "", "angryy", "happy face", "0", "calm"])
def test_canonical_label_unknown_raises(name):
    with pytest.raises(ValueError, match=rf"Unknown expression class name {name!r}\. Accepted spellings: .*angry"):
        canonical_label(name)


def test_label_names_for():
    assert label_names_for(7) == FER7_LABELS
    assert label_names_for(8) == FER8_LABELS
    for n in (0, 6, 9, 1000):
        with pytest.raises(ValueError, match=rf"No canonical FER label set has {n} classes"):
            label_names_for(n)


def test_check_label_names_normalises_and_keeps_order():
    assert check_label_names(["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"], 7) == FER7_LABELS
    # RAF-DB's own order stays RAF-DB's order: names are normalised, never re-sorted
    rafdb = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
    assert check_label_names(rafdb, 7) == ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
    assert check_label_names(list(FER8_LABELS), 8) == FER8_LABELS


def test_check_label_names_errors():
    with pytest.raises(ValueError, match=r"6 label names for a 7-class head"):
        check_label_names(FER7_LABELS[:6], 7)
    with pytest.raises(ValueError, match=r"Duplicate label names"):
        check_label_names(["angry", "anger", "fear", "happy", "sad", "surprise", "neutral"], 7)
    with pytest.raises(ValueError, match=r"Unknown expression class name 'smile'"):
        check_label_names(["smile", *FER7_LABELS[1:]], 7)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------

META = {
    "architecture": "acsinet18",
    "num_classes": 7,
    "label_names": list(FER7_LABELS),
    "model_args": {"attn_placement": "stage", "final_attn": False},
    "input_size": [3, 224, 224],
    "epoch": 12,
    "metric": {"name": "val_acc", "value": 0.8686},
    "config_hash": "0123abcd",
    "dataset": "rafdb",
}


def _state_dict() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "bn.running_var": torch.rand(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(17, dtype=torch.long),
        "half": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "transposed": base.t(),  # non-contiguous
        "view_a": base[:2],  # two views of one storage
        "view_b": base[2:],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_roundtrip(tmp_path):
    sd = _state_dict()
    path = tmp_path / "run" / "best.safetensors"  # parent created on demand
    assert save_checkpoint(path, sd, META) == path
    loaded, meta = load_checkpoint(path)
    _assert_same(loaded, sd)
    assert meta == META
    assert read_checkpoint_meta(path) == META
    assert sidecar_path(path) == tmp_path / "run" / "best.json"
    assert json.loads(sidecar_path(path).read_text()) == META
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["timm_acsi"]) == META
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.json", "best.safetensors"]


def test_roundtrip_model_loads_strictly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), {"architecture": "toy"})
    sd, meta = load_checkpoint(tmp_path / "m.safetensors")
    clone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    clone.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert meta == {"architecture": "toy"}


def test_save_overwrites_previous(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)}, {"epoch": 1})
    save_checkpoint(path, {"w": torch.ones(3)}, {"epoch": 2})
    sd, meta = load_checkpoint(path)
    assert torch.equal(sd["w"], torch.ones(3)) and meta == {"epoch": 2}
    assert json.loads(sidecar_path(path).read_text()) == {"epoch": 2}


def test_save_requires_safetensors_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        save_checkpoint(tmp_path / "model.pth", {"w": torch.zeros(1)}, {})
    assert not list(tmp_path.iterdir())


def _leftovers(folder: Path, keep: set) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"previous content")

    def failing_write(tmp: str) -> None:
        Path(tmp).write_bytes(b"half-writ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing_write)
    assert path.read_bytes() == b"previous content"
    assert _leftovers(tmp_path, {"data.bin"}) == []

    # an interrupt (BaseException) cleans up too
    def interrupted(tmp: str) -> None:
        Path(tmp).write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"previous content"
    assert _leftovers(tmp_path, {"data.bin"}) == []

    # success replaces the file
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert path.read_bytes() == b"new" and _leftovers(tmp_path, {"data.bin"}) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask):
    """0666 less the umask, as open() gives: run folders and reports stay readable on a shared machine (mkstemp
    would leave 0600, owner-only)."""
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "report.md", lambda tmp: Path(tmp).write_text("table"))
        save_checkpoint(tmp_path / "w.safetensors", {"a": torch.zeros(1)}, {"architecture": "acsinet18"})
    finally:
        os.umask(old)
    for name in ("report.md", "w.safetensors", "w.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_unreadable_checkpoint_is_not_reported_missing(tmp_path, monkeypatch):
    """A checkpoint without read permission is reported as such (safetensors says "No such file or directory")."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the permission check see what a user would
        real = os.access
        monkeypatch.setattr(ckpt.os, "access", lambda p, mode: False if Path(p) == path else real(p, mode))
    with pytest.raises(PermissionError, match=r"w.safetensors exists but cannot be read \(permission denied\)"):
        load_checkpoint(path)


def test_save_checkpoint_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.safetensors"
    sd = _state_dict()
    save_checkpoint(path, sd, META)
    before = (path.read_bytes(), sidecar_path(path).read_bytes())

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # a partial, corrupt write...
        raise RuntimeError("killed mid-write")  # ...then the process dies

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        save_checkpoint(path, {"w": torch.ones(2)}, {"epoch": 99})
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    assert _leftovers(tmp_path, {"best.safetensors", "best.json"}) == []
    loaded, meta = load_checkpoint(path)
    _assert_same(loaded, sd)
    assert meta == META


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_pth_plain_tensors_load_weights_only(tmp_path, suffix):
    sd = _state_dict()
    path = tmp_path / f"model{suffix}"
    torch.save(sd, path)
    loaded, meta = load_checkpoint(path)
    _assert_same(loaded, sd)
    assert meta is None
    # a JSON sidecar next to it is its description
    sidecar_path(path).write_text(json.dumps(META))
    assert load_checkpoint(path)[1] == META


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_pth_training_checkpoint_unwrapped(tmp_path, key):
    sd = _state_dict()
    path = tmp_path / "train.pth"
    torch.save({key: sd, "epoch": 3, "optimizer": {"lr": 0.01}}, path)
    loaded, _ = load_checkpoint(path)
    _assert_same(loaded, sd)


def test_ddp_prefix_stripped_pth(tmp_path):
    sd = _state_dict()
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    loaded, _ = load_checkpoint(path)
    _assert_same(loaded, sd)
    # only a leading 'module.' goes: inner names that contain it stay
    torch.save({"head.module.w": torch.ones(1)}, path)
    assert list(load_checkpoint(path)[0]) == ["head.module.w"]


def test_ddp_prefix_stripped_safetensors(tmp_path):
    """A DDP model's state dict saved as safetensors loads like the .pth one: 'module.' stripped."""
    sd = _state_dict()
    path = tmp_path / "ddp.safetensors"
    save_checkpoint(path, {f"module.{k}": v for k, v in sd.items()}, META)
    loaded, meta = load_checkpoint(path)
    _assert_same(loaded, sd)
    assert meta == META


class _Payload:
    """Unpickling this runs code (creates ``marker``): exactly what a checkpoint loader must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_object_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"pickled objects.*never unpickles.*weights_only=True.*safetensors"):
        load_checkpoint(path)
    assert not marker.exists()


def test_pickled_module_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match=r"holds pickled objects, which timm-acsi never unpickles"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncated", "not_torch"])
def test_corrupt_pth_is_not_called_a_pickle(tmp_path, damage):
    """A damaged file is reported as damaged, not as 'holds pickled objects' (which sends users the wrong way)."""
    path = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(30_000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:5_000] if damage == "truncated" else b"hello world")
    with pytest.raises(ValueError, match=r"not a readable torch file .*corrupt, truncated or of another format") as e:
        load_checkpoint(path)
    assert "pickled" not in str(e.value)


def test_pth_without_state_dict_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    with pytest.raises(ValueError, match=r"holds no state dict of tensors \(found list\)"):
        load_checkpoint(path)
    torch.save({"epoch": 3, "w": torch.ones(1)}, path)
    with pytest.raises(ValueError, match=r"holds no state dict of tensors"):
        load_checkpoint(path)


def test_corrupt_safetensors_raise_value_error(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
        load_checkpoint(garbage)
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
        read_checkpoint_meta(garbage)

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(1000)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
        load_checkpoint(truncated)

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
        load_checkpoint(empty)


def test_unknown_suffix_and_missing_file(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"whatever")
    with pytest.raises(ValueError, match=r"Unknown checkpoint type '\.npz'"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_meta_sources(tmp_path):
    """Header first, then the sidecar, else None."""
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(1)}, str(plain))
    assert read_checkpoint_meta(plain) is None
    assert load_checkpoint(plain)[1] is None
    sidecar_path(plain).write_text(json.dumps({"architecture": "coresnet18"}))
    assert read_checkpoint_meta(plain) == {"architecture": "coresnet18"}

    ours = tmp_path / "ours.safetensors"
    save_checkpoint(ours, {"w": torch.ones(1)}, META)
    sidecar_path(ours).write_text(json.dumps({"edited": True}))
    assert read_checkpoint_meta(ours) == META  # the header, which travels with the weights, wins


def test_load_weights_explains_a_classifier_of_another_size_first():
    """A head of another size is the class count, not the architecture: said first and alone, its shapes not
    listed as mismatches; the rest of a mismatch is still listed."""
    model = timm.create_model("coresnet18", num_classes=7)
    eight = timm.create_model("coresnet18", num_classes=8).state_dict()
    with pytest.raises(ValueError) as e:
        ckpt.load_weights(model, eight, "eight.safetensors", "coresnet18", hint="Fix it.")
    assert str(e.value) == (
        "eight.safetensors does not fit coresnet18: its classifier has 8 outputs but num_classes is 7 (pass "
        "--num-classes 8 with 8 label names, or the checkpoint of the 7-class model). Its keys look like coresnet18 "
        "(or resnet18: same weight layout), 8-class head. Fix it."
    )
    del eight["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match=r"7-class model\); 1 missing keys \(layer1\.0\.conv1\.weight\)\. Its keys"):
        ckpt.load_weights(model, eight, "eight.safetensors", "coresnet18")
