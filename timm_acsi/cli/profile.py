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
from ..profiling import PAPER_FIGURES, LayerParity, ModelParity, ModelProfile, ProfileSpec
from ._args import non_negative_int, positive_int

MAX_FAILURES_SHOWN = 5
LATENCY_BASELINE = "resnet18"  # timm's model every latency is compared with, measured in the same run


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


def _table(
    specs: List[ProfileSpec],
    profiles: Dict[str, ModelProfile],
    latency: Optional[Dict[str, Dict[str, profiling.Latency]]],
    num_classes: int,
    markdown: bool,
) -> str:
    """The model table; paper columns only where our setting is the paper's (1000 classes; 1x3x224x224 for FLOPs)."""
    paper_params = num_classes == profiling.PAPER_NUM_CLASSES
    paper_flops = next(iter(profiles.values())).input_size == profiling.PAPER_INPUT_SIZE
    headers = ["model", "params", "M"] + (["paper M", "diff M"] if paper_params else [])
    headers += ["FLOPs", "GFLOPs"] + (["paper G", "diff G"] if paper_flops else []) + ["acts (M)"]
    if latency:
        for device in latency:
            headers += [f"ms {device}", f"x {LATENCY_BASELINE}"]
        headers += ["paper s", "paper x"]
    rows = []
    for spec in specs:
        prof, fig = profiles[spec.name], PAPER_FIGURES.get(spec.paper or "")
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


def _notes(specs: List[ProfileSpec], profiles: Dict[str, ModelProfile]) -> List[str]:
    """What the table counted, what the paper columns are, and which ops fvcore left out per model."""
    elementwise = next(iter(profiles.values())).count_elementwise
    convention = profiling.COUNTING_CONVENTION_ELEMENTWISE if elementwise else profiling.COUNTING_CONVENTION
    lines = [f"Counting: {convention}. Activations: conv/linear output elements (fvcore ActivationCountAnalysis)."]
    papers = [f"`{s.name}` = {s.paper} ({PAPER_FIGURES[s.paper].source})" for s in specs if s.paper]
    if papers:
        lines.append(
            "Paper: Li, Zhu, Zhou, Entropy 2022, 24, 882; " + "; ".join(papers) + ". Paper time = seconds per "
            "test image on a GTX 1650. CA-a/CA-b are matched to our placements by parameter count (docs/design.md)."
        )
    variants = [f"`{s.name}` = {s.architecture}({_kwargs(s.model_args)})" for s in specs if s.model_args]
    if variants:
        lines.append("Placements: " + "; ".join(variants) + ".")
    groups: Dict[str, List[str]] = {}  # models with the same uncounted ops share a line
    for spec in specs:
        prof = profiles[spec.name]
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


def _markdown(
    args: argparse.Namespace,
    specs: List[ProfileSpec],
    profiles: Dict[str, ModelProfile],
    latency: Optional[Dict[str, Dict[str, profiling.Latency]]],
    layer_parity: Dict[str, List[LayerParity]],
    model_parity: List[ModelParity],
    settings: str,
) -> str:
    out = [f"Generated by `timm-acsi profile {' '.join(_argv_repro(args))}`".rstrip() + f" ({settings}).", ""]
    out += [_table(specs, profiles, latency, args.num_classes, markdown=True), ""]
    out += [f"- {note}" for note in _notes(specs, profiles)]
    if layer_parity:
        counts = ", ".join(f"`{n}` {sum(lp.ok for lp in ls)}/{len(ls)}" for n, ls in layer_parity.items())
        out.append(
            "- CoConv2d parity (params, FLOPs and output shape of each CoConv2d vs the nn.Conv2d it replaces, at "
            f"its input size in the model), layers equal: {counts}."
        )
    if model_parity:
        pairs = ", ".join(f"`{mp.name}` {'=' if mp.ok else '!='} `{mp.reference}`" for mp in model_parity)
        out.append(f"- Whole-model parity (params and FLOPs identical): {pairs}.")
    return "\n".join(out) + "\n"


