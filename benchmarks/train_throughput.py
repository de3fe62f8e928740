"""Training throughput (images/s, forward + backward + SGD step) of timm's resnet18 vs coresnet18 vs acsinet18.

All models are measured in the same process, in interleaved rounds (A B C, B C A, ...) so that a change in
machine load hits every model alike; the median round is reported with its ratio to resnet18::

    python benchmarks/train_throughput.py                       # batch 32 at 224x224, the paper's setting
    python benchmarks/train_throughput.py --img-size 48 --batch-size 64     # the FER-2013 setting
    python benchmarks/train_throughput.py --device cuda --amp --channels-last
    nice -n 19 python benchmarks/train_throughput.py --threads 1 --clock cpu  # on a CPU shared with other jobs

``benchmarks/scaling_sweep.py`` reuses the helpers below.
"""

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import timm
import torch

import timm_acsi  # noqa: F401  (registers coresnet/acsinet with timm)
from timm_acsi.cli._args import non_negative_int, positive_int

BASELINE = "resnet18"
#: ``wall``: elapsed time; ``cpu``: CPU time of the process (all its threads), for a machine shared with other
#: jobs, where a niced process waits for the CPU: use it with ``--threads 1`` (idle OpenMP threads spin).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer sees it done (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    """One SGD step (the paper's momentum 0.9, wd 5e-4) of ``model`` in train mode on the batch ``(x, y)``."""
    device = x.device
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def interleaved(
    steps: Dict[str, Callable[[], None]],
    iters: int,
    rounds: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, List[float]]:
    """Seconds per call of every step, one value per round; each round runs ``iters`` calls of each step in
    turn, the first step rotating between rounds so that none is always measured first."""
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = clock()
            for _ in range(iters):
                steps[name]()
            sync(device)
            times[name].append((clock() - start) / iters)
    return times


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The options of every model-vs-resnet18 benchmark here: device, AMP, memory format, threads, clock."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA, bf16 on CPU")
    parser.add_argument("--channels-last", action="store_true")
    add_clock_args(parser)


def add_clock_args(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--clock``, checked together by :func:`check_clock`."""
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall time (default), or the CPU time of this process (with --threads 1, on a CPU shared with other jobs)",
    )


def check_clock(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--clock cpu`` sums the CPU time of every thread, idle OpenMP threads' spinning included: one thread only."""
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (idle threads' spinning would be counted as work)")


def prepare_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Tuple[torch.device, torch.memory_format]:
    """Check the clock, put the baseline among ``args.models``, set the thread count; the run's device and memory
    format."""
    check_clock(parser, args)
    if BASELINE not in args.models:
        args.models.insert(0, BASELINE)
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device), torch.channels_last if args.channels_last else torch.contiguous_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[BASELINE, "coresnet18", "acsinet18"])
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--img-size", type=positive_int, default=224)
    parser.add_argument("--num-classes", type=positive_int, default=7)
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps per model before measuring")
    parser.add_argument("--iters", type=positive_int, default=5, help="timed steps per model per round")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds")
    add_run_args(parser)
    args = parser.parse_args()
    device, memory_format = prepare_run(parser, args)

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    steps = {}
    for name in args.models:
        model = timm.create_model(name, num_classes=args.num_classes).to(device, memory_format=memory_format)
        steps[name] = train_step(model, x, y, args.amp)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = interleaved(steps, args.iters, args.rounds, device, CLOCKS[args.clock])
    rates = {name: [args.batch_size / t for t in values] for name, values in times.items()}

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"train step throughput, batch {args.batch_size} at {args.img_size}x{args.img_size}, {device}{threads}, "
        f"amp={args.amp}, channels_last={args.channels_last}, {args.clock} clock, median of {args.rounds} rounds "
        f"x {args.iters} steps"
    )
    base = statistics.median(rates[BASELINE])
    print(f"{'model':<12} {'images/s':>10} {'min':>8} {'max':>8} {'img/s vs r18':>12}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<12} {median:>10.1f} {min(values):>8.1f} {max(values):>8.1f} {median / base:>12.3f}")


if __name__ == "__main__":
    main()
