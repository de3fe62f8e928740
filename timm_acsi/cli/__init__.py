"""``timm-acsi`` console command: one subcommand per job, each imported only when used.

Every command module has ``main(argv, prog) -> int`` and raises on bad input or failure; :func:`run_command`
turns what it raises into one line ``timm-acsi CMD: error: ...`` and an exit code (:data:`ERRORS`), the way
huggingface_hub's CLI does. Exceptions not listed there are bugs and keep their traceback.
"""

import importlib
import sys
from typing import Optional, Sequence, Tuple, Union

from ..extras import MissingExtraError, import_extra

__all__ = ["COMMANDS", "ERRORS", "MissingExtraError", "import_extra", "exit_code", "main", "run_command"]

#: subcommand -> (module under timm_acsi.cli, one-line help)
COMMANDS = {
    "profile": ("profile", "params/FLOPs parity report and model table (fvcore)"),
    "publish": ("publish", "validate a checkpoint and publish it to the Hugging Face Hub in timm's format"),
    "train": ("train", "train a FER model with the paper's recipe"),
    "evaluate": ("evaluate", "evaluate a checkpoint on a dataset split"),
    "predict": ("predict", "recognise the expressions of the faces in photos, folders and videos"),
    "export": ("export", "export a model to ONNX (labels, preprocessing) with a parity check against PyTorch"),
    "embed": ("embed", "t-SNE maps and silhouettes of pooled features per model (the paper's Fig. 4)"),
    "demo": ("demo", "browser demo: upload a photo or webcam snapshot, see each face's expression and attention map"),
}


ExceptionSpec = Union[type, str]
#: What the commands raise -> exit code, first match wins: 2 for bad input (the message says what to change),
#: 1 for failures of the tool, the Hub, the network or the disk. A class named by its dotted path can only have
#: been raised if its module was imported; it is looked up only then (a command without torch never imports it).
ERRORS: Tuple[Tuple[Tuple[ExceptionSpec, ...], int], ...] = (
    (("timm_acsi.export.export.ParityError",), 1),  # a ValueError, but the export is wrong, not the input
    (
        (
            ValueError,
            FileNotFoundError,
            FileExistsError,
            PermissionError,
            IsADirectoryError,
            NotADirectoryError,
            MissingExtraError,
            "timm_acsi.train.distributed.RunError",
            "timm_acsi.data.datasets.UnreadableImageError",
        ),
        2,
    ),
    ((OSError,), 1),  # ConnectionError, the Hub's HTTP errors, a full disk
)


def _usage() -> str:
    lines = ["usage: timm-acsi COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'timm-acsi COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def _loaded(specs: Sequence[ExceptionSpec]) -> Tuple[type, ...]:
    """The exception classes of ``specs`` that exist in this process (dotted paths of imported modules)."""
    classes = []
    for spec in specs:
        if isinstance(spec, str):
            module, _, name = spec.rpartition(".")
            spec = getattr(sys.modules.get(module), name, None)
        if spec is not None:
            classes.append(spec)
    return tuple(classes)


def exit_code(error: BaseException) -> Optional[int]:
    """The exit code for an exception a command raised, or ``None`` for a bug (not in :data:`ERRORS`)."""
    return next((code for specs, code in ERRORS if isinstance(error, _loaded(specs))), None)


def run_command(name: str, argv: Sequence[str], prog: Optional[str] = None) -> int:
    """Run subcommand ``name``; an error it raises is printed as one line ``PROG: error: ...`` and becomes its exit
    code. ``prog`` (default ``timm-acsi NAME``) names a script that runs the command, e.g. a benchmark."""
    prog = prog or f"timm-acsi {name}"
    module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
    try:
        return module.main(list(argv), prog=prog)
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"timm-acsi: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_command(name, rest)
