"""Hub publishing and loading, offline: dry-run folder, hf-hub round trip from a local cache, upload via a double."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import timm
import torch
import yaml
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file, save_file

import timm_acsi  # noqa: F401  (registers the models)
from timm_acsi import hub
from timm_acsi.checkpoint import save_checkpoint
from timm_acsi.cli import main as cli_main
from timm_acsi.labels import FER7_LABELS
from timm_acsi.metrics import compute_metrics

REPO_ID = "test-org/acsinet18.rafdb"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
SECRET = "hf_TESTSECRETdonotprint0123456789"


def _meta(input_size=(3, 32, 32), **extra):
    """Checkpoint meta as training writes it, for a 7-class acsinet18 (no crop_pct, like older checkpoints)."""
    return dict(
        **extra,
        architecture="acsinet18",
        num_classes=7,
        label_names=list(FER7_LABELS),
        model_args={},
        input_size=list(input_size),
        dataset="RAF-DB",
        epoch=3,
        metric={"name": "val_acc", "value": 0.5},
    )


def _state_dict(name="acsinet18", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("num_classes", 1000)
    return timm.create_model(name, **kwargs).state_dict()


def _logits(folder_or_sd, x, **kwargs):
    model = timm.create_model("acsinet18", num_classes=7, **kwargs).eval()
    sd = (
        load_file(str(Path(folder_or_sd) / "model.safetensors")) if not isinstance(folder_or_sd, dict) else folder_or_sd
    )
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


@pytest.fixture
def fast_profile(monkeypatch):
    """Skip the FLOP count where it is not under test (the 224x224 and CLI dry runs count for real)."""
    monkeypatch.setattr(hub, "_profile", lambda model, input_size: (sum(p.numel() for p in model.parameters()), 0))


@pytest.fixture(scope="module")
def small_ckpt(work):
    """7-class acsinet18 checkpoint with meta, published at 32x32 (fast)."""
    path = work / "small" / "best.safetensors"
    save_checkpoint(path, _state_dict(num_classes=7), _meta())
    return path


@pytest.fixture(scope="module")
def metrics_file(work):
    """The training helper's metrics.json format, from a real confusion matrix."""
    cm = 9 * torch.eye(7, dtype=torch.int64)
    cm[1:, 0] = 1  # one face of every other class predicted as anger
    cm[0] = torch.tensor([8, 1, 0, 0, 1, 0, 0])  # 10 anger faces, 8 right
    path = work / "metrics.json"
    path.write_text(json.dumps(compute_metrics(cm, FER7_LABELS, dataset="RAF-DB", split="test")))
    return path


@pytest.fixture(scope="module")
def published(work, metrics_file):
    """Dry-run publish of a 224x224 acsinet18 (the only 224 profile in this file)."""
    ckpt = work / "full" / "best.safetensors"
    save_checkpoint(ckpt, _state_dict(num_classes=7, seed=1), _meta(input_size=(3, 224, 224)))
    out = work / "full" / "hub"
    result = hub.publish(ckpt, REPO_ID, metrics=metrics_file, dry_run_dir=out)
    return result, out, ckpt


def test_dry_run_writes_a_timm_repo(published):
    result, out, ckpt = published
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert result.files == ("README.md", "config.json", "model.safetensors") and result.folder == out
    assert result.params == 11_275_527
    assert round(result.gflops, 2) == 1.82

    sd = load_file(str(ckpt))
    published_sd = load_file(str(out / "model.safetensors"))
    assert published_sd.keys() == sd.keys() and all(torch.equal(sd[k], published_sd[k]) for k in sd)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "acsinet18" and cfg["num_classes"] == 7 and cfg["num_features"] == 512
    assert cfg["global_pool"] == "avg" and cfg["label_names"] == list(FER7_LABELS)
    assert cfg["model_args"] == {"num_classes": 7, "in_chans": 3, "global_pool": "avg"}
    pcfg = cfg["pretrained_cfg"]
    expected = dict(
        input_size=[3, 224, 224],
        pool_size=[7, 7],
        crop_pct=0.875,
        crop_mode="center",
        interpolation="bilinear",
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        num_classes=7,
        label_names=list(FER7_LABELS),
        first_conv="conv1",
        classifier="fc",
        license="other",
        paper_ids="doi:10.3390/e24070882",
    )
    assert {k: pcfg[k] for k in expected} == expected
    assert "RAF-DB" in pcfg["description"] and "import timm_acsi" in pcfg["description"]
    assert not {"url", "hf_hub_id", "file", "tag"} & pcfg.keys()  # no source of the ImageNet init leaks in