def _argv_repro(args: argparse.Namespace) -> List[str]:
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
    if args.latency:
        argv += ["--latency", "--device", *args.device] + (["--channels-last"] if args.channels_last else [])
    return argv


def _check_output(path: Optional[Path], overwrite: bool) -> None:
    """Refuse a ``--markdown``/``--json`` path that is a folder, or an existing file without ``--overwrite``."""
    if path is None:
        return
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: pass a file path (e.g. {path / 'table.md'}).")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it.")


def _versions() -> Dict[str, str]:
    import timm

    versions = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        versions["fvcore"] = version("fvcore")
    except Exception:  # fvcore not installed: the FlopCounterMode fallback is used and says so
        versions["fvcore"] = "not installed"
    return versions


def _json_data(
    args: argparse.Namespace,
    specs: List[ProfileSpec],
    profiles: Dict[str, ModelProfile],
    latency: Optional[Dict[str, Dict[str, profiling.Latency]]],
    layer_parity: Dict[str, List[LayerParity]],
    model_parity: List[ModelParity],
    versions: Dict[str, str],
    failed: bool,
) -> Dict[str, Any]:
    """Every number of the run, for the README table and the Hub model cards."""
    return {
        "settings": {
            "input_size": [args.batch_size, 3, args.img_size, args.img_size],
            "num_classes": args.num_classes,
            "count_elementwise": args.count_elementwise,
            "latency_devices": list(latency) if latency else None,
            "channels_last": args.channels_last if latency else None,
        },
        "convention": _notes(specs, profiles)[0],
        "versions": versions,
        "models": [
            {
                "name": s.name,
                "architecture": s.architecture,
                "model_args": s.model_args,
                **{k: v for k, v in asdict(profiles[s.name]).items() if k != "layer_parity"},  # listed below
                "gflops": profiles[s.name].gflops,
                "paper": asdict(PAPER_FIGURES[s.paper]) if s.paper else None,
                "latency": {d: asdict(lat[s.name]) for d, lat in latency.items()} if latency else None,
                "latency_ratio": (
                    {d: lat[s.name].median_ms / lat[LATENCY_BASELINE].median_ms for d, lat in latency.items()}
                    if latency
                    else None
                ),
            }
            for s in specs
        ],
        "layer_parity": {n: [{**asdict(lp), "ok": lp.ok} for lp in ls] for n, ls in layer_parity.items()},
        "model_parity": [{**asdict(mp), "ok": mp.ok} for mp in model_parity],
        "parity_passed": None if args.no_parity else not failed,
    }


