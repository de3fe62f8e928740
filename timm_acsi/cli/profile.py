"""``timm-acsi profile``: model table (params, GFLOPs, activations vs the paper), CoConv parity and latency.

Exits 1 when a CoConv2d layer or a CoResNet differs from its standard-conv twin in params or FLOPs.
"""

import argparse
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import profiling
from ..checkpoint import atomic_write
from ..profiling import LATENCY_BASELINE, PAPER_FIGURES, LatencySettings, LayerParity, ModelParity, ProfileReport
from ._args import check_new_file, non_negative_int, positive_int

MAX_FAILURES_SHOWN = 5


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Params, GFLOPs (fvcore) and activations of CoResNet / ACSI-Net next to the paper's figures, a "
            "parity check of every CoConv2d layer (and of each CoResNet) against the standard conv it "
            "replaces, and optionally forward latency against timm's resnet18. Exits 1 if a parity check fails."
        ),
    )
    groups = ", ".join(f"'{g}'" for g in profiling.MODEL_GROUPS)
    p.add_argument(
        "--models",
        nargs="+",
        default=["18"],
        metavar="NAME",
        help=f"models, comma or space separated: groups {groups}, {', '.join(profiling.PROFILE_SPECS)}, or any "
        "timm model name (default: 18 = resnet18, coresnet18, acsinet18 and its attention placements)",
    )
    p.add_argument(
        "--img-size",
        "--image-size",
        dest="img_size",
        type=positive_int,
        default=224,
        help="input height and width (default 224)",
    )
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size for counts and latency (default 1)")
    p.add_argument(
        "--num-classes", type=positive_int, default=1000, help="classifier size (default 1000, as the paper)"
    )
    p.add_argument(
        "--count-elementwise",
        action="store_true",
        help="also count add/mul/sigmoid/hardswish (1 flop per output element) and mean (1 per input element)",
    )
    p.add_argument("--no-parity", action="store_true", help="skip the per-layer and whole-model parity checks")
    p.add_argument("--layers", action="store_true", help="print the verdict of every CoConv2d layer")
    p.add_argument("--latency", action="store_true", help="measure forward latency (benchmark; adds resnet18)")
    p.add_argument(
        "--device",
        nargs="+",
        metavar="DEVICE",
        help="latency devices, e.g. cpu cuda (default: cpu, plus cuda when a GPU is present; counts use cpu)",
    )
    p.add_argument("--channels-last", action="store_true", help="latency with channels_last memory format")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="latency warm-up forwards per model (default 3)")
    p.add_argument("--rounds", type=positive_int, default=7, help="latency rounds; the median is reported (default 7)")
    p.add_argument("--iters", type=positive_int, default=5, help="forwards per model per round (default 5)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="latency of the torch.compile'd models (inductor; on CPU it needs a C compiler such as gcc); one "
        "more warm-up forward per model compiles it, untimed",
    )
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write the table as Markdown (README, model cards)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every number as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing --markdown/--json files")
    return p