def test_model_card(published):
    _, out, _ = published
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert meta["tags"][:3] == ["image-classification", "timm", "facial-expression-recognition"]
    assert "transformers" not in meta["tags"]
    assert meta["license"] == "other" and meta["datasets"] == ["RAF-DB"] and meta["metrics"] == ["accuracy"]
    results = meta["model-index"][0]["results"]
    # 62 of 70 correct; per-class recalls 0.8 (anger), 0.9 (the other six)
    assert [(m["name"], m["value"]) for r in results for m in r["metrics"]] == [
        ("Top-1 accuracy (%)", round(100 * 62 / 70, 2)),
        ("Mean class accuracy (%)", round(100 * (0.8 + 6 * 0.9) / 7, 2)),
    ]
    assert results[0]["dataset"]["split"] == "test"
    for line in (
        "| Params (M) | 11.28 (11,275,527) |",
        "| GFLOPs | 1.82 at 224x224 (fvcore convention: one multiply-add = one FLOP) |",
        "| 0 | anger |",
        "| 3 | happiness |",
        "| 6 | neutral |",
        "| Top-1 accuracy | 88.57 |",
        "| anger accuracy | 80.00 |",
        "| happiness | 1 | 0 | 0 | 9 | 0 | 0 | 0 |",
        "Measured on RAF-DB, split `test`, 70 images.",
        "| Preprocessing | resize + center crop (crop_pct 0.875), bilinear interpolation, mean [0.485, 0.456, 0.406]",
        "```bash\npip install timm-acsi\n```\n\n(or `pip install .` from a checkout of timm-acsi)",
        "published with timm-acsi.",
        "import timm_acsi  # registers coresnet*/acsinet* with timm",
        f'model = timm.create_model("hf-hub:{REPO_ID}", pretrained=True).eval()',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        'labels = model.pretrained_cfg["label_names"]',
        'img = Image.open("face.jpg").convert("RGB")  # an aligned face crop',
        "doi:10.3390/e24070882",
    ):
        assert line in body, line
    assert "no plugin discovery" in body and "pypi.org" not in text  # not released yet: no dead link


def test_model_card_feeds_a_grayscale_model_grayscale():
    """The usage snippet of a grayscale model converts the face as the model was trained (L, replicated to RGB)."""
    spec = hub.PublishSpec("acsinet18", 7, FER7_LABELS, {}, input_size=(3, 48, 48), crop_pct=1.0, grayscale=True)
    body = hub.make_model_card(spec, REPO_ID, params=11_275_527, flops=0)
    assert (
        'img = Image.open("face.jpg").convert("L").convert("RGB")  # an aligned face crop, in grayscale as trained'
        in body
    )
    assert 'img = Image.open("face.jpg").convert("RGB")' not in body


def _lay_into_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """huggingface_hub's offline cache layout: a snapshot folder plus refs/main holding its hash (no newline)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes((folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)


def test_hf_hub_load_offline_gives_identical_logits(published, work):
    _, out, _ = published
    cache = work / "hf_cache"
    _lay_into_cache(out, cache, REPO_ID)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    save_file({"x": x, "logits": _logits(out, x)}, str(work / "expected.safetensors"))
    script = textwrap.dedent(
        f"""
        import sys, torch, timm, timm_acsi
        from safetensors.torch import load_file
        exp = load_file({str(work / "expected.safetensors")!r})
        model = timm.create_model("hf-hub:{REPO_ID}", pretrained=True).eval()
        with torch.no_grad():
            y = model(exp["x"])
        assert torch.equal(y, exp["logits"]), (y - exp["logits"]).abs().max()
        assert list(model.pretrained_cfg["label_names"]) == {list(FER7_LABELS)!r}, model.pretrained_cfg
        assert model.pretrained_cfg["hf_hub_id"] == {REPO_ID!r}
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf_home"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]