def main(argv: Sequence[str], prog: str = "timm-acsi profile") -> int:
    args = _parser(prog).parse_args(argv)
    specs = profiling.resolve_specs([n for arg in args.models for n in arg.split(",") if n])
    for path in (args.markdown, args.json):  # before profiling: nothing is computed only to be refused
        _check_output(path, args.overwrite)
    if args.latency:
        args.device = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if any(torch.device(d).type == "cuda" for d in args.device) and not torch.cuda.is_available():
            raise ValueError(f"--device {' '.join(args.device)} asks for CUDA, which is not available.")
        if LATENCY_BASELINE not in {s.name for s in specs}:
            specs.insert(0, profiling.PROFILE_SPECS[LATENCY_BASELINE])

    input_size = (args.batch_size, 3, args.img_size, args.img_size)
    versions = _versions()
    settings = (
        f"input {'x'.join(map(str, input_size))}, num_classes={args.num_classes}, "
        f"torch {versions['torch']}, timm {versions['timm']}, fvcore {versions['fvcore']}"
    )
    print(f"{prog}: {settings}")

    models = {s.name: profiling.build_model(s, args.num_classes) for s in specs}
    profiles = {
        n: profiling.profile_model(m, input_size, args.count_elementwise, parity=not args.no_parity)
        for n, m in models.items()
    }
    for name, prof in profiles.items():
        if prof.notice:
            print(f"NOTICE ({name}): {prof.notice}")

    layer_parity = {n: p.layer_parity for n, p in profiles.items() if p.layer_parity}
    model_parity: List[ModelParity] = []
    if not args.no_parity:
        for spec in specs:
            if spec.reference:
                ref = spec.reference
                model_parity.append(profiling.compare_profiles(spec.name, profiles[spec.name], ref, profiles[ref]))

    latency = None
    if args.latency:
        latency = {  # CPU first: measure_latency moves the models to each device in turn
            d: profiling.measure_latency(
                models, input_size, d, args.channels_last, args.warmup, args.rounds, args.iters
            )
            for d in sorted(args.device, key=lambda d: torch.device(d).type != "cpu")
        }

    print()
    print(_table(specs, profiles, latency, args.num_classes, markdown=False))
    print()
    for note in _notes(specs, profiles):
        print(note.replace("`", ""))
    checked = [n for n, p in profiles.items() if p.counter == "fvcore"]
    for n in checked:
        p = profiles[n]
        if not p.counters_agree:
            print(f"WARNING: FlopCounterMode counts {p.cross_check_flops:,} FLOPs for {n}, fvcore {p.flops:,}.")
    if checked and all(profiles[n].counters_agree for n in checked):
        print(
            "Cross-check: torch.utils.flop_counter.FlopCounterMode (no TorchScript) reproduces fvcore's FLOPs "
            f"exactly for all {len(checked)} fvcore-counted models."
        )
    if latency:
        hardware = ", ".join(
            f"{d}: {torch.cuda.get_device_name(d) if torch.device(d).type == 'cuda' else platform.machine()}"
            + ("" if torch.device(d).type == "cuda" else f" {torch.get_num_threads()} threads")
            for d in latency
        )
        print(
            f"Latency: median ms per forward of batch {args.batch_size} ({hardware}"
            f"{', channels_last' if args.channels_last else ''}), {args.rounds} rounds x {args.iters} forwards "
            f"after {args.warmup} warm-up, models interleaved; 'x {LATENCY_BASELINE}' is the ratio to timm's "
            "resnet18 on the same device in this run. The paper's times are for another machine: compare ratios."
        )

    failed = False
    if not args.no_parity:
        print("\nCoConv2d parity: each layer vs the nn.Conv2d it replaces, counted at its input size in the model")
        for name, layers in layer_parity.items():
            bad = [lp for lp in layers if not lp.ok]
            strides = sorted({lp.stride for lp in layers})
            print(f"  {name}: {len(layers) - len(bad)}/{len(layers)} layers equal (strides {strides})")
            shown = layers if args.layers else bad[:MAX_FAILURES_SHOWN]
            for lp in shown:
                print(f"    {_layer_line(lp)}")
            if not args.layers and len(bad) > MAX_FAILURES_SHOWN:
                print(f"    ... {len(bad) - MAX_FAILURES_SHOWN} more failing layers (--layers lists all)")
            failed |= bool(bad)
        if model_parity:
            print("Whole-model parity (params and FLOPs must be identical):")
        for mp in model_parity:
            print(f"  {_model_parity_line(mp)}")
            failed |= not mp.ok
        print("\nParity: " + ("FAILED" if failed else "PASSED"))

    if args.markdown:
        text = _markdown(args, specs, profiles, latency, layer_parity, model_parity, settings)
        atomic_write(args.markdown, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"Wrote {args.markdown}")
    if args.json:
        data = _json_data(args, specs, profiles, latency, layer_parity, model_parity, versions, failed)
        text = json.dumps(data, indent=2) + "\n"
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"Wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    from . import run_command

    sys.exit(run_command("profile", sys.argv[1:]))
