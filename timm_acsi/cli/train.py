"""``timm-acsi train``: train a FER model with the paper's recipe; every setting is a flag.

Settings are resolved in order: the recipe's defaults, then the run folder's ``config.yaml`` (with
``--resume``), then ``--config FILE``, then the flags given on the command line. Distributed training::

    torchrun --nproc_per_node=4 -m timm_acsi.cli.train --data ROOT --output runs/NAME
"""

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Dict, Sequence

import yaml

from ..train import TrainConfig, config_from_dict, load_config_file, train
from ._args import key_value

#: Flag spellings that differ from the field name.
_ALIASES = {"opt": ("--opt", "--optimizer")}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, with no default: only flags actually given are set."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flags = _ALIASES.get(f.name, ("--" + f.name.replace("_", "-"),))
        default = getattr(defaults, f.name)
        help_ = f.metadata["help"] + ("" if default in (None, "", {}) else f" (default: {default})")
        hint = hints[f.name]
        args = typing.get_args(hint)
        if hint is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(*flags, dest=f.name, nargs=len(args), type=args[0], metavar=f.name.upper(), help=help_)
        elif f.name == "model_args":
            parser.add_argument(*flags, dest=f.name, nargs="+", type=key_value, metavar="KEY=VALUE", help=help_)
        else:
            type_ = next(a for a in args if a is not type(None)) if args else hint
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else f.name.upper()
            parser.add_argument(*flags, dest=f.name, type=type_, choices=choices, metavar=metavar, help=help_)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a facial expression recognition model (defaults: the ACSI-Net paper's recipe).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON config file (e.g. a run's config.yaml); flags override it")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output where it stopped")
    parser.add_argument("--overwrite", action="store_true", help="replace the run files in an existing --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (for logs)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    _add_config_flags(parser)
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < run folder config (``--resume``) < ``--config`` file < command-line flags."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags: Dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
    if "model_args" in flags:
        flags["model_args"] = dict(flags["model_args"])
    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    cfg = TrainConfig()
    if getattr(args, "resume", False):
        output = flags.get("output") or file_values.get("output")
        if not output:
            raise ValueError("--resume needs the run folder: pass --output runs/NAME.")
        run_config = Path(output) / "config.yaml"
        if not run_config.is_file():
            raise FileNotFoundError(
                f"Cannot resume: {output} holds no run that completed an epoch (no config.yaml). Start a new run "
                "without --resume."
            )
        cfg = config_from_dict(load_config_file(run_config), cfg)
    return config_from_dict(flags, config_from_dict(file_values, cfg))


def main(argv: Sequence[str], prog: str = "timm-acsi train") -> int:
    args = build_parser(prog).parse_args(list(argv))
    cfg = resolve_config(args)
    if getattr(args, "print_config", False):
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s", stream=sys.stdout)
    metrics = train(
        cfg,
        resume=getattr(args, "resume", False),
        overwrite=getattr(args, "overwrite", False),
        progress=not getattr(args, "quiet", False),
    )
    if main_rank:
        print(
            f"{metrics['dataset']} [{metrics['split']}]: accuracy {100 * metrics['accuracy']:.2f}%, "
            f"mean-class accuracy {100 * metrics['mean_class_accuracy']:.2f}% ({metrics['num_samples']} images)"
        )
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m timm_acsi.cli.train ...
    from . import run_command

    sys.exit(run_command("train", sys.argv[1:]))
