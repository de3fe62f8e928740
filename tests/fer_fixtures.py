"""Tiny synthetic FER datasets in each supported on-disk layout, for tests.

With ``separable=True`` every image of a class is that class's solid colour plus small noise, so a model can
learn the task in a few steps. Colours are keyed by *canonical* class name, whatever spelling or dataset id
wrote the image, so a label mix-up shows as a colour/label mismatch. The id tables here are written out
independently of ``timm_acsi.data`` on purpose: tests compare the reader against them.
"""

from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

#: Canonical name -> RGB colour of its separable images (far apart in RGB space).
CLASS_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "anger": (220, 30, 30),
    "disgust": (30, 160, 30),
    "fear": (30, 30, 220),
    "happiness": (230, 230, 40),
    "sadness": (40, 220, 220),
    "surprise": (220, 40, 220),
    "neutral": (128, 128, 128),
    "contempt": (20, 20, 20),
}

#: Folder spellings used by default (FER2013's Kaggle folders) and their canonical names.
FOLDER_CLASSES: Dict[str, str] = {
    "angry": "anger",
    "disgust": "disgust",
    "fear": "fear",
    "happy": "happiness",
    "sad": "sadness",
    "surprise": "surprise",
    "neutral": "neutral",
    "contempt": "contempt",
    "Angry": "anger",
    "anger": "anger",
    "Happiness": "happiness",
    "Surprised": "surprise",
    "normal": "neutral",
}

RAFDB_IDS: Dict[int, str] = {
    1: "surprise",
    2: "fear",
    3: "disgust",
    4: "happiness",
    5: "sadness",
    6: "anger",
    7: "neutral",
}
AFFECTNET_IDS: Dict[int, str] = {
    0: "neutral",
    1: "happiness",
    2: "sadness",
    3: "surprise",
    4: "fear",
    5: "disgust",
    6: "anger",
    7: "contempt",
}