def test_local_dir_and_file_overlay_load_identically(small_ckpt, work, fast_profile):
    out = work / "small_hub"
    hub.publish(small_ckpt, REPO_ID, dry_run_dir=out)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    expected = _logits(load_file(str(small_ckpt)), x)
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert list(local.pretrained_cfg["label_names"]) == list(FER7_LABELS)
    overlay = timm.create_model(
        "acsinet18.rafdb", pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))
    ).eval()
    with torch.no_grad():
        assert torch.equal(local(x), expected) and torch.equal(overlay(x), expected)


def test_fer_tags_without_weights_raise():
    with pytest.raises(RuntimeError, match=r"No weights are published for acsinet18\.rafdb.*hf-hub:ORG/NAME"):
        timm.create_model("acsinet18.rafdb", pretrained=True)


class FakeApi:
    """HfApi double: records calls, snapshots the uploaded folder, never touches the network."""

    def __init__(self, existing=(), fail=None):
        self.calls, self.uploaded, self.existing, self.fail = [], {}, list(existing), fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail is not None:
            raise self.fail

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def list_repo_files(self, repo_id, **kwargs):
        self.calls.append(("list_repo_files", repo_id, kwargs))
        return self.existing

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        self.uploaded = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")


def test_upload_through_cli_with_api_double(small_ckpt, metrics_file, monkeypatch, capsys, fast_profile):
    api = FakeApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    argv = [
        "publish",
        "--checkpoint",
        str(small_ckpt),
        "--repo-id",
        REPO_ID,
        "--private",
        "--metrics",
        str(metrics_file),
    ]
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert [c[0] for c in api.calls] == ["create_repo", "list_repo_files", "upload_folder"]
    assert api.calls[0] == ("create_repo", REPO_ID, dict(private=True, exist_ok=True, repo_type="model"))
    upload = api.calls[2][2]
    assert upload["revision"] == "main" and upload["repo_type"] == "model" and "token" not in upload
    assert (
        upload["commit_message"]
        == f"Upload acsinet18 (7 classes, RAF-DB): top-1 88.57% with timm-acsi {timm_acsi.__version__}"
    )
    assert sorted(api.uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(api.uploaded["config.json"])["label_names"] == list(FER7_LABELS)
    assert not Path(upload["folder_path"]).exists()  # built in a temporary folder, cleaned up
    assert f"published {REPO_ID}@main" in out and "commit: https://huggingface.co/" in out


def test_upload_to_branch_refuses_existing_files_without_overwrite(small_ckpt, fast_profile):
    api = FakeApi(existing=[".gitattributes", "model.safetensors", "README.md"])
    with pytest.raises(FileExistsError, match=r"already holds README\.md, model\.safetensors: pass --overwrite"):
        hub.publish(small_ckpt, REPO_ID, revision="v2", api=api)
    assert "upload_folder" not in [c[0] for c in api.calls]
    assert api.calls[1] == ("create_branch", REPO_ID, dict(branch="v2", exist_ok=True, repo_type="model"))

    result = hub.publish(small_ckpt, REPO_ID, revision="v2", overwrite=True, commit_message="retrain", api=api)
    upload = api.calls[-1][2]
    assert upload["revision"] == "v2" and upload["commit_message"] == "retrain" == result.commit_message
    assert api.calls[0][2]["private"] is False


@pytest.mark.parametrize(
    "fail, error, match",
    [
        (
            HfHubHTTPError("401 Client Error", response=SimpleNamespace(status_code=401, headers={}, request=None)),
            PermissionError,
            r"HTTP 401.*hf auth login.*HF_TOKEN",
        ),
        (ConnectionError("Name or service not known"), ConnectionError, r"Could not reach the Hub.*--dry-run OUT_DIR"),
    ],
)
def test_hub_failures_name_the_fix(small_ckpt, monkeypatch, fail, error, match):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(error, match=match) as e:
        hub.publish(small_ckpt, REPO_ID, api=FakeApi(fail=fail))
    assert SECRET not in str(e.value)


def test_wrong_architecture_is_refused(work):
    ckpt = work / "coresnet.safetensors"
    save_checkpoint(ckpt, _state_dict("coresnet18", num_classes=7), _meta())
    with pytest.raises(ValueError) as e:
        hub.publish(ckpt, REPO_ID, dry_run_dir=work / "never")
    assert "coresnet.safetensors does not fit acsinet18: 63 missing keys (layer1.0.se.conv1.weight" in str(e.value)
    assert "look like coresnet18 (or resnet18: same weight layout), 7-class head" in str(e.value)
    assert "--model" in str(e.value) and not (work / "never").exists()


def test_resnet50_weights_are_refused(work):
    ckpt = work / "resnet50.pth"
    torch.save(_state_dict("resnet50", num_classes=7), ckpt)
    with pytest.raises(ValueError) as e:
        hub.publish(ckpt, REPO_ID, model="acsinet18", label_names=FER7_LABELS, dry_run_dir=work / "never")
    msg = str(e.value)
    assert "unexpected keys (layer1.0.conv3.weight" in msg and "other shapes (" in msg
    assert "look like coresnet50 (or resnet50: same weight layout), 7-class head" in msg
    assert len(msg) < 1000  # short, unlike torch's full key listing


def test_wrong_class_count_is_refused(work):
    ckpt = work / "eight.safetensors"
    save_checkpoint(ckpt, _state_dict(num_classes=8), _meta())  # meta claims 7
    with pytest.raises(ValueError, match=r"classifier has 8 outputs but num_classes is 7 \(pass --num-classes 8") as e:
        hub.publish(ckpt, REPO_ID, dry_run_dir=work / "never")
    assert "keys" not in str(e.value).split("Its keys look like")[0]  # the head explains it all
    assert "look like acsinet18, 8-class head" in str(e.value)


def test_describe_state_dict_names_placement_variants():
    sd = _state_dict("acsinet18", attn_placement="stage")
    assert hub.describe_state_dict(sd) == 'acsinet18 with model_args {"attn_placement": "stage"}, 1000-class head'
    assert hub.describe_state_dict({"head.weight": torch.zeros(2)}).startswith("not a ResNet-family")


def _make_marker(path):
    Path(path).write_text("unpickled")
    return {}


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _make_marker, (self.marker,)


def test_pickled_checkpoint_is_refused_without_unpickling(work):
    marker = work / "was_unpickled"
    ckpt = work / "pickled.pth"
    torch.save({"state_dict": _state_dict(num_classes=7), "extra": Payload(str(marker))}, ckpt)
    with pytest.raises(ValueError, match=r"never unpickles.*weights_only=True.*safetensors"):
        hub.publish(ckpt, REPO_ID, model="acsinet18", label_names=FER7_LABELS, dry_run_dir=work / "never")
    assert not marker.exists()


def test_plain_tensor_pth_is_accepted_with_flags(work, fast_profile):
    sd = _state_dict(num_classes=7, seed=5)
    ckpt = work / "plain.pth"
    torch.save({"state_dict": sd, "epoch": 3}, ckpt)
    out = work / "plain_hub"
    labels = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]  # spellings canonicalised
    result = hub.publish(ckpt, REPO_ID, model="acsinet18", label_names=labels, dry_run_dir=out)
    assert result.spec.label_names == FER7_LABELS and result.spec.input_size == (3, 224, 224)
    published_sd = load_file(str(out / "model.safetensors"))
    assert published_sd.keys() == sd.keys() and all(torch.equal(sd[k], published_sd[k]) for k in sd)


