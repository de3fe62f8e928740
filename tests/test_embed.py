"""timm_acsi.embed and ``timm-acsi embed``: pooled features, t-SNE, silhouettes and the Fig. 4 plot."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from fer_fixtures import FOLDER_CLASSES, make_fer2013_folders, make_folder_dataset
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from timm_acsi import FER7_LABELS
from timm_acsi.checkpoint import save_checkpoint
from timm_acsi.cli import run_command
from timm_acsi.data import build_dataset
from timm_acsi.embed import (
    CLASS_COLOURS,
    LEGEND_WIDTH,
    PANEL_TITLE_HEIGHT,
    Embedding,
    embed_model,
    eval_transform,
    extract_features,
    limited_threads,
    plot_embeddings,
    require_sklearn,
    silhouette,
    stratified_indices,
    tsne_2d,
)
from timm_acsi.extras import MissingExtraError
from timm_acsi.sources import load_model


@pytest.fixture(scope="module", autouse=True)
def one_thread_everywhere():
    """One thread for torch and for scikit-learn's OpenMP/BLAS: on the shared 2-core CI machine, t-SNE's
    threads waiting on each other make it tens of times slower (see ``limited_threads``)."""
    with limited_threads(1):
        yield


SIZE = 32  # colour dataset and its models
PER_CLASS = 3


def _save_model(path: Path, arch: str, size: int, grayscale: bool, label_names=FER7_LABELS) -> Path:
    """A freshly initialised model saved with the description ``timm-acsi train`` writes."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=len(label_names))
    meta = dict(
        architecture=arch,
        num_classes=len(label_names),
        label_names=list(label_names),
        model_args={},
        input_size=[3, size, size],
        crop_pct=1.0,
        grayscale=grayscale,
        dataset="synthetic",
    )
    return save_checkpoint(path, model.state_dict(), meta)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Colour classes (folder layout, test split), grayscale FER-2013 folders, and three checkpoints."""
    tmp = tmp_path_factory.mktemp("embed")
    return SimpleNamespace(
        tmp=tmp,
        colour=make_folder_dataset(tmp / "colour", per_class=PER_CLASS, size=SIZE, splits=("test",)),
        fer=make_fer2013_folders(tmp / "fer2013", {"Training": 1, "PublicTest": 1, "PrivateTest": 2}),
        resnet=_save_model(tmp / "resnet18.safetensors", "resnet18", SIZE, grayscale=False),
        coresnet=_save_model(tmp / "coresnet18.safetensors", "coresnet18", SIZE, grayscale=False),
        gray=_save_model(tmp / "gray.safetensors", "resnet18", 48, grayscale=True),
    )


def _reference_pixels(path: Path, grayscale: bool) -> torch.Tensor:
    """The model input of one image, written out by hand: no resize (images are the input size), [0, 1], mean/std."""
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L" if grayscale else "RGB"), dtype=np.float64) / 255
    if grayscale:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    pixels = (pixels - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    return torch.from_numpy(pixels.transpose(2, 0, 1)).float()


# ------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("size, crop_pct", [(48, 1.0), (64, 0.875)])
@pytest.mark.parametrize("grayscale", [False, True])
def test_eval_transform_equals_timms_on_square_faces(size, crop_pct, grayscale):
    config = dict(
        input_size=(3, size, size),
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        crop_pct=crop_pct,
        crop_mode="center",
    )
    loaded = SimpleNamespace(data_config=config, grayscale=grayscale, source="m")
    rgb = Image.fromarray(np.random.RandomState(0).randint(0, 256, (80, 80, 3), dtype=np.uint8))
    timm_input = rgb.convert("L").convert("RGB") if grayscale else rgb
    expected = timm.data.create_transform(**config, is_training=False)(timm_input)
    assert torch.equal(eval_transform(loaded)(rgb), expected)


def test_eval_transform_refuses_other_interpolations():
    config = dict(input_size=(3, 48, 48), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    with pytest.raises(ValueError, match="bicubic"):
        eval_transform(SimpleNamespace(data_config=config, grayscale=False, source="m"))


# ------------------------------------------------------------------------------------------------ features


@pytest.mark.parametrize("case", ["colour", "fer2013_gray"])
def test_features_equal_an_independent_forward(files, case):
    checkpoint, root, grayscale = (
        (files.resnet, files.colour, False) if case == "colour" else (files.gray, files.fer, True)
    )
    loaded = load_model(str(checkpoint))
    dataset = build_dataset(root, "test", "auto", 7)
    dataset.transform = eval_transform(loaded)
    calls = []
    features, labels = extract_features(loaded.model, dataset, batch_size=4, progress=calls.append)

    assert labels.tolist() == dataset.targets
    assert calls == [4] * (len(dataset) // 4) + ([len(dataset) % 4] if len(dataset) % 4 else [])
    if case == "fer2013_gray":  # the test split is PrivateTest only, labelled by folder name
        assert len(dataset) == 14 and all(path.name.startswith("PrivateTest_") for path, _ in dataset.samples)
        assert labels.tolist() == [FER7_LABELS.index(FOLDER_CLASSES[path.parent.name]) for path, _ in dataset.samples]
    x = torch.stack([_reference_pixels(path, grayscale) for path, _ in dataset.samples])
    with torch.no_grad():
        expected = loaded.model.forward_features(x).mean(dim=(2, 3))  # global average pool, by hand
    assert features.shape == (len(dataset), 512)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- sampling and scores


def test_stratified_indices_keep_class_proportions():
    targets = [0] * 10 + [1] * 30 + [2] * 60
    chosen = stratified_indices(targets, 10, seed=0)
    assert [sum(targets[i] == c for i in chosen) for c in range(3)] == [1, 3, 6]
    assert chosen == sorted(set(chosen)) and chosen == stratified_indices(targets, 10, seed=0)
    assert chosen != stratified_indices(targets, 10, seed=1)
    # shares 2/3 and 4/3: floors 0 and 1, the larger remainder (class 0) gets the last sample
    assert stratified_indices([0, 1, 1], 2) in ([0, 1], [0, 2])
    assert stratified_indices(targets, None) == list(range(100))
    assert stratified_indices(targets, 500) == list(range(100))


def test_silhouette_equals_a_hand_computation():
    # two 2-point classes 3 apart: every point has a = 1 and b = (3 + sqrt(10)) / 2, so s = 1 - a / b
    points = np.array([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
    assert silhouette(points, np.array([0, 0, 1, 1])) == pytest.approx(1 - 2 / (3 + math.sqrt(10)), abs=1e-12)
    # classes across the gap: a = 3 and b = (1 + sqrt(10)) / 2 < a for every point, so s = b / a - 1 < 0
    assert silhouette(points, np.array([0, 1, 0, 1])) == pytest.approx((1 + math.sqrt(10)) / 6 - 1, abs=1e-12)
    with pytest.raises(ValueError, match="2 to n-1 classes"):
        silhouette(points, np.zeros(4, dtype=int))


def test_tsne_is_seeded_and_separates_distant_clusters():
    rng = np.random.RandomState(0)
    centres = np.eye(3, 16) * 50
    features = np.concatenate([c + rng.randn(8, 16) for c in centres]).astype(np.float32)
    labels = np.repeat(np.arange(3), 8)
    points = tsne_2d(features, perplexity=5, seed=0)
    assert points.shape == (24, 2)
    np.testing.assert_array_equal(points, tsne_2d(features, perplexity=5, seed=0))
    assert silhouette(features, labels) > 0.9
    assert silhouette(points, labels) > 0.9
    with pytest.raises(ValueError, match="perplexity 30 must be above 0 and below the number of samples \\(24\\)"):
        tsne_2d(features, perplexity=30, seed=0)


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError) as info:
        require_sklearn()
    assert str(info.value) == (
        'Computing t-SNE maps and silhouettes needs sklearn, which is not installed: pip install "timm-acsi[embed]"'
    )
    with pytest.raises(MissingExtraError, match="timm-acsi\\[embed\\]"), limited_threads(1):
        pass  # not threadpoolctl's ModuleNotFoundError


def test_limited_threads_restores_torch_threads():
    before = torch.get_num_threads()  # 1, from the module fixture
    with limited_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before == 1


def test_a_damaged_record_is_refused():
    record = Embedding("m", "src", np.arange(3), np.zeros((3, 2)), 512, 0.1, 0.2).to_dict()
    assert Embedding.from_dict(record).points.shape == (3, 2)
    record["labels"] = record["labels"][:2]
    with pytest.raises(ValueError, match="m: 2 labels but 3 points"):
        Embedding.from_dict(record)


# -------------------------------------------------------------------------------------------------- figure


def _colour_pixels(img: Image.Image, box, colour) -> int:
    pixels = np.asarray(img.crop(box))
    return int((pixels == np.array(colour, dtype=np.uint8)).all(axis=2).sum())


def test_figure_has_one_panel_per_model_and_a_legend():
    labels = np.array([0, 1, 2, 3, 4, 5, 6] * 2)
    points = np.random.RandomState(0).randn(14, 2)
    embeddings = [Embedding(f"m{k}", "src", labels, points * (k + 1), 512, 0.1, 0.2) for k in range(2)]
    img = plot_embeddings(embeddings, FER7_LABELS, panel_size=200)
    assert img.size == (2 * 200 + LEGEND_WIDTH, PANEL_TITLE_HEIGHT + 200) == (540, 244)
    for k in range(2):
        box = (k * 200, PANEL_TITLE_HEIGHT, (k + 1) * 200, PANEL_TITLE_HEIGHT + 200)
        for name in FER7_LABELS:
            assert _colour_pixels(img, box, CLASS_COLOURS[name]) > 0, (k, name)
    legend = (400, PANEL_TITLE_HEIGHT, 540, 244)
    assert all(_colour_pixels(img, legend, CLASS_COLOURS[name]) >= 14 * 14 for name in FER7_LABELS)
    assert plot_embeddings(embeddings[:1], FER7_LABELS, title="t", panel_size=200).size == (340, 32 + 244)
    with pytest.raises(ValueError, match="labels beyond"):
        plot_embeddings(embeddings, FER7_LABELS[:5], panel_size=200)


def test_embed_model_runs_every_step(files):
    loaded = load_model(str(files.coresnet))
    dataset = build_dataset(files.colour, "test", "auto", 7)
    indices = stratified_indices(dataset.targets, 14, seed=0)
    embedding = embed_model(loaded, dataset, indices, perplexity=4, seed=0, batch_size=8)
    assert embedding.name == "coresnet18" and embedding.feature_dim == 512
    assert embedding.labels.tolist() == [dataset.targets[i] for i in indices]
    assert np.bincount(embedding.labels).tolist() == [2] * 7
    assert embedding.silhouette_features == pytest.approx(silhouette(embedding.features, embedding.labels))
    assert embedding.silhouette_2d == pytest.approx(silhouette(embedding.points, embedding.labels))
    assert dataset.transform is None  # the caller's dataset is left as it was
    # the features are the model's on the chosen faces with its own preprocessing; the map, t-SNE with the settings
    faces = torch.stack([eval_transform(loaded)(Image.open(dataset.samples[i][0]).convert("RGB")) for i in indices])
    with torch.inference_mode():
        expected = loaded.model.forward_head(loaded.model.forward_features(faces), pre_logits=True)
    np.testing.assert_allclose(embedding.features, expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(embedding.points, tsne_2d(embedding.features, perplexity=4, seed=0))


# ----------------------------------------------------------------------------------------------------- CLI


def _embed(files, *extra):
    return run_command(
        "embed",
        ["--model", str(files.resnet), str(files.coresnet), "--data", str(files.colour), "--perplexity", "4"]
        + ["--workers", "0", "--batch-size", "16", "--quiet", *extra],
    )


def test_cli_writes_the_figure_and_json_and_refuses_to_overwrite(files, capsys):
    out, record = files.tmp / "fig.png", files.tmp / "fig.json"
    assert _embed(files, "--out", str(out), "--json", str(record), "--max-samples", "14") == 0
    printed = capsys.readouterr().out
    assert "resnet18" in printed and "coresnet18" in printed and f"wrote {out} and {record}" in printed

    with Image.open(out) as img:
        assert img.size == (2 * 480 + LEGEND_WIDTH, 32 + PANEL_TITLE_HEIGHT + 480)
    data = json.loads(record.read_text())
    assert data["label_names"] == list(FER7_LABELS) and data["samples"] == 14
    assert [m["name"] for m in data["models"]] == ["resnet18", "coresnet18"]
    for model in data["models"]:
        redrawn = Embedding.from_dict(model)
        assert np.bincount(redrawn.labels).tolist() == [2] * 7
        assert redrawn.points.shape == (14, 2)
        assert model["silhouette_2d"] == pytest.approx(silhouette(redrawn.points, redrawn.labels), abs=1e-3)
    assert data["models"][0]["labels"] == data["models"][1]["labels"]  # both models saw the same images

    before = (out.read_bytes(), record.read_text())
    assert _embed(files, "--out", str(out), "--json", str(record), "--max-samples", "14") == 2
    assert "already exist" in capsys.readouterr().err
    assert (out.read_bytes(), record.read_text()) == before
    record.unlink()
    assert _embed(files, "--out", str(out), "--json", str(record), "--max-samples", "8", "--overwrite") == 0
    assert json.loads(record.read_text())["samples"] == 8


def test_cli_refuses_bad_input_before_computing(files, capsys):
    out = files.tmp / "refused.png"
    other_labels = FER7_LABELS[:6] + ("contempt",)  # trained on another label set: its points would not compare
    other = _save_model(files.tmp / "other.safetensors", "resnet18", SIZE, False, other_labels)
    cases = [
        (
            ["--out", str(out), "--perplexity", "30"],
            "perplexity 30.0 must be above 0 and below the number of samples (21)",
        ),
        (["--out", str(out), "--model", str(other)], "only the dataset has neutral; only the model has contempt"),
        (["--out", str(files.tmp / "fig.txt")], "no image suffix"),
        (["--out", str(files.tmp / "fig.psd")], "no image suffix Pillow writes"),  # Pillow reads .psd, never writes it
        (["--out", str(out), "--max-samples", "7"], "got 7 class(es) in 7 samples"),
    ]
    for args, message in cases:
        assert _embed(files, *args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("timm-acsi embed: error: ") and message in err and "\n" not in err
    assert not out.exists()
