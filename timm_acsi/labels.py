"""Canonical facial-expression label order and name normalisation.

Every config, checkpoint and dataset reader in timm-acsi uses one order, the paper's (Table 2), which is
also FER2013's. Datasets ship their own orders (RAF-DB: surprise first; AffectNet: neutral first), so
readers map class *names* through :func:`canonical_label`, never raw indices.
"""

from typing import Dict, Sequence, Tuple

#: The paper's order (= FER2013's). Index i of a FER-7 head means ``FER7_LABELS[i]``.
FER7_LABELS: Tuple[str, ...] = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")

#: FER-7 plus AffectNet's eighth class, appended so FER-7 indices stay valid.
FER8_LABELS: Tuple[str, ...] = FER7_LABELS + ("contempt",)

_ALIASES: Dict[str, str] = {
    "anger": "anger",
    "angry": "anger",
    "disgust": "disgust",
    "disgusted": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "happiness": "happiness",
    "happy": "happiness",
    "joy": "happiness",
    "sadness": "sadness",
    "sad": "sadness",
    "surprise": "surprise",
    "surprised": "surprise",
    "neutral": "neutral",
    "normal": "neutral",
    "contempt": "contempt",
}


def canonical_label(name: str) -> str:
    """Map a class-name spelling (``"Angry"``, ``"happy"``, ``"surprised"``...) to its canonical name.

    Raises:
        ValueError: the name is not a known expression, with the accepted spellings.
    """
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _ALIASES:
        raise ValueError(
            f"Unknown expression class name {name!r}. Accepted spellings: {', '.join(sorted(_ALIASES))}. "
            "Rename the class (folder) or drop it from the dataset."
        )
    return _ALIASES[key]


def label_names_for(num_classes: int) -> Tuple[str, ...]:
    """Canonical label names for a FER-7 or FER-8 head."""
    if num_classes == len(FER7_LABELS):
        return FER7_LABELS
    if num_classes == len(FER8_LABELS):
        return FER8_LABELS
    raise ValueError(f"No canonical FER label set has {num_classes} classes; FER-7 has 7 and FER-8 has 8.")


def check_label_names(label_names: Sequence[str], num_classes: int) -> Tuple[str, ...]:
    """Validate that ``label_names`` has one canonical, unique name per output of a ``num_classes`` head."""
    names = tuple(canonical_label(n) for n in label_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} label names for a {num_classes}-class head; pass exactly one name per class.")
    if len(set(names)) != len(names):
        raise ValueError(f"Duplicate label names {list(label_names)}: each class must appear once.")
    return names
