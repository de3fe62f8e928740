"""Inference latency of PyTorch (eager) vs onnxruntime for timm's resnet18, coresnet18 and acsinet18.

Each model is exported with ``timm_acsi.export.export_onnx`` (parity checked) into a temporary folder, then run
by both runtimes with the same number of CPU threads, in interleaved rounds (A B C, B C A, ...) so that a change
in machine load hits every model alike. Reported: median latency per batch, the torch/onnxruntime speed-up and
each runtime's time ratio to resnet18 in the same run (``t/r18``: above 1 is slower)::

    python benchmarks/export_latency.py                                  # batch 1 and 32 at 224x224
    python benchmarks/export_latency.py --img-size 112 --rounds 2 --iters 5 --large-iters 1 --threads 2
    python benchmarks/export_latency.py --threads 1 --clock cpu      # on a CPU shared with other jobs
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import onnxruntime as ort
import timm
import torch
from train_throughput import CLOCKS, add_clock_args, check_clock

from timm_acsi.cli._args import non_negative_int, positive_int
from timm_acsi.export import OnnxBackend, export_onnx
from timm_acsi.labels import FER7_LABELS

BASELINE = "resnet18"
RUNTIMES = ("torch", "onnxruntime")


def _mean_ms(fn: Callable[[], object], iters: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(iters):
        fn()
    return (clock() - start) / iters * 1e3


def _runners(models: Dict[str, torch.nn.Module], folder: Path, args: argparse.Namespace) -> Dict[str, Tuple]:
    """name -> (torch model, OnnxBackend), each model exported and parity-checked first."""
    runners = {}
    for name, model in models.items():
        start = time.perf_counter()
        result = export_onnx(model, folder / f"{name}.onnx", label_names=FER7_LABELS, architecture=name)
        print(
            f"exported {name} ({result.exporter}, {time.perf_counter() - start:.0f} s): {result.parity.summary()}",
            flush=True,
        )
        runners[name] = (model, OnnxBackend(result.path, threads=args.threads))
    return runners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[BASELINE, "coresnet18", "acsinet18"])
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 32])
    parser.add_argument("--img-size", type=positive_int, default=224)
    parser.add_argument(
        "--warmup", type=non_negative_int, default=1, help="untimed calls per model, runtime and batch size"
    )
    parser.add_argument("--iters", type=positive_int, default=10, help="timed calls per round at batch sizes up to 8")
    parser.add_argument(
        "--large-iters", type=positive_int, default=2, help="timed calls per round at larger batch sizes"
    )
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds")
    add_clock_args(parser)
    args = parser.parse_args()
    check_clock(parser, args)
    if BASELINE not in args.models:
        args.models.insert(0, BASELINE)
    args.threads = args.threads or torch.get_num_threads()  # both runtimes get the same number
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    size = (3, args.img_size, args.img_size)
    models = {
        name: timm.create_model(name, num_classes=len(FER7_LABELS), pretrained_cfg_overlay=dict(input_size=size)).eval()
        for name in args.models
    }
    inputs = {bs: torch.randn(bs, *size) for bs in args.batch_sizes}
    times: Dict[Tuple[str, str, int], List[float]] = {}
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        runners = _runners(models, Path(folder), args)
        calls = {}
        for name, (model, backend) in runners.items():
            for bs, x in inputs.items():
                array = np.ascontiguousarray(x.numpy())
                calls[name, "torch", bs] = lambda m=model, x=x: m(x)
                calls[name, "onnxruntime", bs] = lambda b=backend, a=array: b(a)
        for fn in calls.values():
            for _ in range(args.warmup):
                fn()
        keys = list(calls)
        for r in range(args.rounds):  # the first call rotates between rounds: none is always measured first
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                fn = calls[key]
                iters = args.iters if key[2] <= 8 else args.large_iters
                times.setdefault(key, []).append(_mean_ms(fn, iters, CLOCKS[args.clock]))

    print(
        f"\ninference {'latency' if args.clock == 'wall' else 'CPU time'} per batch at {args.img_size}x{args.img_size},"
        f" cpu, {args.threads} threads for torch "
        f"{torch.__version__} (eager, inference_mode) and onnxruntime {ort.__version__} (CPUExecutionProvider), "
        f"median of {args.rounds} rounds (x {args.iters} calls at batch <= 8, x {args.large_iters} above)"
    )
    header = f"{'model':<12} {'batch':>5} {'torch ms':>10} {'ORT ms':>10} {'torch/ORT':>10} {'torch t/r18':>13} "
    rate = "ORT img/s" if args.clock == "wall" else "ORT img/cpu-s"
    print(header + f"{'ORT t/r18':>11} {rate:>13}")
    for bs in args.batch_sizes:
        base = {rt: statistics.median(times[BASELINE, rt, bs]) for rt in RUNTIMES}
        for name in args.models:
            t, o = (statistics.median(times[name, rt, bs]) for rt in RUNTIMES)
            print(
                f"{name:<12} {bs:>5} {t:>10.1f} {o:>10.1f} {t / o:>10.2f} {t / base['torch']:>13.3f} "
                f"{o / base['onnxruntime']:>11.3f} {bs / o * 1e3:>13.1f}"
            )


if __name__ == "__main__":
    main()
