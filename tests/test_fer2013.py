"""FER-2013 in both releases (Kaggle folders, fer2013.csv), grayscale transforms, and reader defects
(case-duplicate folders, 16-bit images), on tiny generated data."""

import numpy as np
import pytest
import torch
from fer_fixtures import CLASS_GRAYS, make_fer2013_csv, make_fer2013_folders, make_folder_dataset
from PIL import Image

from timm_acsi.data import build_dataset, create_fer_transform, detect_layout
from timm_acsi.labels import FER7_LABELS

PER_CLASS = {"Training": 3, "PublicTest": 2, "PrivateTest": 1}


def _gray_matches_label(dataset) -> None:
    """Every face is gray (R = G = B) at the level the fixture gave its canonical class."""
    for i in range(len(dataset)):
        img, target = dataset[i]
        pixels = np.asarray(img, dtype=np.float64)
        assert img.mode == "RGB" and (pixels[..., 0] == pixels[..., 2]).all()
        assert abs(pixels.mean() - CLASS_GRAYS[dataset.label_names[target]]) < 3


@pytest.mark.parametrize("release", ["folders", "csv"])
def test_fer2013_standard_protocol(tmp_path, release):
    """train = Training, val = PublicTest, test = PrivateTest, in both releases, labels by name."""
    make = make_fer2013_folders if release == "folders" else make_fer2013_csv
    root = make(tmp_path / "fer2013", PER_CLASS)
    assert detect_layout(root) == "fer2013"
    for split, usage in (("train", "Training"), ("val", "PublicTest"), ("test", "PrivateTest")):
        ds = build_dataset(root, split)
        assert ds.label_names == FER7_LABELS
        assert ds.class_counts() == [PER_CLASS[usage]] * 7, (split, ds.class_counts())
        assert ds.name == f"fer2013:fer2013:{split}"
        _gray_matches_label(ds)
        if release == "folders":
            assert {p.name.split("_")[0] for p, _ in ds.samples} == {usage}
            assert {p.parent.name: t for p, t in ds.samples} == {
                "angry": 0,
                "disgust": 1,
                "fear": 2,
                "happy": 3,
                "sad": 4,
                "surprise": 5,
                "neutral": 6,
            }


def test_fer2013_folders_not_read_as_plain_class_folders(tmp_path):
    """A plain class-folder reading would mix PublicTest and PrivateTest in test/; asked for, it still does."""
    root = make_fer2013_folders(tmp_path / "fer", PER_CLASS)
    assert len(build_dataset(root, "test", layout="folder")) == 7 * 3
    assert len(build_dataset(root, "test")) == 7 * 1


def test_fer2013_folder_images_without_a_split_prefix_are_refused(tmp_path):
    """An image that names no split would be silently left out of every split: the reader refuses the folder."""
    root = make_fer2013_folders(tmp_path / "fer", PER_CLASS)
    Image.new("L", (48, 48)).save(root / "train" / "happy" / "my_face.png")
    for split in ("train", "val", "test"):
        with pytest.raises(
            ValueError,
            match=r"file-name prefix \(Training_, PublicTest_, PrivateTest_\) .* but "
            r"train/happy/my_face.png has none",
        ):
            build_dataset(root, split)


def test_fer2013_csv_with_a_byte_order_mark(tmp_path):
    """A fer2013.csv saved by Excel starts with a UTF-8 BOM; its header still reads as emotion,pixels,Usage."""
    root = make_fer2013_csv(tmp_path / "fer", PER_CLASS)
    csv_file = root / "fer2013.csv"
    csv_file.write_bytes(b"\xef\xbb\xbf" + csv_file.read_bytes())
    assert build_dataset(root, "val").class_counts() == [PER_CLASS["PublicTest"]] * 7


def test_fer2013_csv_and_folders_hold_the_same_faces(tmp_path):
    """The two releases of the same faces give the same class counts and the same gray levels per class."""
    csv = build_dataset(make_fer2013_csv(tmp_path / "csv", PER_CLASS), "val")
    folders = build_dataset(make_fer2013_folders(tmp_path / "folders", PER_CLASS), "val")
    assert csv.class_counts() == folders.class_counts()
    means = [
        sorted(np.asarray(ds[i][0]).mean().round() for i in range(len(ds)) if ds.targets[i] == c)
        for ds in (csv, folders)
        for c in (0, 6)
    ]
    assert all(abs(a - b) < 6 for a, b in zip(means[0] + means[1], means[2] + means[3]))


