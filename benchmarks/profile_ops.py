"""Where the time goes: torch.profiler op tables of timm's resnet18 vs coresnet18 vs acsinet18 on the CPU.

For each model, batch size and mode (``forward``: eval mode under ``torch.inference_mode``; ``train``: train
mode, forward + cross-entropy + backward), the self CPU time of every op is summed over the profiled
iterations and attributed to a group by the module that ran it (backward ops through the autograd node's
forward op, as torch.profiler links them):

- ``3x3 convs (layer1-3)``: the convs CoConv replaces: CoConv2d modules in coresnet/acsinet (per-branch
  conv calls, weight slices, concatenation), plain 3x3 ``nn.Conv2d`` at the same places in resnet18;
- ``coordinate attention``: timm ``CoordAttn`` modules (pooling, cat/split, transposes, 1x1 convs,
  batch-norm, activations, gates, multiplies);
- ``rest``: everything else (stem, other convs, batch-norm, relu, residual adds, pooling, head, loss).

It prints the top ops per model (``group: op``, self time per iteration and its share) and a grouped summary
that compares each group with resnet18's. Models are profiled in turn, one step each, so that a change of
machine load hits all alike. The profiler adds a few microseconds per op, and marking a module costs about
0.1 ms per call (``(module python + hooks)``: compare resnet18's plain convs), so shares at batch 1 are a
little inflated for the many small ops; time ratios belong to ``timm-acsi profile --latency`` and
``benchmarks/scaling_sweep.py``. Run it niced on a shared machine::

    nice -n 19 python benchmarks/profile_ops.py --markdown ops.md      # the tables of docs/speed_ops.md
    python benchmarks/profile_ops.py --img-size 48 --batch-sizes 64 --modes train
"""

import argparse
import re
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
from timm.layers.coord_attn import CoordAttn
from torch import nn
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

import timm_acsi  # noqa: F401  (registers coresnet/acsinet with timm)
from timm_acsi.cli._args import non_negative_int, positive_int, refuse_existing_files
from timm_acsi.layers import CoConv2d

BASELINE = "resnet18"
CONVS, ATTN, REST = "3x3 convs (layer1-3)", "coordinate attention", "rest"
GROUPS = (CONVS, ATTN, REST)
MODES = ("forward", "train")
_REPLACED_CONV = re.compile(r"^layer[123]\.\d+\.conv[12]$")  # where CoResNet puts its CoConvs
_RANGE = "## "  # prefix of the record_function ranges that mark a group's modules
_BACKWARD_SCOPE = 1  # RecordScope.BACKWARD_FUNCTION: the event of an autograd node
#: Time inside a grouped module's range outside any op: its Python code and the marking hooks themselves.
MODULE_PYTHON = "(module python + hooks)"


def _group_of(name: str, module: nn.Module) -> Optional[str]:
    if isinstance(module, CoordAttn):
        return ATTN
    if isinstance(module, CoConv2d) or (
        type(module) is nn.Conv2d and module.kernel_size == (3, 3) and _REPLACED_CONV.match(name)
    ):
        return CONVS
    return None


def _mark_groups(model: nn.Module) -> None:
    """Wrap the forward of every grouped module in a ``record_function`` range named after its group."""
    for name, module in model.named_modules():
        group = _group_of(name, module)
        if group is None:
            continue
        ranges: List[record_function] = []

        def enter(mod, args, ranges=ranges, group=group) -> None:
            ranges.append(record_function(_RANGE + group).__enter__())

        def leave(mod, args, out, ranges=ranges) -> None:
            ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def _forward_group(event: FunctionEvent) -> str:
    while event is not None:
        if event.name.startswith(_RANGE):
            return event.name[len(_RANGE) :]
        event = event.cpu_parent
    return REST


def _backward_node(event: FunctionEvent) -> Optional[FunctionEvent]:
    """The autograd node an event ran for: itself or an ancestor of backward scope, or the node evaluated by
    an enclosing ``autograd::engine::evaluate_function`` (which also adds up gradients of reused tensors)."""
    while event is not None:
        if event.scope == _BACKWARD_SCOPE:
            return event
        if event.name.startswith("autograd::engine::evaluate_function"):
            return next((c for c in event.cpu_children if c.scope == _BACKWARD_SCOPE), None)
        event = event.cpu_parent
    return None


