"""Argument types shared by the ``timm-acsi`` subcommands."""

import argparse
from typing import Any, Tuple

import yaml


def key_value(text: str) -> Tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as YAML (numbers, booleans, lists, strings): one ``--model-args`` item."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. attn_placement=stage), got {text!r}")
    return key, yaml.safe_load(value)


MODEL_ARGS_HELP = (
    "extra create_model kwargs as KEY=VALUE items, e.g. --model-args attn_placement=stage final_attn=false"
)