@pytest.mark.parametrize(
    "row, message",
    [
        ("3,1 2 3,Training", r"fer2013.csv:44: expected 2304 pixels \(48x48\), got 3"),
        ("3," + " ".join(["1"] * 2303) + " x,Training", r"fer2013.csv:44: pixels must be space-separated integers"),
        ("3," + " ".join(["300"] * 2304) + ",Training", r"fer2013.csv:44: pixel values must lie in 0-255, got 300"),
        ("3," + " ".join(["1"] * 2304) + ",Validation", r"fer2013.csv:44: unknown Usage 'Validation'; expected one of"),
        ("7," + " ".join(["1"] * 2304) + ",Training", r"fer2013.csv:44: emotion must be an id 0-6"),
        ("happy," + " ".join(["1"] * 2304) + ",Training", r"fer2013.csv:44: emotion must be an id 0-6"),
        ("3", r"fer2013.csv:44: unknown Usage None"),
    ],
)
def test_fer2013_csv_malformed_rows(tmp_path, row, message):
    root = make_fer2013_csv(tmp_path, {"Training": 2, "PublicTest": 2, "PrivateTest": 2}, rows=[row])
    with pytest.raises(ValueError, match=message):
        build_dataset(root, "train")


def test_fer2013_csv_wrong_columns_and_empty_split(tmp_path):
    (tmp_path / "fer2013.csv").write_text("label,image\n3,1 2 3\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['emotion', 'pixels', 'Usage'\]"):
        build_dataset(tmp_path, "train")
    root = make_fer2013_csv(tmp_path / "only-train", {"Training": 1, "PublicTest": 0, "PrivateTest": 0})
    with pytest.raises(ValueError, match=r"has no PublicTest rows \(the 'val' split\)"):
        build_dataset(root, "val")


def test_grayscale_transform_feeds_gray_replicated(tmp_path):
    """A colour face becomes luminance x 3 channels, in training and evaluation transforms alike."""
    rgb = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 48, 3), dtype=np.uint8))
    expected = torch.from_numpy(np.asarray(rgb.convert("L"), dtype=np.float32) / 255)
    for is_training, crops in ((False, "five_flip"), (True, "random")):
        tf = create_fer_transform(
            is_training, img_size=48, resize=48, mean=(0, 0, 0), std=(1, 1, 1), train_crops=crops, grayscale=True
        )
        x = tf(rgb)
        assert x.shape == (3, 48, 48) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
        if not is_training:
            assert torch.allclose(x[0], expected, atol=1e-6)


def test_case_duplicate_class_folders_refused(tmp_path):
    """train/Angry/ beside train/angry/ used to drop one folder silently."""
    root = make_folder_dataset(tmp_path, per_class=1, classes=["angry", "happy"])
    make_folder_dataset(tmp_path, per_class=1, classes=["Angry"])
    with pytest.raises(ValueError, match=r"Folders .*/train/Angry and .*/train/angry differ only in case"):
        build_dataset(root, "train")


def test_case_duplicate_split_folders_refused(tmp_path):
    make_folder_dataset(tmp_path, per_class=1, classes=["happy"], splits=("train", "Train"))
    with pytest.raises(
        ValueError, match=r"Folders .*/Train and .*/train differ only in case, so they mean the same; merge them"
    ):
        build_dataset(tmp_path, "train")


def test_16_bit_images_rescaled_not_clipped(tmp_path):
    """16-bit grayscale PNGs keep their contrast (PIL's convert('RGB') clips everything above 255 to white)."""
    make_folder_dataset(tmp_path, per_class=0, classes=["happy"])
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "train" / "happy" / "deep.png")
    with Image.open(tmp_path / "train" / "happy" / "deep.png") as img:
        assert img.mode.startswith("I")  # PIL reads it as 16/32-bit integer
    img, _ = build_dataset(tmp_path, "train")[0]
    assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 128, 255]