def _listing(folder):
    """Every file under ``folder`` with its bytes, to prove nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


HUB_LISTING = ["README.md", "config.json", "model.safetensors"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_with_other_files_is_refused_and_kept(small_ckpt, tmp_path, fast_profile, overwrite):
    out = tmp_path / "keep"
    (out / "sub").mkdir(parents=True)
    (out / "important.txt").write_text("precious")
    (out / "sub" / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_text("old")  # a Hub file next to foreign ones changes nothing
    (out / "README.md").mkdir()  # a Hub name that is not a file is foreign
    before = _listing(out)
    with pytest.raises(
        FileExistsError, match=r"holds README\.md, important\.txt, model\.safetensors, sub, which timm-acsi publish did"
    ):
        hub.publish(small_ckpt, REPO_ID, dry_run_dir=out, overwrite=overwrite)
    assert _listing(out) == before and (out / "README.md").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no temporary folder left


@pytest.mark.parametrize("overwrite", [False, True])
def test_hand_written_hub_files_are_never_replaced(small_ckpt, tmp_path, fast_profile, overwrite):
    """A folder holding the user's own README.md (or a config.json of something else) is not an earlier dry run:
    --overwrite replaces only files publish recognises as its own."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("# My model\n\nNotes I wrote.\n")
    (out / "config.json").write_text('{"architecture": "resnet18"}')
    before = _listing(out)
    with pytest.raises(FileExistsError, match=r"holds README\.md, config\.json, which timm-acsi publish did not"):
        hub.publish(small_ckpt, REPO_ID, dry_run_dir=out, overwrite=overwrite)
    assert _listing(out) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_weights_saved_by_timm_are_never_replaced(small_ckpt, tmp_path, fast_profile, overwrite):
    """timm's save_for_hf of one of our models writes the same config.json and model.safetensors as publish, but no
    card of ours: those are the user's own weights, not an earlier dry run."""
    out = tmp_path / "saved"
    timm.models.save_for_hf(timm.create_model("coresnet18", num_classes=7), out, safe_serialization=True)
    before = _listing(out)
    assert sorted(before) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match=r"holds config\.json, model\.safetensors, which timm-acsi publish did"):
        hub.publish(small_ckpt, REPO_ID, dry_run_dir=out, overwrite=overwrite)
    assert _listing(out) == before