def _fmt_table(headers: Sequence[str], rows: List[Sequence[str]], markdown: bool = False) -> str:
    """A left-aligned first column and right-aligned numbers, as plain text or a Markdown table."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts).rstrip()

    if markdown:
        rule = "| " + " | ".join(":" + "-" * (w - 1) if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths))
        return "\n".join([line(headers), rule + " |", *map(line, rows)])
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def _diff(ours: float, paper: float) -> str:
    """Difference at the paper's precision (2 decimals): 0.00 means the paper's rounded figure is reproduced."""
    return f"{round(ours, 2) - paper:+.2f}"


def _table(report: ProfileReport, markdown: bool) -> str:
    """The model table; paper columns only where our setting is the paper's (1000 classes; for FLOPs also
    1x3x224x224 and the multiply-add convention, without --count-elementwise)."""
    paper_params = report.num_classes == profiling.PAPER_NUM_CLASSES
    paper_flops = report.input_size == profiling.PAPER_INPUT_SIZE and not report.count_elementwise
    latency = report.latency
    headers = ["model", "params", "M"] + (["paper M", "diff M"] if paper_params else [])
    headers += ["FLOPs", "GFLOPs"] + (["paper G", "diff G"] if paper_flops else []) + ["acts (M)"]
    if latency:
        for device in latency:
            headers += [f"ms {device}", f"x {LATENCY_BASELINE}"]
        headers += ["paper s", "paper x"]
    rows = []
    for spec in report.specs:
        prof, fig = report.profiles[spec.name], PAPER_FIGURES.get(spec.paper or "")
        row = [f"`{spec.name}`" if markdown else spec.name, f"{prof.params:,}", f"{prof.params_m:.2f}"]
        if paper_params:
            row += [f"{fig.params_m:.2f}", _diff(prof.params_m, fig.params_m)] if fig else ["", ""]
        row += [f"{prof.flops:,}", f"{prof.gflops:.2f}"]
        if paper_flops:
            row += [f"{fig.gflops:.2f}", _diff(prof.gflops, fig.gflops)] if fig else ["", ""]
        row.append(f"{prof.activations / 1e6:.2f}")
        if latency:
            for per_model in latency.values():
                lat, base = per_model[spec.name], per_model[LATENCY_BASELINE]
                row += [f"{lat.median_ms:.1f}", f"{lat.median_ms / base.median_ms:.3f}"]
            paper_ratio = fig and fig.time_s / PAPER_FIGURES[profiling.PAPER_TIME_BASELINE].time_s
            row += [f"{fig.time_s:.2f}", f"{paper_ratio:.3f}"] if fig else ["", ""]
        rows.append(row)
    return _fmt_table(headers, rows, markdown)


def _notes(report: ProfileReport) -> List[str]:
    """What the table counted, what the paper columns are, and which ops fvcore left out per model."""
    convention = (
        profiling.COUNTING_CONVENTION_ELEMENTWISE if report.count_elementwise else profiling.COUNTING_CONVENTION
    )
    lines = [f"Counting: {convention}. Activations: conv/linear output elements (fvcore ActivationCountAnalysis)."]
    papers = [f"`{s.name}` = {s.paper} ({PAPER_FIGURES[s.paper].source})" for s in report.specs if s.paper]
    if papers:
        lines.append(
            "Paper: Li, Zhu, Zhou, Entropy 2022, 24, 882; " + "; ".join(papers) + ". Paper time = seconds per "
            "test image on a GTX 1650. CA-a/CA-b are matched to our placements by parameter count (docs/design.md)."
        )
    variants = [f"`{s.name}` = {s.architecture}({_kwargs(s.model_args)})" for s in report.specs if s.model_args]
    if variants:
        lines.append("Placements: " + "; ".join(variants) + ".")
    groups: Dict[str, List[str]] = {}  # models with the same uncounted ops share a line
    for spec in report.specs:
        prof = report.profiles[spec.name]
        listed = ", ".join(f"{op} x{n}" for op, n in prof.unsupported_ops.items()) or "none"
        groups.setdefault(f"{listed} (unsupported by {prof.counter})", []).append(f"`{spec.name}`")
    lines += [f"Not counted in {', '.join(names)}: {ops}." for ops, names in groups.items()]
    return lines


def _kwargs(kwargs: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _layer_line(layer: LayerParity) -> str:
    verdict = "OK  " if layer.ok else "DIFF"
    return (
        f"{verdict} {layer.name}: in {'x'.join(map(str, layer.input_shape))} stride {layer.stride} "
        f"splits {list(layer.splits)} dilations {list(layer.dilations)}: params {layer.params:,} vs "
        f"{layer.reference_params:,}, FLOPs {layer.flops:,} vs {layer.reference_flops:,}, out "
        f"{'x'.join(map(str, layer.output_shape))} vs {'x'.join(map(str, layer.reference_output_shape))}"
    )


def _model_parity_line(mp: ModelParity) -> str:
    return (
        f"{'OK  ' if mp.ok else 'DIFF'} {mp.name} vs {mp.reference}: params {mp.params:,} vs "
        f"{mp.reference_params:,}, FLOPs {mp.flops:,} vs {mp.reference_flops:,}"
    )


def _markdown(report: ProfileReport, args: argparse.Namespace, settings: str) -> str:
    out = [f"Generated by `timm-acsi profile {' '.join(_argv_repro(args, report))}`".rstrip() + f" ({settings}).", ""]
    out += [_table(report, markdown=True), ""]
    out += [f"- {note}" for note in _notes(report)]
    if report.layer_parity:
        counts = ", ".join(f"`{n}` {sum(lp.ok for lp in ls)}/{len(ls)}" for n, ls in report.layer_parity.items())
        out.append(
            "- CoConv2d parity (params, FLOPs and output shape of each CoConv2d vs the nn.Conv2d it replaces, at "
            f"its input size in the model), layers equal: {counts}."
        )
    if report.model_parity:
        pairs = ", ".join(f"`{mp.name}` {'=' if mp.ok else '!='} `{mp.reference}`" for mp in report.model_parity)
        out.append(f"- Whole-model parity (params and FLOPs identical): {pairs}.")
    return "\n".join(out) + "\n"


def _argv_repro(args: argparse.Namespace, report: ProfileReport) -> List[str]:
    """The options that change the numbers, to print how the Markdown was generated."""
    argv = ["--models", *args.models]
    if args.img_size != 224:
        argv += ["--img-size", str(args.img_size)]
    if args.batch_size != 1:
        argv += ["--batch-size", str(args.batch_size)]
    if args.num_classes != 1000:
        argv += ["--num-classes", str(args.num_classes)]
    if args.count_elementwise:
        argv.append("--count-elementwise")
    timing = report.latency_settings
    if timing is not None:
        argv += ["--latency", "--device", *timing.devices]
        argv += (["--channels-last"] if timing.channels_last else []) + (["--compile"] if timing.compile else [])
    return argv


def _versions() -> Dict[str, str]:
    import timm

    versions = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        versions["fvcore"] = version("fvcore")
    except Exception:  # fvcore not installed: the FlopCounterMode fallback is used and says so
        versions["fvcore"] = "not installed"
    return versions


def _json_data(report: ProfileReport, versions: Dict[str, str]) -> Dict[str, Any]:
    """Every number of the run, for the README table and the Hub model cards."""
    latency, timing = report.latency, report.latency_settings
    return {
        "settings": {
            "input_size": list(report.input_size),
            "num_classes": report.num_classes,
            "count_elementwise": report.count_elementwise,
            "latency_devices": list(latency) if latency else None,
            "channels_last": timing.channels_last if timing else None,
        },
        "convention": _notes(report)[0],
        "versions": versions,
        "models": [
            {
                "name": s.name,
                "architecture": s.architecture,
                "model_args": s.model_args,
                **{k: v for k, v in asdict(report.profiles[s.name]).items() if k != "layer_parity"},  # listed below
                "gflops": report.profiles[s.name].gflops,
                "paper": asdict(PAPER_FIGURES[s.paper]) if s.paper else None,
                "latency": {d: asdict(lat[s.name]) for d, lat in latency.items()} if latency else None,
                "latency_ratio": (
                    {d: lat[s.name].median_ms / lat[LATENCY_BASELINE].median_ms for d, lat in latency.items()}
                    if latency
                    else None
                ),
            }
            for s in report.specs
        ],
        "layer_parity": {n: [{**asdict(lp), "ok": lp.ok} for lp in ls] for n, ls in report.layer_parity.items()},
        "model_parity": [{**asdict(mp), "ok": mp.ok} for mp in report.model_parity],
        "parity_passed": report.parity_passed,
    }


def _latency_settings(args: argparse.Namespace) -> Optional[LatencySettings]:
    """What ``--latency`` and its options ask for (default devices: cpu, and cuda when a GPU is present)."""
    if not args.latency:
        return None
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if any(torch.device(d).type == "cuda" for d in devices) and not torch.cuda.is_available():
        raise ValueError(f"--device {' '.join(devices)} asks for CUDA, which is not available.")
    return LatencySettings(tuple(devices), args.channels_last, args.warmup, args.rounds, args.iters, args.compile)


def _print_counts(report: ProfileReport) -> None:
    """The model table, what it counted and whether FlopCounterMode reproduced fvcore."""
    print()
    print(_table(report, markdown=False))
    print()
    for note in _notes(report):
        print(note.replace("`", ""))
    checked = report.cross_checked
    for n in checked:
        p = report.profiles[n]
        if not p.counters_agree:
            print(f"WARNING: FlopCounterMode counts {p.cross_check_flops:,} FLOPs for {n}, fvcore {p.flops:,}.")
    if checked and all(report.profiles[n].counters_agree for n in checked):
        print(
            "Cross-check: torch.utils.flop_counter.FlopCounterMode (no TorchScript) reproduces fvcore's FLOPs "
            f"exactly for all {len(checked)} fvcore-counted models."
        )


def _print_latency(report: ProfileReport, batch_size: int) -> None:
    """How the latency columns were measured, on which hardware."""
    timing = report.latency_settings
    hardware = ", ".join(
        f"{d}: {torch.cuda.get_device_name(d) if torch.device(d).type == 'cuda' else platform.machine()}"
        + ("" if torch.device(d).type == "cuda" else f" {torch.get_num_threads()} threads")
        for d in report.latency
    )
    print(
        f"Latency: median ms per forward of batch {batch_size} ({hardware}"
        f"{', channels_last' if timing.channels_last else ''}{', torch.compile' if timing.compile else ''}), "
        f"{timing.rounds} rounds x {timing.iters} forwards after {timing.warmup} warm-up"
        f"{' and one compiling forward' if timing.compile else ''}, models interleaved; 'x {LATENCY_BASELINE}' is the "
        "ratio to timm's resnet18 on the same device in this run. The paper's times are for another machine: compare "
        "ratios."
    )


def _print_parity(report: ProfileReport, all_layers: bool) -> None:
    """Each model's CoConv2d layers (failing ones, or all) and the whole-model twins, with the verdict."""
    print("\nCoConv2d parity: each layer vs the nn.Conv2d it replaces, counted at its input size in the model")
    for name, layers in report.layer_parity.items():
        bad = [lp for lp in layers if not lp.ok]
        strides = sorted({lp.stride for lp in layers})
        print(f"  {name}: {len(layers) - len(bad)}/{len(layers)} layers equal (strides {strides})")
        for lp in layers if all_layers else bad[:MAX_FAILURES_SHOWN]:
            print(f"    {_layer_line(lp)}")
        if not all_layers and len(bad) > MAX_FAILURES_SHOWN:
            print(f"    ... {len(bad) - MAX_FAILURES_SHOWN} more failing layers (--layers lists all)")
    if report.model_parity:
        print("Whole-model parity (params and FLOPs must be identical):")
    for mp in report.model_parity:
        print(f"  {_model_parity_line(mp)}")
    print("\nParity: " + ("PASSED" if report.parity_passed else "FAILED"))


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"Wrote {path}")


