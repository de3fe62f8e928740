"""Dataset readers (folder, RAF-DB, AffectNet) and the paper's transforms, on tiny generated datasets."""

import logging
import pickle

import numpy as np
import pytest
import torch
from fer_fixtures import (
    CLASS_COLOURS,
    make_affectnet_dataset,
    make_folder_dataset,
    make_rafdb_dataset,
)
from PIL import Image

from timm_acsi.data import LAYOUTS, FERDataset, UnreadableImageError, build_dataset, create_fer_transform, detect_layout
from timm_acsi.labels import FER7_LABELS, FER8_LABELS


def _colour_matches_label(dataset: FERDataset) -> None:
    """Every image's mean colour is the colour the fixture gave its canonical class."""
    for i in range(len(dataset)):
        img, target = dataset[i]
        mean = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)
        expected = np.array(CLASS_COLOURS[dataset.label_names[target]])
        assert np.abs(mean - expected).max() < 6, (dataset.samples[i], dataset.label_names[target], mean)


# ---------------------------------------------------------------------------------------------------- folder


def test_folder_maps_spellings_by_name(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=2, classes=["Angry", "Happiness", "Surprised", "normal", "sad"])
    ds = build_dataset(root, "train", layout="folder")
    assert ds.label_names == FER7_LABELS
    assert ds.class_counts() == [2, 0, 0, 2, 2, 2, 2]
    assert len(ds) == 10 and ds.skipped == 0
    assert ds.targets == [t for _, t in ds.samples]
    assert {p.parent.name: t for p, t in ds.samples} == {
        "Angry": 0,
        "Happiness": 3,
        "sad": 4,
        "Surprised": 5,
        "normal": 6,
    }
    img, target = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    _colour_matches_label(ds)