def test_output_in_a_read_only_directory_names_the_fix(small_ckpt, tmp_path, monkeypatch, fast_profile):
    """The Hub files are written beside the output folder first; a parent that cannot take them is named."""

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(hub.tempfile, "mkdtemp", read_only)
    with pytest.raises(PermissionError, match=rf"beside {tmp_path / 'out'} first, but {tmp_path} is not writable: "):
        hub.publish(small_ckpt, REPO_ID, dry_run_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_hub_network_failure_of_the_requests_family(small_ckpt, monkeypatch):
    """huggingface_hub 0.x (admitted by setup.cfg) raises requests' ConnectionError, which is not the builtin one:
    it gets the same message as httpx's errors instead of escaping as a traceback."""
    requests = ModuleType("requests")
    requests.RequestException = type("RequestException", (OSError,), {})
    requests.ConnectionError = type("ConnectionError", (requests.RequestException,), {})
    monkeypatch.setitem(sys.modules, "requests", requests)
    fail = requests.ConnectionError("Max retries exceeded with url: /api/repos/create")
    with pytest.raises(ConnectionError, match=r"Could not reach the Hub .*\(ConnectionError: Max retries.*--dry-run"):
        hub.publish(small_ckpt, REPO_ID, api=FakeApi(fail=fail))


def test_checkpoint_folder_is_refused(tmp_path, fast_profile):
    run = tmp_path / "runs" / "a"
    ckpt = run / "best.safetensors"
    save_checkpoint(ckpt, _state_dict(num_classes=7), _meta())
    before = _listing(run)
    with pytest.raises(
        FileExistsError, match=r"best\.safetensors lies in the --dry-run folder .*a new or empty folder"
    ):
        hub.publish(ckpt, REPO_ID, dry_run_dir=run, overwrite=True)
    assert _listing(run) == before
    # a checkpoint named like a Hub file, alone in its folder: still its own folder, still refused
    bare = tmp_path / "bare" / "model.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(ckpt.read_bytes())
    with pytest.raises(FileExistsError, match=r"lies in the --dry-run folder"):
        hub.publish(bare, REPO_ID, dry_run_dir=bare.parent, overwrite=True)
    assert bare.read_bytes() == ckpt.read_bytes()


def test_current_directory_as_output(small_ckpt, tmp_path, monkeypatch, fast_profile):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "important.txt").write_text("precious")
    monkeypatch.chdir(busy)
    with pytest.raises(
        FileExistsError, match=r"The output folder \. holds important\.txt, which timm-acsi publish did not write"
    ):
        hub.publish(small_ckpt, REPO_ID, dry_run_dir=".", overwrite=True)
    assert _listing(busy) == {"important.txt": b"precious"}

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    result = hub.publish(small_ckpt, REPO_ID, dry_run_dir=".")
    assert result.files == tuple(HUB_LISTING) and sorted(p.name for p in empty.iterdir()) == HUB_LISTING
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]  # temporary folder removed
    assert torch.equal(load_file("model.safetensors")["fc.weight"], load_file(str(small_ckpt))["fc.weight"])


