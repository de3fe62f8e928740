"""Argument types and checks shared by the ``timm-acsi`` subcommands (and the benchmark scripts)."""

import argparse
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import yaml


def key_value(text: str) -> Tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as YAML (numbers, booleans, lists, strings): one ``--model-args`` item."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. attn_placement=stage), got {text!r}")
    return key, yaml.safe_load(value)


def label_names(text: str) -> List[str]:
    """``NAME,NAME,...``: the class of each model output, in output order (``--label-names``)."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated class names (e.g. anger,disgust,fear,happiness,sadness,surprise,neutral), "
            f"got {text!r}"
        )
    return names


def positive_int(text: str) -> int:
    """An integer of at least 1 (sizes, counts)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (worker counts, warm-up rounds)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def check_new_file(path: Optional[Path], overwrite: bool) -> None:
    """Refuse an output path that is a folder, or an existing file without ``--overwrite`` (``None``: no output).
    Called before anything is computed, so that no work is done only to be refused."""
    if path is None:
        return
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: pass a file path (e.g. {path / 'table.md'}).")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it.")


def refuse_existing_files(parser: argparse.ArgumentParser, paths: Sequence[Optional[Path]], overwrite: bool) -> None:
    """:func:`check_new_file` for each path, as the parser's error (exit 2): for the benchmark scripts, which run
    outside ``timm-acsi``'s error handling."""
    try:
        for path in paths:
            check_new_file(path, overwrite)
    except OSError as e:
        parser.error(str(e))


def add_loader_args(parser: argparse.ArgumentParser, batch_size: int = 64) -> None:
    """``--batch-size`` and ``--workers`` (default min(4, CPUs): more workers than cores only slow a CPU run)."""
    parser.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help=f"batch size (default: {batch_size})"
    )
    workers = min(4, os.cpu_count() or 1)
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=workers,
        help=f"data loading workers (default: min(4, CPUs) = {workers})",
    )


MODEL_ARGS_HELP = (
    "extra create_model kwargs as KEY=VALUE items, e.g. --model-args attn_placement=stage final_attn=false"
)
LABEL_NAMES_HELP = "class names in the order of the model's outputs (e.g. anger,disgust,fear,happiness,sadness,...)"
