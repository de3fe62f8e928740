"""How the cost of coresnet18 and acsinet18 grows with the work, relative to timm's resnet18.

Sweeps batch size x input size for inference (eval mode, ``torch.inference_mode``) and training (forward +
backward + SGD step, as ``benchmarks/train_throughput.py``). In each cell all models run in interleaved rounds
(the first model rotating) and the median round gives each model's time per call; the table shows the time
ratio to resnet18 (above 1: slower; a training throughput ratio is its inverse). Iterations scale inversely
with the work: each measurement runs enough calls to last about ``--min-time`` seconds, judged by a timed
warm-up call, and at least one. The plot shows the ratio against the work (images x pixels) per mode::

    python benchmarks/scaling_sweep.py --plot docs/images/scaling_sweep.png --markdown scaling.md
    python benchmarks/scaling_sweep.py --batch-sizes 1 32 --img-sizes 224 --modes inference --rounds 3
    nice -n 19 python benchmarks/scaling_sweep.py --threads 1 --clock cpu   # on a CPU shared with other jobs
"""

import argparse
import math
import statistics
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import timm
import torch
from PIL import Image, ImageDraw, ImageFont
from train_throughput import (
    BASELINE,
    CLOCKS,
    add_run_args,
    interleaved,
    prepare_run,
    sync,
    train_step,
)

import timm_acsi  # noqa: F401  (registers coresnet/acsinet with timm)
from timm_acsi.cli._args import positive_int, refuse_existing_files

MODES = ("inference", "training")
#: (mode, image size, batch size) -> model -> seconds per call
Results = Dict[Tuple[str, int, int], Dict[str, float]]


def inference_step(model: torch.nn.Module, x: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    """One forward of ``model`` in eval mode under ``torch.inference_mode`` (and autocast with ``amp``)."""
    model.eval()

    def step() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=amp):
            model(x)

    return step


def measure_cell(
    models: Dict[str, torch.nn.Module],
    mode: str,
    img_size: int,
    batch_size: int,
    args: argparse.Namespace,
    device: torch.device,
) -> Dict[str, float]:
    """Median seconds per call of every model on one batch size and input size."""
    clock = CLOCKS[args.clock]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=memory_format)
    if mode == "training":
        y = torch.randint(0, args.num_classes, (batch_size,), device=device)
        steps = {name: train_step(model, x, y, args.amp) for name, model in models.items()}
    else:
        steps = {name: inference_step(model, x, args.amp) for name, model in models.items()}
    for step in steps.values():
        step()  # untimed: first-call costs (allocations, weight layouts)
    sync(device)
    start = clock()
    steps[BASELINE]()
    sync(device)
    iters = max(1, math.ceil(args.min_time / max(clock() - start, 1e-9)))
    times = interleaved(steps, iters, args.rounds, device, clock)
    return {name: statistics.median(values) for name, values in times.items()}


def ratio_table(results: Results, names: Sequence[str], markdown: bool) -> str:
    """One row per cell: resnet18's time per call and every other model's time ratio to it."""
    others = [n for n in names if n != BASELINE]
    headers = ["mode", "img", "batch", f"{BASELINE} ms", *(f"{n} / {BASELINE}" for n in others)]
    rows = []
    for (mode, img_size, batch_size), times in results.items():
        base = times[BASELINE]
        rows.append(
            [mode, str(img_size), str(batch_size), f"{1e3 * base:.1f}", *(f"{times[n] / base:.3f}" for n in others)]
        )
    if markdown:
        lines = [headers, ["---"] + ["---:"] * (len(headers) - 1), *rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in (headers, *rows))


COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, shape: int, color: Tuple[int, int, int]) -> None:
    r = 5
    if shape == 0:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    elif shape == 1:
        draw.rectangle((x - r, y - r, x + r, y + r), fill=color)
    else:
        draw.polygon(((x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)), fill=color)


