"""``timm-acsi embed``: t-SNE maps of the pooled features of models on a dataset split (the paper's Fig. 4).

Each model is loaded by :func:`timm_acsi.sources.load_model` and fed the split with its own evaluation
preprocessing; all models see the same images (``--max-samples`` draws one stratified, seeded subset). The
figure shows one panel per model, points coloured by true class, with its silhouettes; ``--json`` keeps the
silhouettes, 2-D points and labels so the figure can be redrawn. Needs scikit-learn (``timm-acsi[embed]``).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from PIL import Image
from tqdm import tqdm

from .. import embed
from ..checkpoint import atomic_write
from ..data import LAYOUTS, build_dataset
from ..sources import load_model
from ..train.evaluation import dataset_display_name, resolve_layout
from ._args import add_loader_args, positive_int


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The command line of ``timm-acsi embed``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="t-SNE maps and silhouette scores of the pooled features of models on a FER dataset split.",
    )
    parser.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="SRC",
        help="one or more models: timm tag with weights, hf-hub:ORG/NAME, local-dir:PATH, training checkpoint or "
        "run folder; one panel each, in this order",
    )
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="dataset layout (default: auto)")
    parser.add_argument("--split", default="test", help="train, val or test (default: test)")
    parser.add_argument("--out", required=True, metavar="FIG.png", help="figure to write (PNG or another image suffix)")
    parser.add_argument("--json", metavar="FILE", help="also write silhouettes, 2-D points and labels as JSON")
    parser.add_argument(
        "--max-samples",
        type=positive_int,
        metavar="N",
        help="at most N images, drawn per class in the split's proportions with --seed (default: the whole split)",
    )
    parser.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset, t-SNE and drawing order (default: 0)")
    add_loader_args(parser)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads for features, t-SNE and silhouettes (default: all; 1 on a CPU busy with other jobs)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out / --json files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_outputs(out: str, json_path: Optional[str], overwrite: bool) -> str:
    """Refuse outputs that exist (without ``overwrite``), are folders, coincide or have no image suffix;
    returns the Pillow format of ``out``. Called before anything is computed."""
    Image.init()  # every plugin, so that Image.SAVE lists every format Pillow writes
    fmt = Image.registered_extensions().get(Path(out).suffix.lower())
    if fmt not in Image.SAVE:
        raise ValueError(f"--out {out} has no image suffix Pillow writes: name it FIG.png.")
    paths = [Path(p) for p in (out, json_path) if p]
    if json_path and Path(json_path).resolve() == Path(out).resolve():
        raise ValueError(f"--out and --json are the same file ({out}): give them different names.")
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise IsADirectoryError(f"{' and '.join(folders)} is a folder: pass a file name.")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{' and '.join(existing)} already exist(s): pass --overwrite to replace, or pick another name."
        )
    return fmt


def display_names(architectures: Sequence[str], sources: Sequence[str]) -> List[str]:
    """Panel titles: the architecture, with the source added where two models share one."""
    return [
        arch if architectures.count(arch) == 1 else f"{arch} ({source})" for arch, source in zip(architectures, sources)
    ]


def format_table(embeddings: Sequence[embed.Embedding]) -> str:
    """One row per model: samples, feature size, both silhouettes and seconds."""
    header = (
        f"{'model':<24} {'samples':>7} {'feature dim':>11} {'silhouette features':>19} {'silhouette 2-D':>14} "
        f"{'seconds':>8}"
    )
    rows = [
        f"{e.name:<24} {len(e.labels):>7d} {e.feature_dim:>11d} {e.silhouette_features:>19.4f} "
        f"{e.silhouette_2d:>14.4f} {e.seconds:>8.1f}"
        for e in embeddings
    ]
    return "\n".join([header, *rows])


def main(argv: Sequence[str], prog: str = "timm-acsi embed") -> int:
    """Load the models and the split, check everything, then embed, print the table and write the files."""
    args = build_parser(prog).parse_args(list(argv))
    fmt = check_outputs(args.out, args.json, args.overwrite)
    try:
        embed.require_sklearn()
    except ImportError as e:  # not in run_command's table (a bug's ImportError keeps its traceback)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    models = [load_model(source, args.device) for source in args.model]
    dataset = build_dataset(args.data, args.split, args.layout, num_classes=len(models[0].label_names))
    for loaded in models:
        embed.check_model_labels(loaded, dataset.label_names)
    indices = embed.stratified_indices(dataset.targets, args.max_samples, args.seed)
    embed.check_perplexity(args.perplexity, len(indices))
    embed.check_classes([dataset.targets[i] for i in indices])

    names = display_names([m.architecture for m in models], [m.source for m in models])
    embeddings = []
    for loaded, name in zip(models, names):
        with tqdm(total=len(indices), desc=name, unit="img", disable=args.quiet, file=sys.stderr) as bar:
            embeddings.append(
                embed.embed_model(
                    loaded,
                    dataset,
                    indices,
                    name=name,
                    perplexity=args.perplexity,
                    seed=args.seed,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    progress=bar.update,
                    threads=args.threads,
                )
            )
    dataset_name = dataset_display_name(args.data, resolve_layout(args.data, args.layout))
    title = f"t-SNE of pooled features: {dataset_name} {args.split}, {len(indices)} images"
    figure = embed.plot_embeddings(embeddings, dataset.label_names, title=title, seed=args.seed)

    print(format_table(embeddings))
    atomic_write(args.out, lambda tmp: figure.save(tmp, format=fmt))
    written = [args.out]
    if args.json:
        record = {
            "dataset": dataset_name,
            "split": args.split,
            "samples": len(indices),
            "max_samples": args.max_samples,
            "seed": args.seed,
            "perplexity": args.perplexity,
            "silhouette_metric": embed.SILHOUETTE_METRIC,
            "label_names": list(dataset.label_names),
            "models": [e.to_dict() for e in embeddings],
        }
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))
        written.append(args.json)
    print(f"wrote {' and '.join(written)}")
    return 0


if __name__ == "__main__":
    from . import run_command

    sys.exit(run_command("embed", sys.argv[1:]))
