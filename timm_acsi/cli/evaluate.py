"""``timm-acsi evaluate``: accuracy, mean-class accuracy, per-class accuracy and confusion matrix of a checkpoint.

Model, classes, label order and preprocessing come from the checkpoint's description (``best.json`` next to
``best.safetensors``, or its safetensors header), or from the run folder, tag or Hub folder given instead;
outputs are matched to the dataset's classes by name. A checkpoint without a description needs ``--model`` and
``--label-names`` (the order of its outputs).
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..data import LAYOUTS
from ..metrics import format_metrics, plot_confusion_matrix, save_metrics
from ..train import evaluate_checkpoint
from ._args import LABEL_NAMES_HELP, MODEL_ARGS_HELP, add_loader_args, key_value, label_names, positive_int


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Evaluate a checkpoint on a split of a FER dataset.")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help=".safetensors checkpoint (or .pth read without unpickling), a run folder, a tag with weights "
        "(acsinet18.fer2013), a Hub folder, local-dir:PATH or hf-hub:ORG/NAME",
    )
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument("--split", default="test", help="train, val or test (default: test)")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="dataset layout (default: auto)")
    parser.add_argument("--tta-flip", action="store_true", help="average the softmax of each image and its mirror")
    parser.add_argument("--out", help="folder for metrics.json and confusion_matrix.png")
    parser.add_argument("--overwrite", action="store_true", help="replace metrics.json / confusion_matrix.png in --out")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--model", help="architecture, for checkpoints without a description (e.g. acsinet18)")
    parser.add_argument(
        "--model-args",
        nargs="+",
        type=key_value,
        metavar="KEY=VALUE",
        help=f"{MODEL_ARGS_HELP}; for checkpoints without a description",
    )
    parser.add_argument(
        "--num-classes", type=int, help="7 or 8, for checkpoints without a description (default: the classifier's size)"
    )
    parser.add_argument(
        "--label-names",
        type=label_names,
        metavar="NAME,NAME,...",
        help=f"{LABEL_NAMES_HELP}; for checkpoints without a description",
    )
    parser.add_argument("--img-size", type=positive_int, help="centre-crop size (default: the checkpoint's input size)")
    parser.add_argument(
        "--resize",
        type=positive_int,
        help="resize before cropping (default: img-size / the checkpoint's crop_pct, or 256 / 224)",
    )
    parser.add_argument("--dataset-name", help="dataset name written into metrics.json (default: from the layout)")
    add_loader_args(parser)
    parser.add_argument("--device", help="device (default: cuda if available, else cpu)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--skip-unreadable", action="store_true", help="skip unreadable images instead of failing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str], prog: str = "timm-acsi evaluate") -> int:
    args = build_parser(prog).parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    outputs = _check_out(args.out, args.overwrite)  # before evaluating: nothing is computed only to be refused
    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        split=args.split,
        layout=args.layout,
        model_name=args.model,
        model_args=dict(args.model_args) if args.model_args is not None else None,
        num_classes=args.num_classes,
        label_names=args.label_names,
        img_size=args.img_size,
        resize=args.resize,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        tta_flip=args.tta_flip,
        skip_unreadable=args.skip_unreadable,
        dataset_name=args.dataset_name,
        progress=not args.quiet,
    )
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    if outputs:
        metrics_path, plot_path = outputs
        save_metrics(metrics_path, metrics)
        tta = " (flip TTA)" if args.tta_flip else ""
        name = Path(args.checkpoint).stem if Path(args.checkpoint).is_file() else args.checkpoint
        title = f"{name} on {metrics['dataset']} {metrics['split']}{tta}"
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["label_names"], plot_path, title)
        if not args.json:
            print(f"wrote {metrics_path} and {plot_path}")
    return 0


def _check_out(out: Optional[str], overwrite: bool) -> List[Path]:
    """The files ``--out`` will receive; a file in the folder's place, or results it holds (without
    ``--overwrite``), raise."""
    if not out:
        return []
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out {out} is a file: pass a folder for metrics.json and confusion_matrix.png.")
    outputs = [folder / name for name in ("metrics.json", "confusion_matrix.png")]
    folders = [p.name for p in outputs if p.is_dir()]
    if folders:
        raise IsADirectoryError(f"{out} holds a folder named {' and '.join(folders)}: pick another --out.")
    existing = [p.name for p in outputs if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {' and '.join(existing)}: pass --overwrite to replace them, or pick another --out."
        )
    return outputs


if __name__ == "__main__":
    from . import run_command

    sys.exit(run_command("evaluate", sys.argv[1:]))