def test_folder_val_aliases_and_subfolders(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=1, classes=["happy"], splits=("train", "Validation", "test"))
    (root / "Validation" / "happy" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(root / "Validation" / "happy" / "more" / "x.jpg")
    (root / "Validation" / "happy" / "notes.txt").write_text("not an image")
    (root / "Validation" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    assert len(build_dataset(root, "val")) == 2
    assert len(build_dataset(root, "test")) == 1


def test_folder_contempt_dropped_for_fer7_kept_for_fer8(tmp_path, caplog):
    root = make_folder_dataset(tmp_path, per_class=3, classes=["happy", "contempt"])
    with caplog.at_level(logging.INFO, logger="timm_acsi.data"):
        ds7 = build_dataset(root, "train")
    assert ds7.class_counts() == [0, 0, 0, 3, 0, 0, 0]
    assert "dropped 3 image(s)" in caplog.text and "'contempt'" in caplog.text and "num_classes=8" in caplog.text
    ds8 = build_dataset(root, "train", num_classes=8)
    assert ds8.label_names == FER8_LABELS
    assert ds8.class_counts() == [0, 0, 0, 3, 0, 0, 0, 3]
    _colour_matches_label(ds8)


def test_folder_unknown_class(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=1, classes=["happy", "bored"])
    with pytest.raises(ValueError, match=r"Class folder .*bored.*Accepted spellings: .*angry"):
        build_dataset(root, "train")


def test_folder_duplicate_class(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=1, classes=["angry", "anger"])
    with pytest.raises(ValueError, match=r"both mean 'anger'; merge them"):
        build_dataset(root, "train")


def test_folder_missing_split_lists_contents(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=1, classes=["happy"], splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"No 'val' split folder .*val/, valid/, validation/.*holds: train/"):
        build_dataset(root, "val")


def test_folder_two_val_folders(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=1, classes=["happy"], splits=("val", "valid"))
    with pytest.raises(ValueError, match="Several 'val' split folders"):
        build_dataset(root, "val")


def test_empty_split_names_split_and_root(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=0, classes=["happy", "sad"])
    with pytest.raises(ValueError, match=rf"'train' split of {tmp_path} .* has no images"):
        build_dataset(root, "train")
    root8 = make_folder_dataset(tmp_path / "c", per_class=2, classes=["contempt"])
    with pytest.raises(ValueError, match="has no images"):  # empty after dropping contempt
        build_dataset(root8, "train")


# ---------------------------------------------------------------------------------------------------- RAF-DB


def test_rafdb_labels_by_name(tmp_path):
    root = make_rafdb_dataset(tmp_path, per_class=2)
    train = build_dataset(root, "train", layout="rafdb")
    assert len(train) == 14 and train.class_counts() == [2] * 7
    # RAF-DB id 1 = surprise -> canonical index 5; id 6 = anger -> 0; id 7 = neutral -> 6.
    assert train.samples[0] == (root / "Image" / "aligned" / "train_00001_aligned.jpg", 5)
    assert train.samples[10][1] == 0 and train.samples[12][1] == 6
    test = build_dataset(root, "test")
    assert len(test) == 14 and all(p.name.startswith("test_") for p, _ in test.samples)
    _colour_matches_label(train)


def test_rafdb_original_images_when_aligned_absent(tmp_path):
    root = make_rafdb_dataset(tmp_path, per_class=1, variants=("original",))
    ds = build_dataset(root, "train")
    assert ds.samples[0] == (root / "Image" / "original" / "train_00001.jpg", 5)
    _colour_matches_label(ds)


def test_rafdb_has_no_val_split(tmp_path):
    root = make_rafdb_dataset(tmp_path, per_class=1)
    with pytest.raises(ValueError, match=r"train and test splits only .* split='test'"):
        build_dataset(root, "val")


def test_rafdb_bad_label_line(tmp_path):
    root = make_rafdb_dataset(tmp_path, per_class=1)
    with open(root / "EmoLabel" / "list_patition_label.txt", "a") as f:
        f.write("train_09999.jpg 8\n")
    with pytest.raises(ValueError, match=r"list_patition_label.txt:15: expected '<image name> <label 1-7>'"):
        build_dataset(root, "train")


def test_rafdb_missing_images(tmp_path):
    root = make_rafdb_dataset(tmp_path, per_class=1)
    (root / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
    with pytest.raises(UnreadableImageError, match=r"1 image\(s\) listed .*train_00002_aligned.jpg.*skip_unreadable"):
        build_dataset(root, "train")
    ds = build_dataset(root, "train", skip_unreadable=True)
    assert len(ds) == 6 and ds.skipped == 1
    assert ds.class_counts() == [1, 1, 0, 1, 1, 1, 1]  # id 2 (fear) was the missing one


def test_wrong_layout_explicit(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=1, classes=["happy"])
    with pytest.raises(FileNotFoundError, match=r"RAF-DB label file .*list_patition_label.txt not found"):
        build_dataset(root, "train", layout="rafdb")
    with pytest.raises(ValueError, match="Unknown dataset layout 'raf'; use one of folder, fer2013, rafdb, affectnet"):
        build_dataset(root, "train", layout="raf")
    with pytest.raises(ValueError, match="Unknown split 'valid'"):
        build_dataset(root, "valid")
    with pytest.raises(ValueError, match="FER-7 has 7"):
        build_dataset(root, "train", num_classes=6)


# ---------------------------------------------------------------------------------------------------- AffectNet


@pytest.mark.parametrize("form", ["npy", "csv"])
def test_affectnet_labels_by_name(tmp_path, form, caplog):
    root = make_affectnet_dataset(tmp_path, per_class=2, form=form)
    with caplog.at_level(logging.INFO, logger="timm_acsi.data"):
        ds = build_dataset(root, "train", layout="affectnet")
    # ids 8-10 always dropped, 7 (contempt) dropped for FER-7; ids 0-6 kept, 2 each.
    assert len(ds) == 14 and ds.class_counts() == [2] * 7
    assert "dropped 8 image(s)" in caplog.text and "2 'no-face', 2 'none', 2 'uncertain'" in caplog.text
    # AffectNet id 0 = neutral -> index 6, id 1 = happy -> 3, id 6 = anger -> 0 (samples follow the file order).
    assert [t for _, t in ds.samples[::2]] == [6, 3, 4, 5, 2, 1, 0]
    _colour_matches_label(ds)  # for the CSV form this also checks the face box is cropped (frame is black)
    assert ds[0][0].size == (32, 32)

    ds8 = build_dataset(root, "train", num_classes=8)
    assert ds8.class_counts() == [2] * 8 and ds8.label_names[ds8.targets[-1]] == "contempt"
    val, test = build_dataset(root, "val"), build_dataset(root, "test")
    assert val.samples == test.samples and len(val) == 14
    assert all(("val" in str(p)) for p, _ in val.samples)


def test_affectnet_csv_alternative_image_dir(tmp_path):
    root = make_affectnet_dataset(tmp_path, per_class=1, form="csv", ids=[1], csv_dir=".")
    assert detect_layout(root) == "affectnet"
    (root / "Manually_Annotated").mkdir()
    (root / "Manually_Annotated_Images").rename(root / "Manually_Annotated" / "Manually_Annotated_Images")
    ds = build_dataset(root, "train")
    assert ds.class_counts() == [0, 0, 0, 1, 0, 0, 0]
    (root / "Manually_Annotated").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="AffectNet image folder not found: looked for"):
        build_dataset(root, "train")


def test_affectnet_csv_missing_column(tmp_path):
    root = make_affectnet_dataset(tmp_path, per_class=1, form="csv", ids=[1])
    (root / "Manually_Annotated_file_lists" / "training.csv").write_text(
        "subDirectory_filePath,face_x,face_y,face_width,face_height,valence\n"
    )
    with pytest.raises(ValueError, match=r"training.csv lacks column\(s\) \['expression'\]"):
        build_dataset(root, "train")


def test_affectnet_unknown_id(tmp_path):
    root = make_affectnet_dataset(tmp_path, per_class=1, ids=[1])
    np.save(root / "train_set" / "annotations" / "1_exp.npy", np.array("12"))
    with pytest.raises(ValueError, match=r"1_exp.npy: AffectNet expression id 12 is not one of 0-10"):
        build_dataset(root, "train")


def test_affectnet_missing_split(tmp_path):
    root = make_affectnet_dataset(tmp_path, per_class=1, ids=[1])
    for f in (root / "val_set").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in ("annotations", "images"):
        (root / "val_set" / d).rmdir()
    (root / "val_set").rmdir()
    with pytest.raises(FileNotFoundError, match=r"No AffectNet 'test' split .*val_set/ .*validation.csv"):
        build_dataset(root, "test")


# ---------------------------------------------------------------------------------------------------- layouts


def test_detect_layout(tmp_path):
    assert LAYOUTS == ("folder", "fer2013", "rafdb", "affectnet")
    assert detect_layout(make_folder_dataset(tmp_path / "f", per_class=1, classes=["sad"])) == "folder"
    assert detect_layout(make_rafdb_dataset(tmp_path / "r", per_class=1)) == "rafdb"
    assert detect_layout(make_affectnet_dataset(tmp_path / "a", per_class=1, ids=[0])) == "affectnet"
    assert detect_layout(make_affectnet_dataset(tmp_path / "c", per_class=1, ids=[0], form="csv")) == "affectnet"
    (tmp_path / "e" / "photos").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"Cannot detect .*holds: photos/.*'folder': .*'rafdb': .*'affectnet': "):
        detect_layout(tmp_path / "e")
    with pytest.raises(ValueError, match="Cannot detect"):
        build_dataset(tmp_path / "e", "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")
    (tmp_path / "r" / "train").mkdir()
    with pytest.raises(ValueError, match=r"matches several layouts \(rafdb, folder\); pass layout="):
        detect_layout(tmp_path / "r")
    assert len(build_dataset(tmp_path / "r", "train", layout="rafdb")) == 7


# ---------------------------------------------------------------------------------------------------- unreadable


def _add_bad_images(class_dir):
    (class_dir / "text.jpg").write_text("this is not an image")
    good = class_dir / "000.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(class_dir / "full.jpg")
    data = (class_dir / "full.jpg").read_bytes()
    (class_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (class_dir / "full.jpg").unlink()
    return good


def test_unreadable_images_raise_with_path_by_default(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=2, classes=["happy"], splits=("train",))
    _add_bad_images(root / "train" / "happy")
    ds = build_dataset(root, "train")  # no up-front scan by default
    assert len(ds) == 4 and ds.skipped == 0
    names = [p.name for p, _ in ds.samples]
    for bad in ("text.jpg", "truncated.jpg"):
        with pytest.raises(UnreadableImageError, match=rf"Cannot read image .*{bad}: .*skip_unreadable=True"):
            ds[names.index(bad)]


def test_skip_unreadable_counts(tmp_path, caplog):
    root = make_folder_dataset(tmp_path, per_class=2, classes=["happy", "sad"], splits=("train",))
    _add_bad_images(root / "train" / "happy")
    ds = build_dataset(root, "train", skip_unreadable=True)
    assert "skipped 2 unreadable or missing image(s), e.g." in caplog.text and "text.jpg" in caplog.text
    assert ds.skipped == 2 and len(ds) == 4 and ds.class_counts() == [0, 0, 0, 2, 2, 0, 0]
    _colour_matches_label(ds)


def test_grayscale_becomes_rgb_and_transform_applies(tmp_path):
    root = make_folder_dataset(tmp_path, per_class=0, classes=["fear"], splits=("test",))
    Image.new("L", (40, 30), 200).save(root / "test" / "fear" / "g.png")
    ds = build_dataset(root, "test", transform=create_fer_transform(False, img_size=24, resize=28))
    x, y = ds[0]
    assert y == 2 and x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert torch.allclose(
        x[:, 0, 0], (200 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    )
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers may pickle the dataset
    assert clone.samples == ds.samples and torch.equal(clone[0][0], x)


# ---------------------------------------------------------------------------------------------------- transforms


def _position_image(size: int) -> Image.Image:
    """R = x, G = y, so a crop's pixels say where in the image they came from."""
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def _crop_origin(t: torch.Tensor):
    """(x0, y0, flipped) of a crop of :func:`_position_image` (mean 0 / std 1 transform output)."""
    px = (t * 255).round().long()
    x, y = px[0], px[1]
    flipped = bool(x[0, 0] > x[0, -1])
    return int(x.min()), int(y.min()), flipped


def test_five_flip_yields_exactly_the_ten_crops():
    tf = create_fer_transform(True, img_size=32, resize=40, mean=(0, 0, 0), std=(1, 1, 1))
    img = _position_image(40)  # already resize x resize, so Resize is the identity
    torch.manual_seed(0)
    seen = []
    for _ in range(200):
        out = tf(img)
        assert out.shape == (3, 32, 32)
        x0, y0, flipped = _crop_origin(out)
        expected = torch.arange(x0, x0 + 32).float() / 255
        assert torch.allclose(out[0, 0], expected.flip(0) if flipped else expected)  # a whole, contiguous crop
        seen.append((x0, y0, flipped))
    corners = {(0, 0), (8, 0), (0, 8), (8, 8), (4, 4)}
    assert set(seen) == {(x, y, f) for x, y in corners for f in (False, True)}
    assert min(seen.count(c) for c in set(seen)) >= 8  # roughly uniform: 20 expected each
    torch.manual_seed(0)
    assert [_crop_origin(tf(img)) for _ in range(5)] == seen[:5]  # seeded by torch's RNG
    clone = pickle.loads(pickle.dumps(tf))  # DataLoader workers pickle transforms (spawn start method)
    torch.manual_seed(0)
    assert [_crop_origin(clone(img)) for _ in range(5)] == seen[:5]


def test_eval_transform_is_centre_crop_of_squashed_image():
    tf = create_fer_transform(False, mean=(0, 0, 0), std=(1, 1, 1))
    out = tf(_position_image(256))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert _crop_origin(out) == (16, 16, False)
    # non-square input is squashed to 256x256, not cropped on the long side: on a 512x128 image with R = x / 2 and
    # G = 2y, the centre crop of the squashed image runs from 16 to 239 in both (a short-side resize would show
    # R from 100 to 155)
    y, x = np.mgrid[0:128, 0:512]
    wide = Image.fromarray(np.stack([x // 2, 2 * y, np.zeros_like(x)], -1).astype(np.uint8))
    px = tf(wide) * 255
    assert px.shape == (3, 224, 224)
    edges = [px[0, 112, 0], px[0, 112, -1], px[1, 0, 112], px[1, -1, 112]]  # R left/right, G top/bottom
    assert [v.item() for v in edges] == pytest.approx([16, 239, 16, 239], abs=0.5)
    for _ in range(3):
        assert torch.equal(tf(_position_image(256)), out)  # deterministic


def test_random_crop_mode_uses_timm_and_errors():
    tf = create_fer_transform(True, img_size=64, train_crops="random")
    assert type(tf.transforms[0]).__name__ == "RandomResizedCropAndInterpolation"
    assert tf(Image.new("RGB", (80, 80))).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="Unknown train_crops 'ten'; use one of five_flip, random"):
        create_fer_transform(True, train_crops="ten")
    with pytest.raises(ValueError, match="resize=200 is smaller than img_size=224"):
        create_fer_transform(False, resize=200)
