"""``timm-acsi predict``: the expressions of the faces in photos, folders and videos.

Inputs are image files, folders (searched recursively, in sorted order) and video files (every ``--every``-th
frame). One line per face is printed; ``--json``/``--csv`` write the same rows to files, ``--annotate DIR`` the
images with boxes and labels, ``--cam DIR`` an attention overlay per face. Unreadable files are reported and
skipped; the exit status is 2 only when nothing could be read (or on bad arguments). No torch is imported at
module level: ``--backend onnxruntime`` runs without it.
"""

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Set, Tuple

from tqdm import tqdm

from ..extras import import_extra
from ..inference import (
    DEFAULT_MODEL,
    DETECTORS,
    VIDEO_SUFFIXES,
    ExpressionRecognizer,
    ImageResult,
    UnreadableImageError,
    UnreadableVideoError,
    annotate,
    load_image,
    read_frames,
)
from ..inference.results import face_rows, to_csv
from ..inference.video import open_video
from ._args import LABEL_NAMES_HELP, MODEL_ARGS_HELP, key_value, label_names, positive_int

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: images whose faces share one network batch
IMAGES_PER_STEP = 16


@dataclass(frozen=True)
class Item:
    """One input file and the name its outputs get (relative to the folder it was found in)."""

    path: Path
    name: Path
    video: bool


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Detect faces and recognise their expressions in images, folders and videos."
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or video files")
    parser.add_argument(
        "--model",
        help="timm tag with weights, hf-hub:ORG/NAME, local-dir:PATH, a training checkpoint (.safetensors) or run "
        f"folder (default: {DEFAULT_MODEL}, the shipped weights); with --backend onnxruntime an exported .onnx file",
    )
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch", help="default: torch")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format (torch)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (torch backend; the first batch compiles, about 30 s on a CPU): for long runs",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="faces per network batch (default: 32)")
    parser.add_argument("--arch", help="architecture, for checkpoints without a description (e.g. acsinet18)")
    parser.add_argument(
        "--label-names", type=label_names, metavar="NAME,NAME,...", help=f"{LABEL_NAMES_HELP}; see --arch"
    )
    parser.add_argument(
        "--model-args", nargs="+", type=key_value, metavar="KEY=VALUE", help=f"{MODEL_ARGS_HELP}; see --arch"
    )
    parser.add_argument(
        "--detector",
        choices=tuple(DETECTORS),
        default="haar",
        help="haar: OpenCV's frontal-face cascade (default); none: each image is one face crop",
    )
    parser.add_argument(
        "--margin", type=float, default=0.2, help="crop margin around each face box, as a fraction (default: 0.2)"
    )
    parser.add_argument(
        "--min-face",
        type=positive_int,
        default=24,
        help="skip faces smaller than this, in pixels (default: 24; the Haar cascade's 24 px window finds no smaller "
        "face, so a lower value only matters with --detector none)",
    )
    parser.add_argument(
        "--tta-flip",
        action="store_true",
        help="average each face's probabilities with its mirror image's (two forward passes, more accurate)",
    )
    parser.add_argument("--every", type=positive_int, default=1, help="video: every N-th frame (default: 1)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--csv", metavar="FILE", help="write one row per face as CSV")
    parser.add_argument("--annotate", metavar="DIR", help="write each image with boxes and labels drawn (PNG)")
    parser.add_argument("--cam", metavar="DIR", help="write an attention overlay per face (PNG); torch backend only")
    parser.add_argument(
        "--cam-method", choices=("cam", "gradcam"), default="cam", help="cam (exact, default) or gradcam"
    )
    parser.add_argument("--cam-layer", default="layer4", help="layer for --cam-method gradcam (default: layer4)")
    parser.add_argument("--cam-class", help="class name to map (default: each face's predicted class)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


# ------------------------------------------------------------------------------------------------- inputs


def collect_inputs(inputs: Sequence[str]) -> Tuple[List[Item], List[Tuple[str, str]]]:
    """Files to process, and ``(input, reason)`` for inputs that are missing or folders without images."""
    items, problems = [], []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES
            )
            if not found:
                problems.append((text, "folder holds no image or video files"))
            items += [Item(p, Path(path.resolve().name) / p.relative_to(path), _is_video(p)) for p in found]
        elif path.is_file():
            items.append(Item(path, Path(path.name), _is_video(path)))
        else:
            problems.append((text, "no such file or folder"))
    return _unique_names(items), problems


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _unique_names(items: List[Item]) -> List[Item]:
    """Output names without suffix, made unique (``-2``, ``-3``...) so no output overwrites another, also when
    an input's own name looks like a numbered one (``a-2.jpg``, ``a.jpg``, ``a.png``)."""
    used = {item.name.with_suffix("") for item in items}
    taken: Set[Path] = set()
    unique = []
    for item in items:
        stem = name = item.name.with_suffix("")
        n = 1
        while name in taken or (name != stem and name in used):
            n += 1
            name = stem.with_name(f"{stem.name}-{n}")
        taken.add(name)
        unique.append(Item(item.path, name, item.video))
    return unique