def test_overwrite_replaces_only_the_hub_files(small_ckpt, tmp_path, fast_profile):
    out = tmp_path / "hub"
    hub.publish(small_ckpt, REPO_ID, dry_run_dir=out)
    before = _listing(out)
    with pytest.raises(
        FileExistsError,
        match=r"already holds README\.md, config\.json, model\.safetensors from an earlier.*--overwrite",
    ):
        hub.publish(small_ckpt, REPO_ID, dry_run_dir=out)
    assert _listing(out) == before

    inode = out.stat().st_ino
    hub.publish(small_ckpt, REPO_ID, dry_run_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == HUB_LISTING
    assert out.stat().st_ino == inode  # the folder itself is kept, only its files are replaced
    assert (out / "README.md").read_text().startswith("---\n")
    assert json.loads((out / "config.json").read_text())["label_names"] == list(FER7_LABELS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]  # no temporary folder left


def test_crop_pct_comes_from_the_checkpoint(tmp_path, fast_profile):
    ckpt = tmp_path / "best.safetensors"
    save_checkpoint(ckpt, _state_dict(num_classes=7), _meta(crop_pct=1.0))
    out = tmp_path / "hub"
    result = hub.publish(ckpt, REPO_ID, dry_run_dir=out)
    assert result.spec.crop_pct == 1.0
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["crop_pct"] == 1.0
    assert "center crop (crop_pct 1.0)," in (out / "README.md").read_text()
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["crop_pct"] == 1.0 and cfg["input_size"] == (3, 32, 32)
    assert timm.data.create_transform(**cfg).transforms[0].size == 32  # resize straight to the crop size
    with pytest.raises(ValueError, match=r"crop_pct 0 is not a positive number"):
        hub.resolve_publish_spec(_meta(crop_pct=0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(label_names=FER7_LABELS[:6]),
            r"says its outputs are \['anger', .*'neutral'\], not \['anger', .*'surprise'\]: drop label_names "
            r"\(--label-names\)\.$",
        ),
        (dict(model="coresnet18"), r"says architecture acsinet18, not coresnet18: drop the model name \(--model\)\.$"),
        (dict(num_classes=8), r"says it has 7 classes, not 8: drop num_classes \(--num-classes\)\.$"),
        (dict(label_names=FER7_LABELS[::-1]), r"not \['neutral', 'surprise'"),
        (dict(dataset="AffectNet"), r"says dataset RAF-DB, not AffectNet: drop --dataset\.$"),
        (
            dict(model="coresnet18", num_classes=8),
            r"says architecture acsinet18, not coresnet18: drop the model name \(--model\); it says it has 7 classes",
        ),
        (dict(repo_id="no-namespace"), r"repo_id must be 'ORG/NAME'"),
    ],
)
def test_bad_arguments_are_refused(small_ckpt, work, kwargs, match):
    repo_id = kwargs.pop("repo_id", REPO_ID)
    with pytest.raises(ValueError, match=match):
        hub.publish(small_ckpt, repo_id, dry_run_dir=work / "never", **kwargs)


def test_missing_meta_needs_label_names_and_known_architecture(work):
    ckpt = work / "nometa.pth"
    torch.save(_state_dict(num_classes=7), ckpt)
    with pytest.raises(
        ValueError,
        match=r"nometa\.pth does not record its architecture \(no architecture in its description\): pass "
        r"the model name \(--model, e\.g\. acsinet18",
    ):
        hub.publish(ckpt, REPO_ID, label_names=FER7_LABELS, dry_run_dir=work / "never")
    with pytest.raises(
        ValueError,
        match=r"does not record the order of its 7 outputs \(no label_names in its description\): pass "
        r"label_names, one per output .*--label-names anger,disgust",
    ):
        hub.publish(ckpt, REPO_ID, model="acsinet18", dry_run_dir=work / "never")
    with pytest.raises(ValueError, match=r"6 label names for a 7-class head; pass exactly one name per class"):
        hub.publish(
            ckpt, REPO_ID, model="acsinet18", num_classes=7, label_names=FER7_LABELS[:6], dry_run_dir=work / "never"
        )
    with pytest.raises(ValueError, match=r"classifier has 7 outputs but num_classes is 6 \(pass --num-classes 7"):
        hub.publish(ckpt, REPO_ID, model="acsinet18", label_names=FER7_LABELS[:6], dry_run_dir=work / "never")
    with pytest.raises(ValueError, match=r"acsinet18 does not accept model_args \{\"bogus\": 1\}"):
        hub.publish(
            ckpt,
            REPO_ID,
            model="acsinet18",
            label_names=FER7_LABELS,
            model_args={"bogus": 1},
            dry_run_dir=work / "never",
        )
    with pytest.raises(ValueError, match=r"'resnet18' is not a timm-acsi architecture; use one of: acsinet18"):
        hub.publish(ckpt, REPO_ID, model="resnet18", label_names=FER7_LABELS, dry_run_dir=work / "never")


