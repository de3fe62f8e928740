"""``timm-acsi`` console command: one subcommand per job, each imported only when used."""

import importlib
import sys
from typing import Optional, Sequence

#: subcommand -> (module under timm_acsi.cli, one-line help)
COMMANDS = {
    "profile": ("profile", "params/FLOPs parity report and model table (fvcore)"),
    "publish": ("publish", "validate a checkpoint and publish it to the Hugging Face Hub in timm's format"),
    "train": ("train", "train a FER model with the paper's recipe"),
    "evaluate": ("evaluate", "evaluate a checkpoint on a dataset split"),
}


def _usage() -> str:
    lines = ["usage: timm-acsi COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'timm-acsi COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"timm-acsi: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
    return module.main(rest, prog=f"timm-acsi {name}")
