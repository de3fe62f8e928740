"""``timm-acsi export``: any model source to an ONNX file with its labels and preprocessing, checked for parity."""

import argparse
import os
import sys
from typing import Sequence

from ..extras import import_extra
from ._args import LABEL_NAMES_HELP, MODEL_ARGS_HELP, key_value, label_names, positive_int

EXAMPLES = """examples:
  timm-acsi export --model runs/acsinet18-fer2013 --output acsinet18.onnx
  timm-acsi export --model hf-hub:ORG/acsinet18.rafdb --output acsinet18.onnx --dynamic-size --fp16
  timm-acsi export --model old/model_best.pth --arch acsinet18 \\
      --label-names anger,disgust,fear,happiness,sadness,surprise,neutral --output acsinet18.onnx

The file is kept only if onnxruntime reproduces the PyTorch model (logits and softmax within the tolerance,
same argmax) on random inputs and on a real face. Run it with `timm-acsi predict --backend onnxruntime`."""


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a model to ONNX (labels and preprocessing in its metadata) and check that onnxruntime "
        "computes what PyTorch computes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model source: tag, hf-hub:ORG/NAME, local-dir:PATH, checkpoint, run")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--dynamic-size", action="store_true", help="free input height and width (default: fixed)")
    p.add_argument("--batch-size", type=positive_int, help="fix the batch axis to this size (default: free)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--fp16", action="store_true", help="float16 graph: half the file; for GPU execution providers")
    p.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="auto (default): torch.export-based dynamo exporter, the TorchScript exporter if it fails",
    )
    p.add_argument("--tolerance", type=float, help="max abs difference of logits and softmax (default 1e-4; fp16 5e-2)")
    p.add_argument("--parity-images", nargs="+", metavar="FILE", help="face crops for the check (default: astronaut)")
    p.add_argument("--arch", help="architecture of a checkpoint without description, e.g. acsinet18")
    p.add_argument("--label-names", type=label_names, metavar="NAME,NAME,...", help=f"{LABEL_NAMES_HELP}; see --arch")
    p.add_argument("--model-args", nargs="+", type=key_value, metavar="KEY=VALUE", help=MODEL_ARGS_HELP)
    p.add_argument("--grayscale", action="store_true", help="the model was trained on grayscale faces (no description)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def _print_result(result, args: argparse.Namespace) -> None:
    meta, report = result.metadata, result.parity
    c, h, w = meta.input_size
    axes = [a for a, free in (("batch", args.batch_size is None), ("height/width", meta.dynamic_size)) if free]
    exporter = f"{meta.exporter} exporter"
    if result.fallback_reason:
        exporter += f" (the dynamo exporter failed: {result.fallback_reason})"
    size_mb = os.path.getsize(result.path) / 1e6
    print(f"exported {meta.architecture} from {meta.source} -> {result.path} ({size_mb:.1f} MB)")
    print(f"graph: {meta.dtype}, opset {meta.opset}, {exporter}, free axes: {', '.join(axes) or 'none'}")
    print(f"labels: {', '.join(f'{i}={n}' for i, n in enumerate(meta.label_names))}")
    print(
        f"preprocessing: {'grayscale x3, ' if meta.grayscale else ''}{h}x{w}, crop_pct {meta.crop_pct:g} "
        f"({meta.crop_mode}), {meta.interpolation}, mean {list(meta.mean)}, std {list(meta.std)}"
    )
    print("parity vs PyTorch (onnxruntime, CPU):")
    width = max(len(case.name) for case in report.cases)
    for case in report.cases:
        n = case.shape[0]
        print(
            f"  {case.name:<{width}}  |logits diff| {case.max_abs_logits:.2e}  |softmax diff| "
            f"{case.max_abs_softmax:.2e}  same argmax {n - case.argmax_mismatches}/{n}"
        )
    print(f"  {report.summary()}")


def _import_export_extra(args: argparse.Namespace) -> None:
    """Check the ``[onnx]`` extra's packages this export needs before anything else."""
    import_extra("onnx", "onnx", "ONNX export")
    import_extra("onnxruntime", "onnx", "The parity check")
    if not args.parity_images:
        import_extra("skimage", "onnx", "The parity check without --parity-images")


def main(argv: Sequence[str], prog: str = "timm-acsi export") -> int:
    args = _parser(prog).parse_args(argv)
    _import_export_extra(args)
    from PIL import Image

    from ..export.export import check_output, export_onnx
    from ..inference import load_image
    from ..sources import load_model

    check_output(args.output, args.overwrite)  # before the model loads (a download, perhaps)
    images = {p: Image.fromarray(load_image(p)) for p in args.parity_images} if args.parity_images else None
    loaded = load_model(
        args.model,
        architecture=args.arch,
        label_names=args.label_names,
        model_args=dict(args.model_args) if args.model_args is not None else None,
        grayscale=True if args.grayscale else None,
    )
    result = export_onnx(
        loaded.model,
        args.output,
        label_names=loaded.label_names,
        architecture=loaded.architecture,
        data_config=loaded.data_config,
        grayscale=loaded.grayscale,
        source=loaded.source,
        weights_sha256=loaded.weights_sha256,
        dynamic_size=args.dynamic_size,
        batch_size=args.batch_size,
        opset=args.opset,
        fp16=args.fp16,
        exporter=args.exporter,
        tolerance=args.tolerance,
        images=images,
        overwrite=args.overwrite,
    )  # a failed parity check raises ParityError: exit 1 (timm_acsi.cli.ERRORS)
    _print_result(result, args)
    return 0


if __name__ == "__main__":
    from . import run_command

    sys.exit(run_command("export", sys.argv[1:]))