def test_non_finite_forward_is_refused(work):
    sd = _state_dict(num_classes=7)
    sd["fc.bias"] = torch.full_like(sd["fc.bias"], float("nan"))
    ckpt = work / "nan.safetensors"
    save_checkpoint(ckpt, sd, _meta())
    with pytest.raises(ValueError, match=r"NaN/inf logits"):
        hub.publish(ckpt, REPO_ID, dry_run_dir=work / "never")


def test_metrics_schemas(work):
    alt = work / "alt_metrics.json"
    alt.write_text(json.dumps({"top1": 86.86, "balanced_acc": 79.5, "per_class": {"happy": 95.0, "Angry": 80.25}}))
    m = hub.load_eval_metrics(alt, FER7_LABELS)
    assert (m.accuracy, m.mean_class_accuracy) == (86.86, 79.5)
    assert m.per_class_accuracy == {"happiness": 95.0, "anger": 80.25} and m.dataset is None

    reordered = work / "reordered.json"
    reordered.write_text(json.dumps({"accuracy": 0.8, "label_names": list(FER7_LABELS[::-1])}))
    with pytest.raises(ValueError, match=r"computed with label order \['neutral'.*evaluate the published checkpoint"):
        hub.load_eval_metrics(reordered, FER7_LABELS)
    empty = work / "empty.json"
    empty.write_text("{}")
    with pytest.raises(ValueError, match=r"has no accuracy: expected one of accuracy, top1"):
        hub.load_eval_metrics(empty, FER7_LABELS)
    for content, message in (
        ([0.8], r"holds a JSON list; expected an object"),
        ({"accuracy": "88.5"}, r"accuracy '88\.5' must be numbers \(fractions 0\.\.1 or percentages\), not text"),
        ({"accuracy": 0.8, "per_class": [0.8]}, r"the per-class accuracies must be an object of class name"),
        ({"per_class": {"happy": "95"}}, r"happy accuracy '95' must be numbers"),
    ):
        empty.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            hub.load_eval_metrics(empty, FER7_LABELS)


def test_cli_dry_run_and_errors(small_ckpt, work, capsys):
    out = work / "cli_hub"
    argv = [
        "publish",
        "--model",
        "acsinet18",
        "--checkpoint",
        str(small_ckpt),
        "--repo-id",
        REPO_ID,
        "--dry-run",
        str(out),
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "loads strictly into acsinet18 (7 classes)" in printed and "params: 11,275,527" in printed
    assert "0=anger, 1=disgust" in printed and f"dry run: wrote {out} (nothing uploaded)" in printed
    assert cli_main(argv) == 2
    assert "already holds README.md, config.json, model.safetensors from an earlier dry run" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    run_dir = [*argv[:-1], str(small_ckpt.parent)]
    for bad_argv, match in (
        ([*argv, "--overwrite"], "which timm-acsi publish did not write"),
        ([*argv[:-1], str(out / "notes.txt")], "notes.txt is a file"),
        ([*run_dir, "--overwrite"], "lies in the --dry-run folder"),
    ):
        assert cli_main(bad_argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("timm-acsi publish: error: ") and captured.err.count("\n") == 1
        assert match in captured.err and captured.out == ""
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        cli_main([*argv[:-2], "--model-args", '{"attn_placement": "stage"}'])
    assert "expected KEY=VALUE (e.g. attn_placement=stage)" in capsys.readouterr().err
