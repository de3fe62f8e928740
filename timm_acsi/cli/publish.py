"""``timm-acsi publish``: check a checkpoint and publish it to the Hugging Face Hub in timm's format."""

import argparse
import json
import sys
from typing import Sequence

from ..hub import publish
from ._args import LABEL_NAMES_HELP, MODEL_ARGS_HELP, key_value, label_names

EXAMPLES = """examples:
  timm-acsi publish --model acsinet18 --checkpoint run/best.safetensors --repo-id ORG/acsinet18.rafdb \\
      --metrics run/metrics.json --dry-run out/acsinet18.rafdb
  timm-acsi publish --checkpoint run/best.safetensors --repo-id ORG/acsinet18.rafdb --metrics run/metrics.json

Authentication is huggingface_hub's: run `hf auth login` once, or set HF_TOKEN.
Checkpoints with timm-acsi meta (from `timm-acsi train`) need no --model/--num-classes/--label-names."""


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Validate a checkpoint (strict load, label names, finite forward pass), write the timm Hub "
        "files (model.safetensors, config.json, README.md model card) and upload them in one commit.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="weights: .safetensors (or .pth/.pt/.bin, tensors only)")
    p.add_argument("--repo-id", required=True, help="Hub repo ORG/NAME, e.g. my-org/acsinet18.rafdb")
    p.add_argument("--model", help="architecture (default: the checkpoint's meta), e.g. acsinet18")
    p.add_argument("--num-classes", type=int, help="head size (default: meta, else the number of label names)")
    p.add_argument(
        "--label-names", type=label_names, metavar="NAME,NAME,...", help=f"{LABEL_NAMES_HELP} (default: meta)"
    )
    p.add_argument("--model-args", nargs="+", type=key_value, metavar="KEY=VALUE", help=MODEL_ARGS_HELP)
    p.add_argument("--dataset", help="training dataset for the card (default: meta), e.g. RAF-DB")
    p.add_argument("--license", help="license of the weights (default: other; mind the dataset's terms)")
    p.add_argument("--metrics", help="evaluation results JSON for the card (metrics.json from evaluate/train)")
    p.add_argument(
        "--private", action="store_true", help="create the repo as private (an existing repo keeps its setting)"
    )
    p.add_argument("--revision", default="main", help="branch to commit to (created if missing; default: main)")
    p.add_argument("--commit-message", help="commit message (default: describes model, dataset and accuracy)")
    p.add_argument("--dry-run", metavar="OUT_DIR", help="write the Hub files to a new or empty OUT_DIR; upload nothing")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the size; loads into fp32)")
    p.add_argument("--card-notes", metavar="FILE", help="markdown added to the model card (recipe, more results)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the Hub files of an earlier dry run in OUT_DIR (files publish did not write are never "
        "replaced) or those on the Hub revision",
    )
    return p


def main(argv: Sequence[str], prog: str = "timm-acsi publish") -> int:
    args = _parser(prog).parse_args(argv)
    result = publish(
        args.checkpoint,
        args.repo_id,
        model=args.model,
        num_classes=args.num_classes,
        label_names=args.label_names,
        model_args=dict(args.model_args) if args.model_args is not None else None,
        dataset=args.dataset,
        license=args.license,
        metrics=args.metrics,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        dry_run_dir=args.dry_run,
        overwrite=args.overwrite,
        fp16=args.fp16,
        card_notes=args.card_notes,
    )

    spec = result.spec
    print(
        f"checked: {args.checkpoint} loads strictly into {spec.architecture} ({spec.num_classes} classes), "
        "forward pass finite"
    )
    if spec.model_args:
        print(f"model_args: {json.dumps(spec.model_args)}")
    print(f"labels: {', '.join(f'{i}={n}' for i, n in enumerate(spec.label_names))}")
    print(f"params: {result.params:,}  GFLOPs: {result.gflops:.2f} at {spec.input_size[1]}x{spec.input_size[2]}")
    m = result.metrics
    if m is not None:
        acc = "n/a" if m.accuracy is None else f"{m.accuracy:.2f}%"
        mca = "n/a" if m.mean_class_accuracy is None else f"{m.mean_class_accuracy:.2f}%"
        print(f"results: top-1 {acc}, mean class {mca}")
    print(f"files: {', '.join(result.files)}")
    if result.folder is not None:
        print(
            f"dry run: wrote {result.folder} (nothing uploaded). Load it with "
            f"timm.create_model('local-dir:{result.folder}', pretrained=True) after `import timm_acsi`."
        )
    else:
        print(f"published {args.repo_id}@{args.revision}: {result.commit_message}")
        if result.commit_url:
            print(f"commit: {result.commit_url}")
        print(f"load: timm.create_model('hf-hub:{args.repo_id}', pretrained=True) after `import timm_acsi`")
    return 0


if __name__ == "__main__":
    from . import run_command

    sys.exit(run_command("publish", sys.argv[1:]))