def existing_outputs(args: argparse.Namespace, items: Sequence[Item]) -> List[str]:
    """Output files this run would write that already exist (for videos: their non-empty frame folders)."""
    found = [f for f in (args.json, args.csv) if f and Path(f).exists()]
    for folder, pattern in ((args.annotate, "{}.png"), (args.cam, "{}_face*.png")):
        if not folder:
            continue
        for item in items:
            out = Path(folder) / item.name
            if item.video:
                found += [str(out)] if out.is_dir() and any(out.iterdir()) else []
            else:
                found += [str(p) for p in out.parent.glob(pattern.format(_glob_escape(out.name)))]
    return found


def outputs_over_inputs(args: argparse.Namespace, items: Sequence[Item]) -> List[str]:
    """Input files that an output of this run would replace: refused even with ``--overwrite``."""
    inputs = {item.path.resolve(): item for item in items}
    planned = [Path(f) for f in (args.json, args.csv) if f]
    if args.annotate:
        planned += [_annotated_path(args.annotate, item.name) for item in items if not item.video]
    hits = [str(inputs[p].path) for p in (p.resolve() for p in planned) if p in inputs]
    if args.cam:
        prefixes = {(Path(args.cam) / item.name).resolve() for item in items}
        for path in inputs:
            match = re.fullmatch(r"(.*)_face\d+\.png", path.name)
            if match and path.with_name(match.group(1)) in prefixes:
                hits.append(str(inputs[path].path))
    return hits


def _annotated_path(folder: str, name: Path) -> Path:
    """Where ``--annotate`` writes the picture of output name ``name``."""
    return Path(folder) / name.with_name(name.name + ".png")


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Report:
    """What a run found: results (with their item) and the files that could not be read."""

    results: List[Tuple[Item, ImageResult]]
    unreadable: List[Tuple[str, str]]
    frames: int = 0


def run(rec: ExpressionRecognizer, items: Sequence[Item], args: argparse.Namespace, report: Report) -> None:
    """Predict every item, writing pictures as results come; unreadable files go to ``report.unreadable``."""
    images = [i for i in items if not i.video]
    attention = args.cam_method if args.cam else None
    kwargs = dict(attention=attention, attention_layer=args.cam_layer, attention_class=args.cam_class)
    with tqdm(total=len(images), unit="img", disable=args.quiet or len(images) <= 1, file=sys.stderr) as bar:
        for start in range(0, len(images), IMAGES_PER_STEP):
            step = images[start : start + IMAGES_PER_STEP]
            loaded = []
            for item in step:
                try:
                    loaded.append((item, load_image(item.path)))
                except UnreadableImageError as e:
                    report.unreadable.append((str(item.path), str(e)))
                    bar.write(f"skipped: {e}", file=sys.stderr)
            results = rec.predict([a for _, a in loaded], sources=[str(i.path) for i, _ in loaded], **kwargs)
            for (item, array), result in zip(loaded, results):
                _save_pictures(args, item.name, array, result)
                report.results.append((item, result))
            bar.update(len(step))
    for item in (i for i in items if i.video):
        try:
            _run_video(rec, item, args, report, kwargs)
        except UnreadableVideoError as e:
            report.unreadable.append((str(item.path), str(e)))
            print(f"skipped: {e}", file=sys.stderr)


