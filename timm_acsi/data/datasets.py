"""Facial-expression dataset readers: class folders, FER-2013, RAF-DB basic and AffectNet, as they are distributed.

Every reader maps the dataset's own labels to the canonical order (:data:`~timm_acsi.labels.FER7_LABELS`, or
:data:`~timm_acsi.labels.FER8_LABELS` with contempt) by class *name*: RAF-DB and AffectNet ids go through the
id -> name tables below, folder names through :func:`~timm_acsi.labels.canonical_label`. No reader does index
arithmetic on a dataset's ids.
"""

import csv
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch.utils.data
from PIL import Image

from ..imaging import to_rgb_image
from ..labels import canonical_label, label_names_for

_logger = logging.getLogger(__name__)

#: Dataset layouts :func:`build_dataset` reads (``layout="auto"`` picks one with :func:`detect_layout`).
LAYOUTS: Tuple[str, ...] = ("folder", "fer2013", "rafdb", "affectnet")

SPLITS: Tuple[str, ...] = ("train", "val", "test")

#: Image file suffixes a class folder may hold (PIL reads them all; timm's own list stops at jpg/jpeg/png).
IMG_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: Folder-layout split directory names (matched case-insensitively).
FOLDER_SPLIT_DIRS: Dict[str, Tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "valid", "validation"),
    "test": ("test",),
}

#: FER-2013 ``emotion`` ids (the Kaggle challenge's description).
FER2013_LABELS: Dict[int, str] = {
    0: "angry",
    1: "disgust",
    2: "fear",
    3: "happy",
    4: "sad",
    5: "surprise",
    6: "neutral",
}
#: The standard FER-2013 protocol: each split is one ``Usage`` value of the CSV release, which the Kaggle
#: folder release keeps as the image file-name prefix (``train/`` holds Training, ``test/`` both test sets).
FER2013_USAGE: Dict[str, str] = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
FER2013_CSV = "fer2013.csv"
FER2013_SIZE = 48

#: RAF-DB basic ``EmoLabel/list_patition_label.txt`` ids (RAF-DB README).
RAFDB_LABELS: Dict[int, str] = {
    1: "surprise",
    2: "fear",
    3: "disgust",
    4: "happiness",
    5: "sadness",
    6: "anger",
    7: "neutral",
}
RAFDB_LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"  # sic: the file's name as distributed