def main(argv: Sequence[str], prog: str = "timm-acsi profile") -> int:
    args = _parser(prog).parse_args(argv)
    specs = profiling.resolve_specs([n for arg in args.models for n in arg.split(",") if n])
    for path in (args.markdown, args.json):  # before profiling: nothing is computed only to be refused
        check_new_file(path, args.overwrite)
    latency = _latency_settings(args)
    input_size = (args.batch_size, 3, args.img_size, args.img_size)
    versions = _versions()
    settings = (
        f"input {'x'.join(map(str, input_size))}, num_classes={args.num_classes}, "
        f"torch {versions['torch']}, timm {versions['timm']}, fvcore {versions['fvcore']}"
    )
    print(f"{prog}: {settings}")

    report = profiling.profile_models(
        specs, input_size, args.num_classes, args.count_elementwise, parity=not args.no_parity, latency=latency
    )
    for name, prof in report.profiles.items():
        if prof.notice:
            print(f"NOTICE ({name}): {prof.notice}")
    _print_counts(report)
    if report.latency:
        _print_latency(report, args.batch_size)
    if report.parity_checked:
        _print_parity(report, args.layers)
    if args.markdown:
        _write(args.markdown, _markdown(report, args, settings))
    if args.json:
        _write(args.json, json.dumps(_json_data(report, versions), indent=2) + "\n")
    return 1 if report.parity_passed is False else 0


if __name__ == "__main__":
    from . import run_command

    sys.exit(run_command("profile", sys.argv[1:]))