def _run_video(
    rec: ExpressionRecognizer, item: Item, args: argparse.Namespace, report: Report, kwargs: Dict[str, Any]
) -> None:
    """Every ``args.every``-th frame of one video, ``IMAGES_PER_STEP`` frames per call of the recognizer."""
    capture, count = open_video(item.path)
    capture.release()
    total = math.ceil(count / args.every) if count else None
    frames = read_frames(item.path, args.every)
    with tqdm(total=total, unit="frame", desc=item.path.name, disable=args.quiet, file=sys.stderr) as bar:
        while batch := [f for _, f in zip(range(IMAGES_PER_STEP), frames)]:
            results = rec.predict([a for _, a in batch], sources=[str(item.path)] * len(batch), **kwargs)
            for (index, array), result in zip(batch, results):
                result.frame = index
                _save_pictures(args, item.name / f"frame_{index:06d}", array, result)
                report.results.append((item, result))
            report.frames += len(batch)
            bar.update(len(batch))


def _save_pictures(args: argparse.Namespace, name: Path, array, result: ImageResult) -> None:
    if args.annotate:
        path = _annotated_path(args.annotate, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        annotate(array, result).save(path)
    if args.cam:
        for i, face in enumerate(result.faces):
            path = Path(args.cam) / name.with_name(f"{name.name}_face{i}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            face.attention.save(path)


# ---------------------------------------------------------------------------------------------- outputs


def rows(report: Report) -> List[Dict[str, Any]]:
    """One row per face, and one row with ``face: None`` per image or frame without a face."""
    return face_rows(_pairs(report))


def _pairs(report: Report) -> List[Tuple[str, ImageResult]]:
    return [(str(item.path), result) for item, result in report.results]


def to_json(report: Report, rec: ExpressionRecognizer, args: argparse.Namespace) -> str:
    doc = {
        "model": rec.backend.source,
        "label_names": list(rec.label_names),
        "detector": args.detector,
        "tta_flip": rec.tta_flip,
        "rows": rows(report),
        "small_faces": [
            {"file": str(item.path), "frame": result.frame, "box": list(d.box), "detection_score": d.score}
            for item, result in report.results
            for d in result.skipped
        ],
        "unreadable": [{"file": f, "error": e} for f, e in report.unreadable],
    }
    return json.dumps(doc, indent=2) + "\n"


def format_table(report: Report, label_names: Sequence[str]) -> str:
    heads = ["file", "frame", "face", "box x,y,w,h", "det", "label", "score", *(n[:5] for n in label_names)]
    table = []
    for row in rows(report):
        lead = [row["file"], "-" if row["frame"] is None else str(row["frame"])]
        if row["face"] is None:
            table.append([*lead, "-", "-", "-", "no face found"])
            continue
        det = "-" if row["detection_score"] is None else f"{row['detection_score']:.2f}"
        probs = [f"{row['probabilities'][n]:.2f}" for n in label_names]
        box = ",".join(map(str, row["box"]))
        table.append([*lead, str(row["face"]), box, det, row["label"], f"{row['score']:.2f}", *probs])
    widths = [max([len(h)] + [len(r[i]) for r in table if len(r) > i]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines)


def summary(report: Report) -> str:
    images = sum(1 for i, r in report.results if r.frame is None)
    videos = len({str(i.path) for i, r in report.results if r.frame is not None})
    faces = sum(len(r.faces) for _, r in report.results)
    empty = sum(1 for _, r in report.results if not r.faces)
    skipped = sum(len(r.skipped) for _, r in report.results)
    parts = [f"{images} image{'s' * (images != 1)}"]
    if videos:
        parts.append(f"{videos} video{'s' * (videos != 1)} ({report.frames} frames)")
    text = f"{', '.join(parts)}: {faces} face{'s' * (faces != 1)}"
    if empty:
        text += f", {empty} without a face"
    if skipped:
        text += f", {skipped} face{'s' * (skipped != 1)} below --min-face skipped"
    if report.unreadable:
        text += f"; {len(report.unreadable)} unreadable file{'s' * (len(report.unreadable) != 1)} skipped"
    return text + "."


# ------------------------------------------------------------------------------------------------- main


def make_recognizer(args: argparse.Namespace) -> ExpressionRecognizer:
    """The recognizer of ``args``: torch backend by default, onnxruntime (imported only then) on request."""
    common = dict(
        detector=args.detector,
        margin=args.margin,
        min_face_size=args.min_face,
        batch_size=args.batch_size,
        tta_flip=args.tta_flip,
    )
    if args.backend == "torch":
        load = dict(architecture=args.arch, label_names=args.label_names)
        if args.model_args is not None:
            load["model_args"] = dict(args.model_args)
        load = {k: v for k, v in load.items() if v is not None}
        return ExpressionRecognizer(
            args.model or DEFAULT_MODEL,
            device=args.device,
            channels_last=args.channels_last,
            compile=args.compile,
            **common,
            **load,
        )
    from ..export.ort_backend import OnnxBackend

    return ExpressionRecognizer(OnnxBackend(args.model), **common)


def check_args(args: argparse.Namespace) -> None:
    """Refuse options that do not go together."""
    if args.backend == "torch" and args.model and args.model.lower().endswith(".onnx"):
        raise ValueError(f"{args.model} is an exported ONNX model: run it with --backend onnxruntime.")
    if args.backend == "onnxruntime" and args.model is None:
        raise ValueError("--backend onnxruntime runs an exported model: pass --model FILE.onnx (see timm-acsi export).")
    if args.backend == "onnxruntime" and args.cam:
        raise ValueError(
            "--cam needs the torch backend (attention maps come from the PyTorch model): drop --cam or the backend."
        )
    if args.backend == "onnxruntime" and args.compile:
        raise ValueError("--compile compiles the PyTorch model; an .onnx file runs in onnxruntime: drop one of them.")
    if args.backend == "onnxruntime" and (args.arch or args.label_names or args.model_args):
        raise ValueError(
            "--arch/--label-names/--model-args describe torch checkpoints; an exported .onnx file carries its own."
        )
    if (args.cam_class or args.cam_method != "cam") and not args.cam:
        raise ValueError("--cam-class and --cam-method choose the attention maps of --cam DIR: pass --cam DIR too.")
    if args.margin < 0:
        raise ValueError(f"--margin must be >= 0, got {args.margin}.")


def check_extras(args: argparse.Namespace, items: Sequence[Item]) -> None:
    """The optional packages this run needs (onnxruntime, OpenCV), checked before the model loads."""
    if args.backend == "onnxruntime":
        import_extra("onnxruntime", "onnx", "--backend onnxruntime")
        import_extra("onnx", "onnx", "--backend onnxruntime")
    if args.detector == "haar":
        import_extra("cv2", "predict", "Face detection (--detector haar)")
    if any(item.video for item in items):
        import_extra("cv2", "predict", "Reading videos")


def readable_inputs(args: argparse.Namespace) -> Tuple[List[Item], List[Tuple[str, str]]]:
    """The files to read (inputs that are missing or empty are reported and skipped); none at all, or outputs
    that exist without ``--overwrite``, raise."""
    items, missing = collect_inputs(args.inputs)
    for text, reason in missing:
        print(f"skipped: {text}: {reason}", file=sys.stderr)
    if not items:
        raise ValueError("nothing to read: " + "; ".join(f"{t}: {r}" for t, r in missing))
    over = outputs_over_inputs(args, items)
    if over:
        shown = _some(over)
        raise ValueError(
            f"the outputs would replace input file{'s' * (len(over) > 1)} {shown}: write --annotate/--cam/--json/--csv "
            "to another folder or file."
        )
    existing = existing_outputs(args, items)
    if existing and not args.overwrite:
        shown = _some(existing)
        raise FileExistsError(
            f"{shown} already exist{'s' * (len(existing) == 1)}: pass --overwrite to replace, or pick another output."
        )
    return items, missing


def _some(paths: Sequence[str], n: int = 3) -> str:
    """The first ``n`` paths, and how many more."""
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def main(argv: Sequence[str], prog: str = "timm-acsi predict") -> int:
    args = build_parser(prog).parse_args(list(argv))
    check_args(args)
    items, missing = readable_inputs(args)
    check_extras(args, items)
    rec = make_recognizer(args)
    report = Report([], list(missing))
    run(rec, items, args, report)
    if not report.results:
        raise ValueError(f"no input could be read ({summary(report)})")
    print(format_table(report, rec.label_names))
    print(summary(report))
    for name, text in (
        (args.json, lambda: to_json(report, rec, args)),
        (args.csv, lambda: to_csv(_pairs(report), rec.label_names)),
    ):
        if name:
            Path(name).parent.mkdir(parents=True, exist_ok=True)
            Path(name).write_text(text())
    return 0


if __name__ == "__main__":
    from . import run_command

    sys.exit(run_command("predict", sys.argv[1:]))