def attribute(events: List[FunctionEvent]) -> Dict[Tuple[str, str], Tuple[float, int]]:
    """``(group, op) -> (self CPU us, calls)`` over ``events``; backward ops go to their forward op's group."""
    forward_groups = {}
    for event in events:
        if event.sequence_nr >= 0 and _backward_node(event) is None:
            forward_groups.setdefault((event.sequence_nr, event.thread), _forward_group(event))
    table: Dict[Tuple[str, str], List[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        node = _backward_node(event)
        if node is None:
            group = _forward_group(event)
        else:
            group = forward_groups.get((node.sequence_nr, node.fwd_thread), REST)
        name = MODULE_PYTHON if event.name.startswith(_RANGE) else event.name
        entry = table[(group, name)]
        entry[0] += event.self_cpu_time_total
        entry[1] += 1
    return {key: (us, int(calls)) for key, (us, calls) in table.items()}


def _step(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "forward":
        model.eval()
        return lambda: model(x)
    model.train()
    y = torch.zeros(x.shape[0], dtype=torch.long)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    return train_step


def profile_setting(
    models: Dict[str, nn.Module], x: torch.Tensor, mode: str, warmup: int, iters: int
) -> Dict[str, Dict[Tuple[str, str], Tuple[float, float]]]:
    """Per model, ``(group, op) -> (self CPU ms per iteration, calls per iteration)`` over ``iters`` profiled
    steps, the models interleaved (one profiled step each in turn, the first rotating) as the benchmarks do."""
    steps = {name: _step(model, x, mode) for name, model in models.items()}
    names = list(steps)
    sums: Dict[str, Dict[Tuple[str, str], List[float]]] = {n: defaultdict(lambda: [0.0, 0]) for n in names}
    with ExitStack() as stack:
        if mode == "forward":
            stack.enter_context(torch.inference_mode())
        for step in steps.values():
            for _ in range(warmup):
                step()
        for i in range(iters):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    steps[name]()
                for key, (us, calls) in attribute(list(prof.events())).items():
                    sums[name][key][0] += us
                    sums[name][key][1] += calls
    return {n: {k: (us / 1e3 / iters, calls / iters) for k, (us, calls) in t.items()} for n, t in sums.items()}


def _by_group(table: Dict[Tuple[str, str], Tuple[float, float]]) -> Dict[str, float]:
    totals = dict.fromkeys(GROUPS, 0.0)
    for (group, _), (ms, _) in table.items():
        totals[group] += ms
    return totals


def op_table(name: str, table: Dict[Tuple[str, str], Tuple[float, float]], top: int) -> List[List[str]]:
    total = sum(ms for ms, _ in table.values())
    rows = sorted(table.items(), key=lambda kv: -kv[1][0])[:top]
    out = [[f"{g}: {op}", f"{ms:.2f}", f"{100 * ms / total:.1f}", f"{calls:g}"] for (g, op), (ms, calls) in rows]
    return out + [[f"total ({name})", f"{total:.2f}", "100.0", f"{sum(c for _, c in table.values()):g}"]]


def summary_table(groups: Dict[str, Dict[str, float]]) -> List[List[str]]:
    """One row per group: ms per iteration and share of each model, and the difference to resnet18."""
    rows = []
    base = groups.get(BASELINE)
    for group in (*GROUPS, "total"):
        row = [group]
        for name, g in groups.items():
            ms = sum(g.values()) if group == "total" else g[group]
            share = f" ({100 * ms / sum(g.values()):.0f}%)" if group != "total" else ""
            diff = ""
            if base is not None and name != BASELINE:
                ref = sum(base.values()) if group == "total" else base[group]
                diff = f" [{ms - ref:+.2f}]"
            row.append(f"{ms:.2f}{share}{diff}")
        rows.append(row)
    return rows


def _format(headers: List[str], rows: List[List[str]], markdown: bool) -> str:
    if markdown:
        align = ["---"] + ["---:"] * (len(headers) - 1)
        lines = [headers, align, *rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(headers), *map(fmt, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[BASELINE, "coresnet18", "acsinet18"])
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 32])
    parser.add_argument("--img-size", type=positive_int, default=224)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--num-classes", type=positive_int, default=1000, help="classifier size (default 1000, as the paper)"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="unprofiled steps per model and setting")
    parser.add_argument(
        "--iters", type=positive_int, default=3, help="profiled steps per model and setting (interleaved)"
    )
    parser.add_argument("--top", type=positive_int, default=15, help="ops listed per model")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the tables as Markdown")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --markdown file")
    args = parser.parse_args()
    refuse_existing_files(parser, [args.markdown], args.overwrite)  # before profiling: no work only to be refused
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: timm.create_model(name, num_classes=args.num_classes) for name in args.models}
    for model in models.values():
        _mark_groups(model)

    sections = []
    title = (
        f"torch.profiler self CPU time per iteration (ms), {args.img_size}x{args.img_size}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.iters} profiled iterations"
    )
    print(title)
    for batch_size in args.batch_sizes:
        x = torch.randn(batch_size, 3, args.img_size, args.img_size)
        for mode in args.modes:
            setting = f"batch {batch_size}, {'forward (eval)' if mode == 'forward' else 'forward + backward (train)'}"
            profiles = profile_setting(models, x, mode, args.warmup, args.iters)
            groups = {name: _by_group(table) for name, table in profiles.items()}
            tables = [(name, op_table(name, table, args.top)) for name, table in profiles.items()]
            summary = summary_table(groups)
            headers = ["group", *(f"{n} ms (share) [vs {BASELINE}]" for n in models)]
            op_headers = ["group: op", "self ms", "%", "calls"]
            print(f"\n== {setting}: grouped summary\n" + _format(headers, summary, False))
            md = [f"### {setting}", "", _format(headers, summary, True), ""]
            for name, rows in tables:
                print(f"\n-- {setting}: top ops of {name}\n" + _format(op_headers, rows, False))
                md += [f"Top ops of `{name}`:", "", _format(op_headers, rows, True), ""]
            sections.append("\n".join(md))
    if args.markdown:
        args.markdown.write_text(f"{title}.\n\n" + "\n".join(sections))
        print(f"\nwrote {args.markdown}")


if __name__ == "__main__":
    main()