def class_image(name: Optional[str], size: int, rng: np.random.RandomState, separable: bool = True) -> Image.Image:
    """A ``size x size`` RGB image: the colour of canonical class ``name`` +-8 noise, or pure noise."""
    if separable and name is not None:
        base = np.array(CLASS_COLOURS[name], dtype=np.int16)
        pixels = base + rng.randint(-8, 9, size=(size, size, 3))
    else:
        pixels = rng.randint(0, 256, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_folder_dataset(
    root: Union[str, Path],
    per_class: int = 4,
    size: int = 32,
    classes: Optional[Iterable[str]] = None,
    splits: Sequence[str] = ("train", "val"),
    separable: bool = True,
    ext: str = ".png",
) -> Path:
    """Write ``root/<split>/<class folder>/<i><ext>``; ``classes`` are folder names (default: FER2013 spellings
    of the 7 classes). Folder names outside :data:`FOLDER_CLASSES` get noise images (for error tests)."""
    root = Path(root)
    classes = (
        list(classes) if classes is not None else ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    )
    rng = np.random.RandomState(0)
    for split in splits:
        for folder in classes:
            class_dir = root / split / folder
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                class_image(FOLDER_CLASSES.get(folder), size, rng, separable).save(class_dir / f"{i:03d}{ext}")
    return root


def make_rafdb_dataset(
    root: Union[str, Path],
    per_class: int = 2,
    size: int = 32,
    separable: bool = True,
    variants: Sequence[str] = ("aligned",),
) -> Path:
    """Write RAF-DB basic as distributed: ``EmoLabel/list_patition_label.txt`` (ids 1-7) and
    ``Image/aligned/<name>_aligned.jpg`` and/or ``Image/original/<name>.jpg``; ``per_class`` images per class
    in each of train and test."""
    root = Path(root)
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    for variant in variants:
        (root / "Image" / variant).mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    lines = []
    for split in ("train", "test"):
        n = 0
        for rafdb_id, name in RAFDB_IDS.items():
            for _ in range(per_class):
                n += 1
                stem = f"{split}_{n:05d}" if split == "train" else f"{split}_{n:04d}"
                lines.append(f"{stem}.jpg {rafdb_id}")
                img = class_image(name, size, rng, separable)
                for variant in variants:
                    file_name = f"{stem}_aligned.jpg" if variant == "aligned" else f"{stem}.jpg"
                    img.save(root / "Image" / variant / file_name, quality=95)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root


def make_affectnet_dataset(
    root: Union[str, Path],
    per_class: int = 2,
    size: int = 32,
    form: str = "npy",
    separable: bool = True,
    ids: Iterable[int] = tuple(range(11)),
    border: int = 8,
    csv_dir: str = "Manually_Annotated_file_lists",
) -> Path:
    """Write AffectNet as distributed, ``per_class`` images for each expression id in ``ids`` (default 0-10:
    the 8 expressions plus none/uncertain/no-face) in train and validation.

    ``form="npy"``: ``{train,val}_set/images/<n>.jpg`` + ``annotations/<n>_exp.npy`` (a string array, as shipped).
    ``form="csv"``: ``<csv_dir>/training.csv`` (with header) / ``validation.csv`` (without, as shipped) +
    ``Manually_Annotated_Images/<dir>/<n>.jpg``, each a whole picture with the ``size x size`` face at
    ``(border, border)`` inside a black frame of ``border`` pixels.
    """
    if form not in ("npy", "csv"):
        raise ValueError(f"form must be 'npy' or 'csv', got {form!r}")
    root = Path(root)
    rng = np.random.RandomState(2)
    ids = list(ids)
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
    for split_dir, csv_name in (("train_set", "training.csv"), ("val_set", "validation.csv")):
        rows = [header] if csv_name == "training.csv" else []
        n = 0
        for affectnet_id in ids:
            for _ in range(per_class):
                n += 1
                face = class_image(AFFECTNET_IDS.get(affectnet_id), size, rng, separable)
                if form == "npy":
                    for sub in ("images", "annotations"):
                        (root / split_dir / sub).mkdir(parents=True, exist_ok=True)
                    face.save(root / split_dir / "images" / f"{n}.jpg", quality=95)
                    np.save(root / split_dir / "annotations" / f"{n}_exp.npy", np.array(str(affectnet_id)))
                else:
                    rel = f"{split_dir[:-4]}{n % 3}/{n:05d}.jpg"
                    path = root / "Manually_Annotated_Images" / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    picture = Image.new("RGB", (size + 2 * border, size + 2 * border))
                    picture.paste(face, (border, border))
                    picture.save(path, quality=95)
                    rows.append(f'{rel},{border},{border},{size},{size},"1.0;2.0",{affectnet_id},0.1,-0.2')
        if form == "csv":
            (root / csv_dir).mkdir(parents=True, exist_ok=True)
            (root / csv_dir / csv_name).write_text("\n".join(rows) + "\n")
    return root


#: FER-2013 ``emotion`` ids (written out independently of the reader) and the Kaggle release's folder names.
FER2013_IDS: Dict[int, Tuple[str, str]] = {
    0: ("angry", "anger"),
    1: ("disgust", "disgust"),
    2: ("fear", "fear"),
    3: ("happy", "happiness"),
    4: ("sad", "sadness"),
    5: ("surprise", "surprise"),
    6: ("neutral", "neutral"),
}
#: Canonical name -> gray level of its separable FER-2013 faces (grayscale, so colours cannot tell classes apart).
CLASS_GRAYS: Dict[str, int] = {
    "anger": 20,
    "disgust": 55,
    "fear": 90,
    "happiness": 125,
    "sadness": 160,
    "surprise": 195,
    "neutral": 230,
}
#: The three FER-2013 usages and how many faces of each class the fixtures write.
FER2013_USAGES: Tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")


def gray_face(name: str, rng: np.random.RandomState, size: int = 48) -> np.ndarray:
    """A ``size x size`` uint8 face: the gray level of canonical class ``name`` +-4 noise."""
    return np.clip(CLASS_GRAYS[name] + rng.randint(-4, 5, size=(size, size)), 0, 255).astype(np.uint8)


def make_fer2013_folders(root: Union[str, Path], per_class: Dict[str, int]) -> Path:
    """The Kaggle FER-2013 release: ``train/<folder>/Training_<n>.png``, ``test/<folder>/PublicTest_<n>.png`` and
    ``PrivateTest_<n>.png``; ``per_class`` gives the number of faces per class for each usage."""
    root = Path(root)
    rng = np.random.RandomState(0)
    n = 0
    for usage in FER2013_USAGES:
        split = "train" if usage == "Training" else "test"
        for folder, name in FER2013_IDS.values():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for _ in range(per_class[usage]):
                n += 1
                Image.fromarray(gray_face(name, rng), mode="L").save(root / split / folder / f"{usage}_{n}.png")
    return root


def make_fer2013_csv(root: Union[str, Path], per_class: Dict[str, int], rows: Sequence[str] = ()) -> Path:
    """The original ``fer2013.csv`` (``emotion,pixels,Usage``), ``per_class`` faces per class and usage, in
    shuffled order, plus any extra raw ``rows`` (for error tests)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    lines = []
    for usage in FER2013_USAGES:
        for emotion, (_, name) in FER2013_IDS.items():
            for _ in range(per_class[usage]):
                pixels = " ".join(map(str, gray_face(name, rng).reshape(-1)))
                lines.append(f"{emotion},{pixels},{usage}")
    lines = [lines[i] for i in rng.permutation(len(lines))] + list(rows)
    (root / "fer2013.csv").write_text("emotion,pixels,Usage\n" + "\n".join(lines) + "\n")
    return root