#: AffectNet expression ids (AffectNet README).
AFFECTNET_LABELS: Dict[int, str] = {
    0: "neutral",
    1: "happy",
    2: "sad",
    3: "surprise",
    4: "fear",
    5: "disgust",
    6: "anger",
    7: "contempt",
}
#: AffectNet ids that are not expressions; their images are always dropped.
AFFECTNET_NON_EXPRESSIONS: Dict[int, str] = {8: "none", 9: "uncertain", 10: "no-face"}
AFFECTNET_SPLIT_DIRS: Dict[str, str] = {"train": "train_set", "val": "val_set", "test": "val_set"}
AFFECTNET_SPLIT_CSVS: Dict[str, str] = {"train": "training.csv", "val": "validation.csv", "test": "validation.csv"}
#: Where the CSV release's lists may sit, relative to the root (the zip unpacks to ``Manually_Annotated_file_lists``).
AFFECTNET_CSV_DIRS: Tuple[Path, ...] = (Path("."), Path("Manually_Annotated_file_lists"))
#: CSV release columns; ``validation.csv`` ships without this header row, ``training.csv`` with it.
AFFECTNET_CSV_COLUMNS: Tuple[str, ...] = (
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
AFFECTNET_IMAGE_DIRS: Tuple[Path, ...] = (
    Path("Manually_Annotated_Images"),
    Path("Manually_Annotated") / "Manually_Annotated_Images",
)

_LAYOUT_MARKERS: Dict[str, str] = {
    "folder": "a train/, val/ (or valid/, validation/) or test/ directory of class folders",
    "fer2013": f"{FER2013_CSV} (emotion,pixels,Usage), or class folders holding Training_*, PublicTest_* and "
    "PrivateTest_* images (the Kaggle release)",
    "rafdb": f"{RAFDB_LABEL_FILE.as_posix()} (RAF-DB basic)",
    "affectnet": "train_set/annotations/ or val_set/annotations/ (per-image .npy), or training.csv / validation.csv "
    "(in the root or in Manually_Annotated_file_lists/)",
}

Box = Tuple[int, int, int, int]  # left, upper, right, lower (PIL crop box)


class UnreadableImageError(OSError):
    """An image file is missing, corrupt, truncated or not an image."""


def _unreadable_message(path: Path, err: Any) -> str:
    return (
        f"Cannot read image {path}: {err}. Fix or remove the file, or pass skip_unreadable=True "
        "(--skip-unreadable on the command line) to skip unreadable images."
    )


def _load_rgb(path: Path, box: Optional[Box] = None) -> Image.Image:
    """Open ``path`` fully decoded as RGB, cropped to ``box`` if given; PIL errors name the file."""
    try:
        with Image.open(path) as img:
            img = to_rgb_image(img)  # decodes the whole image, so truncation fails here, not in a transform
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(_unreadable_message(path, e)) from e
    return img.crop(box) if box is not None else img


def _is_readable(path: Path) -> bool:
    try:
        _load_rgb(path)
    except UnreadableImageError:
        return False
    return True


class FERDataset(torch.utils.data.Dataset):
    """Face images with labels in canonical FER-7 (or FER-8) order.

    Args:
        samples: ``(image path, canonical label index)`` pairs.
        label_names: the canonical names the indices refer to (:data:`FER7_LABELS` or :data:`FER8_LABELS`).
        transform: applied to the RGB PIL image; ``None`` returns the PIL image.
        skip_unreadable: open and decode every image once now and drop those that fail (count in ``skipped``).
            Otherwise nothing is scanned and an unreadable image raises, naming the file, when it is loaded.
        boxes: optional per-sample face box ``(left, upper, right, lower)`` cropped before ``transform``.
        missing: images the annotations list but that do not exist; an error unless ``skip_unreadable``.
        name: ``"<layout>:<root folder name>:<split>"`` from :func:`build_dataset`, for messages and checkpoint meta.
    """

    def __init__(
        self,
        samples: Sequence[Tuple[Path, int]],
        label_names: Sequence[str],
        transform: Optional[Callable] = None,
        skip_unreadable: bool = False,
        boxes: Optional[Sequence[Optional[Box]]] = None,
        missing: Sequence[Path] = (),
        name: str = "",
    ):
        self.label_names: Tuple[str, ...] = tuple(label_names)
        self.transform = transform
        self.name = name
        samples = [(Path(p), int(t)) for p, t in samples]
        boxes = list(boxes) if boxes is not None else [None] * len(samples)
        if len(boxes) != len(samples):
            raise ValueError(f"{len(boxes)} boxes for {len(samples)} samples; pass one box (or None) per sample.")
        for _, t in samples:
            if not 0 <= t < len(self.label_names):
                raise ValueError(f"Label index {t} out of range for label_names {self.label_names}.")
        if missing and not skip_unreadable:
            examples = ", ".join(str(p) for p in list(missing)[:3])
            raise UnreadableImageError(
                f"{len(missing)} image(s) listed in the annotations of {name or 'the dataset'} do not exist "
                f"(e.g. {examples}). Check the dataset root and that the images were extracted, or pass "
                "skip_unreadable=True (--skip-unreadable on the command line) to skip them."
            )
        skipped = list(missing)
        if skip_unreadable:
            keep = self._scan([p for p, _ in samples])
            skipped += [p for (p, _), k in zip(samples, keep) if not k]
            samples = [s for s, k in zip(samples, keep) if k]
            boxes = [b for b, k in zip(boxes, keep) if k]
            if skipped:
                examples = ", ".join(str(p) for p in skipped[:3])
                _logger.warning("%s: skipped %d unreadable or missing image(s), e.g. %s.", name, len(skipped), examples)
        self.skipped: int = len(skipped)
        self.samples: List[Tuple[Path, int]] = samples
        self.targets: List[int] = [t for _, t in samples]
        self.boxes: List[Optional[Box]] = boxes

    @staticmethod
    def _scan(paths: List[Path]) -> List[bool]:
        """Decode every image once (threads: PIL decoding releases the GIL); True where readable."""
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_is_readable, paths))

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        img = _load_rgb(path, self.boxes[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> List[int]:
        """Number of samples per canonical class, in ``label_names`` order."""
        counts = Counter(self.targets)
        return [counts.get(i, 0) for i in range(self.num_classes)]

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}={c}" for n, c in zip(self.label_names, self.class_counts()))
        return f"{type(self).__name__}({self.name!r}, {len(self)} images: {counts}; skipped={self.skipped})"


def _subdirs(path: Path) -> Dict[str, Path]:
    """Visible subdirectories of ``path`` keyed by lower-cased name.

    Raises:
        ValueError: two folders differ only in case (``Angry/`` and ``angry/``): one would be silently lost.
    """
    found: Dict[str, Path] = {}
    for p in sorted(path.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        other = found.setdefault(p.name.lower(), p)
        if other != p:
            raise ValueError(
                f"Folders {other} and {p} differ only in case, so they mean the same; merge them into one folder."
            )
    return found


def _check_root(root: Union[str, Path]) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset root {root} does not exist or is not a directory.")
    return root


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")


def _keep_label(name: str, num_classes: int, dropped: Counter) -> bool:
    """Whether a canonical class name has an output in a ``num_classes`` head; counts what is dropped."""
    if name == "contempt" and num_classes == 7:
        dropped[name] += 1
        return False
    return True


def _log_dropped(dropped: Counter, where: str) -> None:
    """One info line per split listing what was left out and why."""
    if not dropped:
        return
    parts = ", ".join(f"{n} {name!r}" for name, n in sorted(dropped.items()))
    hint = " (contempt has no FER-7 output: use num_classes=8 to keep it)" if "contempt" in dropped else ""
    _logger.info("%s: dropped %d image(s) outside the label set: %s%s.", where, sum(dropped.values()), parts, hint)


def detect_layout(root: Union[str, Path]) -> str:
    """Name the layout of the dataset at ``root`` from the files that identify each one.

    Raises:
        ValueError: no layout (or more than one) matches; the message lists what identifies each layout.
    """
    root = _check_root(root)
    found = []
    if (root / RAFDB_LABEL_FILE).is_file():
        found.append("rafdb")
    if any((root / d / "annotations").is_dir() for d in set(AFFECTNET_SPLIT_DIRS.values())) or any(
        (root / d / f).is_file() for d in AFFECTNET_CSV_DIRS for f in set(AFFECTNET_SPLIT_CSVS.values())
    ):
        found.append("affectnet")
    if (root / FER2013_CSV).is_file() or _has_fer2013_files(root):
        found.append("fer2013")  # class folders too, but read by file-name prefix
    else:
        split_dirs = {n for names in FOLDER_SPLIT_DIRS.values() for n in names}
        if split_dirs & set(_subdirs(root)):
            found.append("folder")
    if len(found) == 1:
        return found[0]
    markers = "; ".join(f"{k!r}: {v}" for k, v in _LAYOUT_MARKERS.items())
    if found:
        raise ValueError(f"Dataset root {root} matches several layouts ({', '.join(found)}); pass layout= explicitly.")
    raise ValueError(
        f"Cannot detect the dataset layout of {root} (it holds: {_listing(root)}). Layouts and what identifies "
        f"them: {markers}. Point the root at the directory holding these, or pass layout= explicitly."
    )


def _fer2013_image_files(root: Path) -> Iterator[Path]:
    """Image files in ``root/<split dir>/<class>/`` (the Kaggle release's two levels, no deeper)."""
    for split_dir in _subdirs(root).values():
        for class_dir in _subdirs(split_dir).values():
            for f in sorted(os.listdir(class_dir)):
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                    yield class_dir / f


def _has_fer2013_files(root: Path) -> bool:
    """Whether the class folders under ``root`` hold FER-2013's ``PublicTest_``/``PrivateTest_`` images."""
    prefixes = tuple(f"{FER2013_USAGE[s]}_" for s in ("val", "test"))
    return any(p.name.startswith(prefixes) for p in _fer2013_image_files(root))


def _listing(path: Path, limit: int = 10) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _folder_samples(root: Path, split: str, num_classes: int) -> Tuple[List[Tuple[Path, int]], List[Path]]:
    """``root/<split>/<class>/**/<image>`` with class folders named by expression."""
    label_names = label_names_for(num_classes)
    subdirs = _subdirs(root)
    present = [subdirs[n] for n in FOLDER_SPLIT_DIRS[split] if n in subdirs]
    if not present:
        raise FileNotFoundError(
            f"No {split!r} split folder in {root}: looked for {', '.join(d + '/' for d in FOLDER_SPLIT_DIRS[split])}"
            f"; the root holds: {_listing(root)}."
        )
    if len(present) > 1:
        raise ValueError(f"Several {split!r} split folders in {root}: {', '.join(p.name for p in present)}; keep one.")
    split_dir = present[0]
    class_dirs: Dict[str, Path] = {}
    for class_dir in _subdirs(split_dir).values():
        try:
            name = canonical_label(class_dir.name)
        except ValueError as e:
            raise ValueError(f"Class folder {class_dir}: {e}") from None
        if name in class_dirs:
            raise ValueError(
                f"Class folders {class_dirs[name]} and {class_dir} both mean {name!r}; merge them into one folder."
            )
        class_dirs[name] = class_dir
    samples, dropped = [], Counter()
    for name, class_dir in sorted(class_dirs.items()):
        files = sorted(
            Path(d) / f
            for d, _, fs in os.walk(class_dir)
            for f in fs
            if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
        )
        for path in files:
            if _keep_label(name, num_classes, dropped):
                samples.append((path, label_names.index(name)))
    _log_dropped(dropped, str(split_dir))
    return samples, []


def _fer2013_folder_samples(root: Path, split: str, num_classes: int) -> List[Tuple[Path, int]]:
    """Kaggle FER-2013: ``<any split dir>/<class>/<Usage>_<n>.jpg``, the split taken from the file-name prefix.

    ``test/`` holds both PublicTest and PrivateTest images, so reading it as one class-folder split would mix
    the validation and test sets; the prefix recovers the standard protocol.
    """
    label_names = label_names_for(num_classes)
    prefix = f"{FER2013_USAGE[split]}_"
    files = list(_fer2013_image_files(root))
    _check_fer2013_prefixes(root, files)
    samples = []
    for path in files:
        if path.name.startswith(prefix):
            try:
                name = canonical_label(path.parent.name)
            except ValueError as e:
                raise ValueError(f"Class folder {path.parent}: {e}") from None
            samples.append((path, label_names.index(name)))
    return sorted(samples, key=lambda s: (label_names[s[1]], str(s[0])))


def _check_fer2013_prefixes(root: Path, files: Sequence[Path]) -> None:
    """Every image of the Kaggle layout names its split; one that does not would be silently left out: raise."""
    prefixes = tuple(f"{usage}_" for usage in FER2013_USAGE.values())
    strays = [str(p.relative_to(root)) for p in files if not p.name.startswith(prefixes)]
    if strays:
        shown = ", ".join(strays[:3]) + (f" and {len(strays) - 3} more" if len(strays) > 3 else "")
        raise ValueError(
            f"{root} is read as FER-2013's Kaggle folders, where the file-name prefix ({', '.join(prefixes)}) names "
            f"each image's split, but {shown} {'have' if len(strays) > 1 else 'has'} none. Move other images out "
            "of this folder (your own faces can be a class-folder dataset of their own: train/, val/, test/)."
        )


def _fer2013_csv_rows(csv_path: Path, split: str, num_classes: int) -> Tuple[List[int], List[int], List[np.ndarray]]:
    """Row numbers, canonical targets and 48x48 uint8 faces of one ``Usage`` of ``fer2013.csv``.

    Every row is checked (columns, emotion id, Usage), the pixels of the requested split are decoded.
    """
    label_names = label_names_for(num_classes)
    usages = {v: k for k, v in FER2013_USAGE.items()}
    rows, targets, faces = [], [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # a BOM (Excel) is not part of the header
        reader = csv.DictReader(f)
        absent = [c for c in ("emotion", "pixels", "Usage") if c not in (reader.fieldnames or ())]
        if absent:
            raise ValueError(
                f"{csv_path} lacks column(s) {absent}; expected emotion,pixels,Usage, found {reader.fieldnames}."
            )
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            usage, emotion, pixels = row["Usage"], row["emotion"], row["pixels"]
            if usage not in usages:
                raise ValueError(f"{where}: unknown Usage {usage!r}; expected one of {', '.join(usages)}.")
            if emotion is None or not emotion.strip().isdigit() or int(emotion) not in FER2013_LABELS:
                raise ValueError(f"{where}: emotion must be an id 0-6 ({FER2013_LABELS}), got {emotion!r}.")
            if usages[usage] != split:
                continue
            faces.append(_fer2013_pixels(pixels, where))
            targets.append(label_names.index(canonical_label(FER2013_LABELS[int(emotion)])))
            rows.append(reader.line_num)
    return rows, targets, faces


def _fer2013_pixels(text: Optional[str], where: str) -> np.ndarray:
    """One ``pixels`` cell: 48*48 space-separated integers 0-255 -> a 48x48 uint8 image."""
    try:
        values = np.array((text or "").split(), dtype=np.int64)
    except ValueError:
        raise ValueError(f"{where}: pixels must be space-separated integers 0-255.") from None
    if values.size != FER2013_SIZE**2:
        raise ValueError(f"{where}: expected {FER2013_SIZE**2} pixels (48x48), got {values.size}.")
    if values.min() < 0 or values.max() > 255:
        raise ValueError(f"{where}: pixel values must lie in 0-255, got {values.min()}..{values.max()}.")
    return values.astype(np.uint8).reshape(FER2013_SIZE, FER2013_SIZE)


class FER2013CsvDataset(FERDataset):
    """FER-2013 as the original ``fer2013.csv`` release: faces decoded from the CSV, held in memory.

    ``samples`` name each face as ``fer2013.csv:<line>`` (there is no image file).
    """

    def __init__(self, csv_path: Path, split: str, num_classes: int = 7, transform: Optional[Callable] = None):
        rows, targets, faces = _fer2013_csv_rows(csv_path, split, num_classes)
        samples = [(Path(f"{csv_path}:{r}"), t) for r, t in zip(rows, targets)]
        super().__init__(
            samples, label_names_for(num_classes), transform, name=f"fer2013:{csv_path.parent.name}:{split}"
        )
        self.faces: List[np.ndarray] = faces

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = Image.fromarray(self.faces[index], mode="L").convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _rafdb_samples(
    root: Path, split: str, num_classes: int, images: str = "auto"
) -> Tuple[List[Tuple[Path, int]], List[Path]]:
    """RAF-DB basic: ``EmoLabel/list_patition_label.txt`` + ``Image/aligned`` (or ``Image/original``)."""
    if split == "val":
        raise ValueError(
            "RAF-DB basic has train and test splits only (no validation split); use split='test' to validate on "
            "the test split, as the paper does."
        )
    label_file = root / RAFDB_LABEL_FILE
    if not label_file.is_file():
        raise FileNotFoundError(f"RAF-DB label file {label_file} not found; the root holds: {_listing(root)}.")
    if images == "auto":
        images = "aligned" if (root / "Image" / "aligned").is_dir() else "original"
    if images not in ("aligned", "original"):
        raise ValueError(f"Unknown RAF-DB image variant {images!r}; use 'aligned', 'original' or 'auto'.")
    image_dir = root / "Image" / images
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"RAF-DB image folder {image_dir} not found (looked for Image/aligned/ then Image/original/); "
            "extract aligned.zip or original.zip under Image/."
        )
    existing = set(os.listdir(image_dir))
    label_names = label_names_for(num_classes)
    samples, missing = [], []
    for lineno, line in enumerate(label_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) not in RAFDB_LABELS:
            raise ValueError(f"{label_file}:{lineno}: expected '<image name> <label 1-7>', got {line.strip()!r}.")
        file_name, rafdb_id = parts[0], int(parts[1])
        if not file_name.startswith(f"{split}_"):
            continue
        if images == "aligned":
            stem, ext = os.path.splitext(file_name)
            file_name = f"{stem}_aligned{ext}"
        target = label_names.index(canonical_label(RAFDB_LABELS[rafdb_id]))
        (samples if file_name in existing else missing).append((image_dir / file_name, target))
    return samples, [p for p, _ in missing]


def _affectnet_target(affectnet_id: int, where: str, num_classes: int, dropped: Counter) -> Optional[int]:
    """Canonical index of an AffectNet expression id; None (counted in ``dropped``) for ids 8-10 and for
    contempt in a 7-class head."""
    if affectnet_id in AFFECTNET_NON_EXPRESSIONS:
        dropped[AFFECTNET_NON_EXPRESSIONS[affectnet_id]] += 1
        return None
    if affectnet_id not in AFFECTNET_LABELS:
        raise ValueError(f"{where}: AffectNet expression id {affectnet_id} is not one of 0-10; is this AffectNet?")
    name = canonical_label(AFFECTNET_LABELS[affectnet_id])
    if not _keep_label(name, num_classes, dropped):
        return None
    return label_names_for(num_classes).index(name)


def _affectnet_npy_samples(
    split_dir: Path, num_classes: int, dropped: Counter
) -> Tuple[List[Tuple[Path, int]], List[Path]]:
    """AffectNet ``<split>_set/annotations/<id>_exp.npy`` + ``<split>_set/images/<id>.jpg``."""
    ann_dir, image_dir = split_dir / "annotations", split_dir / "images"
    for d in (ann_dir, image_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"AffectNet folder {d} not found; {split_dir} holds: {_listing(split_dir)}.")
    images = {}
    for f in os.listdir(image_dir):
        stem, ext = os.path.splitext(f)
        if ext.lower() in IMG_EXTENSIONS:
            images[stem] = image_dir / f
    samples, missing = [], []
    ids = [f[: -len("_exp.npy")] for f in os.listdir(ann_dir) if f.endswith("_exp.npy")]
    for image_id in sorted(ids, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i)):  # numeric order
        f = f"{image_id}_exp.npy"
        value = np.load(ann_dir / f, allow_pickle=False)
        try:
            affectnet_id = int(value.reshape(-1)[0])
        except (ValueError, IndexError):
            raise ValueError(f"{ann_dir / f}: expected one expression id, got {value!r}.") from None
        target = _affectnet_target(affectnet_id, f"{ann_dir / f}", num_classes, dropped)
        if target is None:
            continue
        if image_id in images:
            samples.append((images[image_id], target))
        else:
            missing.append(image_dir / f"{image_id}.jpg")
    return samples, missing


def _affectnet_csv_samples(
    root: Path, csv_path: Path, num_classes: int, dropped: Counter
) -> Tuple[List[Tuple[Path, int]], List[Box], List[Path]]:
    """AffectNet CSV release: ``training.csv`` / ``validation.csv`` + ``Manually_Annotated_Images/``.

    These images are whole photographs; each sample carries its face box from the CSV, cropped when loaded.
    """
    image_dir = next((root / d for d in AFFECTNET_IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
        raise FileNotFoundError(
            f"AffectNet image folder not found: looked for {', '.join(str(root / d) for d in AFFECTNET_IMAGE_DIRS)}."
        )
    listed: Dict[Path, set] = {}
    samples, boxes, missing = [], [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # a BOM (Excel) is not part of the header
        has_header = f.readline().startswith(AFFECTNET_CSV_COLUMNS[0])
        f.seek(0)
        reader = csv.DictReader(f, fieldnames=None if has_header else AFFECTNET_CSV_COLUMNS)
        required = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
        absent = [c for c in required if c not in (reader.fieldnames or ())]
        if absent:
            raise ValueError(f"{csv_path} lacks column(s) {absent}; found {reader.fieldnames}.")
        for row in reader:
            line = reader.line_num
            try:
                affectnet_id = int(row["expression"])
                x, y, w, h = (int(float(row[k])) for k in ("face_x", "face_y", "face_width", "face_height"))
            except (TypeError, ValueError):
                raise ValueError(f"{csv_path}:{line}: bad expression or face box in {row}.") from None
            target = _affectnet_target(affectnet_id, f"{csv_path}:{line}", num_classes, dropped)
            if target is None:
                continue
            path = image_dir / row["subDirectory_filePath"]
            if path.parent not in listed:
                listed[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
            if path.name in listed[path.parent]:
                samples.append((path, target))
                boxes.append((x, y, x + w, y + h))
            else:
                missing.append(path)
    return samples, boxes, missing


def _affectnet_dataset_parts(
    root: Path, split: str, num_classes: int
) -> Tuple[List[Tuple[Path, int]], Optional[List[Box]], List[Path]]:
    """AffectNet in either distributed form; its validation set serves as both ``val`` and ``test``."""
    dropped = Counter()
    split_dir = root / AFFECTNET_SPLIT_DIRS[split]
    csv_paths = [root / d / AFFECTNET_SPLIT_CSVS[split] for d in AFFECTNET_CSV_DIRS]
    csv_path = next((p for p in csv_paths if p.is_file()), None)
    if split_dir.is_dir():
        samples, missing = _affectnet_npy_samples(split_dir, num_classes, dropped)
        boxes, where = None, split_dir
    elif csv_path is not None:
        samples, boxes, missing = _affectnet_csv_samples(root, csv_path, num_classes, dropped)
        where = csv_path
    else:
        raise FileNotFoundError(
            f"No AffectNet {split!r} split in {root}: looked for {split_dir.name}/ (per-image .npy annotations) and "
            f"{AFFECTNET_SPLIT_CSVS[split]} in ./ or Manually_Annotated_file_lists/ (CSV release); the root holds: "
            f"{_listing(root)}."
        )
    _log_dropped(dropped, str(where))
    return samples, boxes, missing


def build_dataset(
    root: Union[str, Path],
    split: str,
    layout: str = "auto",
    num_classes: int = 7,
    transform: Optional[Callable] = None,
    skip_unreadable: bool = False,
) -> FERDataset:
    """Read one split of a FER dataset, labels mapped by name to canonical FER-7 (or FER-8) order.

    Args:
        root: dataset root (see the layouts in the README).
        split: ``"train"``, ``"val"`` or ``"test"``. RAF-DB has no ``"val"`` (use ``"test"``); AffectNet's
            validation set is its test set, so ``"val"`` and ``"test"`` both read it.
        layout: one of :data:`LAYOUTS`, or ``"auto"`` to detect it (:func:`detect_layout`).
        num_classes: 7 (contempt images dropped) or 8 (contempt kept as index 7).
        transform: applied to each RGB PIL image.
        skip_unreadable: decode every image up front and skip unreadable or missing ones (``dataset.skipped``).

    Raises:
        ValueError / FileNotFoundError: unknown layout, split or class name, missing folders, empty split.
    """
    root = _check_root(root)
    _check_split(split)
    label_names = label_names_for(num_classes)
    if layout == "auto":
        layout = detect_layout(root)
    boxes = None
    if layout == "fer2013" and (root / FER2013_CSV).is_file():
        dataset = FER2013CsvDataset(root / FER2013_CSV, split, num_classes, transform)
        if not len(dataset):
            raise ValueError(f"{root / FER2013_CSV} has no {FER2013_USAGE[split]} rows (the {split!r} split).")
        return dataset
    if layout == "folder":
        samples, missing = _folder_samples(root, split, num_classes)
    elif layout == "fer2013":
        samples, missing = _fer2013_folder_samples(root, split, num_classes), []
    elif layout == "rafdb":
        samples, missing = _rafdb_samples(root, split, num_classes)
    elif layout == "affectnet":
        samples, boxes, missing = _affectnet_dataset_parts(root, split, num_classes)
    else:
        raise ValueError(f"Unknown dataset layout {layout!r}; use one of {', '.join(LAYOUTS)} or 'auto'.")
    name = f"{layout}:{root.resolve().name}:{split}"  # no full path: it may end up in published checkpoint meta
    if not samples:
        raise ValueError(
            f"The {split!r} split of {root} (layout {layout!r}, {num_classes} classes) has no images"
            + (f" ({len(missing)} listed but missing)" if missing else "")
            + ". Check the root and the split folders."
        )
    dataset = FERDataset(samples, label_names, transform, skip_unreadable, boxes, missing, name)
    if not len(dataset):
        raise ValueError(f"The {split!r} split of {root} has no readable images ({dataset.skipped} skipped).")
    return dataset