def plot(results: Results, names: Sequence[str], path: Path, title: str) -> None:
    """Time ratio to resnet18 vs work (images x pixels, log scale): one panel per mode, one line per model and
    input size through its batch sizes. Drawn with Pillow: timm-acsi does not depend on matplotlib."""
    others = [n for n in names if n != BASELINE]
    modes = [m for m in MODES if any(k[0] == m for k in results)]
    img_sizes = sorted({k[1] for k in results})
    work = {k: k[1] * k[1] * k[2] for k in results}
    ratios = {(k, n): t[n] / t[BASELINE] for k, t in results.items() for n in others}
    lo_x, hi_x = math.log10(min(work.values())), math.log10(max(work.values()))
    lo_y = min(1.0, *ratios.values())
    hi_y = max(1.0, *ratios.values())
    lo_y, hi_y = math.floor(lo_y * 20 - 1) / 20, math.ceil(hi_y * 20 + 1) / 20
    panel_w, panel_h, left, top, bottom = 560, 400, 70, 60, 60
    width = left + len(modes) * (panel_w + left) + 10
    height = top + panel_h + bottom + 24 * (len(others) + 1)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    draw.text((left, 12), title, fill="black", font=font)
    for p, mode in enumerate(modes):
        x0, y0 = left + p * (panel_w + left), top

        def xy(w: float, r: float, x0: int = x0, y0: int = y0) -> Tuple[float, float]:
            fx = (math.log10(w) - lo_x) / max(hi_x - lo_x, 1e-9)
            return x0 + 10 + fx * (panel_w - 20), y0 + panel_h - (r - lo_y) / (hi_y - lo_y) * panel_h

        draw.rectangle((x0, y0, x0 + panel_w, y0 + panel_h), outline="black")
        draw.text((x0, y0 - 22), f"{mode}: time / {BASELINE}'s time", fill="black", font=font)
        step = next((s for s in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0) if (hi_y - lo_y) / s <= 12), 10.0)
        tick = math.ceil(lo_y / step) * step
        while tick <= hi_y + 1e-9:
            _, ty = xy(10**lo_x, tick)
            draw.line((x0, ty, x0 + panel_w, ty), fill=(225, 225, 225) if abs(tick - 1) > 1e-9 else (90, 90, 90))
            draw.text((x0 - 40, ty - 7), f"{tick:.2f}", fill="black", font=small)
            tick += step
        for e in range(math.floor(lo_x), math.ceil(hi_x) + 1):
            if lo_x - 1e-9 <= e <= hi_x + 1e-9:
                tx, _ = xy(10**e, lo_y)
                draw.line((tx, y0 + panel_h, tx, y0 + panel_h + 5), fill="black")
                draw.text((tx - 12, y0 + panel_h + 8), f"1e{e}", fill="black", font=small)
        draw.text((x0 + panel_w // 2 - 110, y0 + panel_h + 26), "work: images x pixels (log)", fill="black", font=small)
        for m, name in enumerate(others):
            color = COLORS[m % len(COLORS)]
            for s, img_size in enumerate(img_sizes):
                cells = sorted((k for k in results if k[0] == mode and k[1] == img_size), key=lambda k: k[2])
                points = [xy(work[k], ratios[(k, name)]) for k in cells]
                if len(points) > 1:
                    draw.line(points, fill=color, width=2)
                for px, py in points:
                    _marker(draw, px, py, s, color)
    ly = top + panel_h + bottom
    for m, name in enumerate(others):
        draw.line((left, ly + 8, left + 30, ly + 8), fill=COLORS[m % len(COLORS)], width=3)
        draw.text((left + 38, ly), name, fill="black", font=small)
        ly += 24
    lx = left
    for s, img_size in enumerate(img_sizes):
        _marker(draw, lx + 5, ly + 8, s, (80, 80, 80))
        draw.text((lx + 16, ly), f"{img_size}x{img_size}", fill="black", font=small)
        lx += 110
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[BASELINE, "coresnet18", "acsinet18"])
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 8, 32, 64])
    parser.add_argument("--img-sizes", nargs="+", type=positive_int, default=[48, 112, 224])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--num-classes", type=positive_int, default=7)
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="interleaved rounds per cell; the median is reported"
    )
    parser.add_argument("--min-time", type=float, default=0.25, help="seconds each measurement lasts at least")
    add_run_args(parser)
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the ratios as a PNG")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table as Markdown")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --plot / --markdown files")
    args = parser.parse_args()
    refuse_existing_files(parser, [args.plot, args.markdown], args.overwrite)
    device, memory_format = prepare_run(parser, args)
    torch.manual_seed(0)
    models = {
        name: timm.create_model(name, num_classes=args.num_classes).to(device, memory_format=memory_format)
        for name in args.models
    }
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    title = (
        f"{device}{threads}, torch {torch.__version__}, amp={args.amp}, channels_last={args.channels_last}, "
        f"{args.clock} clock, median of {args.rounds} interleaved rounds"
    )
    print(f"time ratio to {BASELINE} ({title})")
    results: Results = {}
    for mode in args.modes:
        for img_size in args.img_sizes:
            for batch_size in args.batch_sizes:
                results[(mode, img_size, batch_size)] = measure_cell(models, mode, img_size, batch_size, args, device)
                times = results[(mode, img_size, batch_size)]
                ratios = "  ".join(f"{n} {times[n] / times[BASELINE]:.3f}" for n in args.models if n != BASELINE)
                print(f"  {mode} {img_size}x{img_size} batch {batch_size}: {ratios}", flush=True)
    print(ratio_table(results, args.models, markdown=False))
    if args.markdown:
        args.markdown.write_text(f"Time ratio to {BASELINE} ({title}).\n\n{ratio_table(results, args.models, True)}\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        plot(results, args.models, args.plot, f"coresnet18 / acsinet18 vs {BASELINE}: {title}")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
