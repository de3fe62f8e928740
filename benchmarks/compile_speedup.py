"""What ``torch.compile`` gives each model's forward: eager and compiled timed interleaved in one process.

``timm-acsi profile --latency --compile`` compares compiled models with each other; this script compares each
model with its own eager forward, in the same rounds (so a change of machine load hits both alike), and adds
the compiled and eager ratios to timm's resnet18::

    python benchmarks/compile_speedup.py                        # batch 1 at 224x224, resnet18/coresnet18/acsinet18
    python benchmarks/compile_speedup.py --img-size 48 --batch-size 64

Compiling (the first forward of each compiled model, inductor: needs a C compiler on CPU) is never timed.
"""

import argparse
from typing import Dict, List

import timm
import torch

import timm_acsi  # noqa: F401  (registers coresnet/acsinet with timm)
from timm_acsi.cli._args import positive_int
from timm_acsi.profiling import Latency, measure_latency

BASELINE = "resnet18"
COMPILED = " (compiled)"


def build_models(names: List[str], num_classes: int) -> Dict[str, torch.nn.Module]:
    """Each model twice: eager, and ``torch.compile`` of the same module (same weights)."""
    models: Dict[str, torch.nn.Module] = {}
    for name in names:
        model = timm.create_model(name, num_classes=num_classes).eval()
        models[name] = model
        models[name + COMPILED] = torch.compile(model)
    return models


def report(latency: Dict[str, Latency], names: List[str]) -> str:
    """One row per model: eager and compiled ms, compiled/eager, and both ratios to resnet18."""
    header = ("eager ms", "compiled ms", "compiled/eager", f"eager x {BASELINE}", f"compiled x {BASELINE}")
    rows = [f"{'model':<14} " + " ".join(f"{h:>20}" for h in header)]
    base, base_compiled = latency[BASELINE].median_ms, latency[BASELINE + COMPILED].median_ms
    for name in names:
        eager, compiled = latency[name].median_ms, latency[name + COMPILED].median_ms
        ratios = (compiled / eager, eager / base, compiled / base_compiled)
        cells = (f"{eager:.1f}", f"{compiled:.1f}", *(f"{r:.3f}" for r in ratios))
        rows.append(f"{name:<14} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=[BASELINE, "coresnet18", "acsinet18"], help="resnet18 is added")
    parser.add_argument("--img-size", type=positive_int, default=224)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--num-classes", type=positive_int, default=7)
    parser.add_argument("--rounds", type=positive_int, default=9, help="interleaved rounds; the median is reported")
    parser.add_argument("--iters", type=positive_int, default=5, help="forwards per model and round")
    parser.add_argument(
        "--warmup", type=positive_int, default=3, help="untimed forwards per model (at least 1: the first compiles)"
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if BASELINE not in args.models:
        args.models.insert(0, BASELINE)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build_models(args.models, args.num_classes)
    size = (args.batch_size, 3, args.img_size, args.img_size)
    latency = measure_latency(models, size, warmup=args.warmup, rounds=args.rounds, iters=args.iters)
    print(
        f"forward, batch {args.batch_size} at {args.img_size}x{args.img_size}, cpu, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, median of {args.rounds} interleaved rounds x {args.iters} forwards"
    )
    print(report(latency, args.models))


if __name__ == "__main__":
    main()
