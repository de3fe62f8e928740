"""``timm-acsi demo``: the browser demo on a local web server (Gradio; ``pip install "timm-acsi[demo]"``).

Every model is loaded once, before the server starts: the shipped tags (offline) and each ``--model`` given
(the sources ``timm-acsi predict`` takes, or an exported ``.onnx`` file). The server binds to 127.0.0.1 unless
``--host`` says otherwise, and opens a public link only with ``--share``. Ctrl-C stops it.
"""

import argparse
import sys
import time
from typing import Sequence

from ..extras import import_extra
from ..inference import DETECTORS
from ._args import positive_int


def port_number(text: str) -> int:
    """A TCP port, 1..65535."""
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Start the browser demo: upload a photo or take a webcam snapshot, see each face's expression, "
        "class probabilities and attention map.",
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="SOURCE",
        help="a model to offer (repeatable; the first is preselected): timm tag with weights, hf-hub:ORG/NAME, "
        "local-dir:PATH, a training checkpoint (.safetensors), a run folder or an exported .onnx file. The shipped "
        "tags (acsinet18.fer2013, preselected without --model, and coresnet18.fer2013) are always offered",
    )
    parser.add_argument(
        "--detector",
        choices=tuple(DETECTORS),
        default="haar",
        help="haar: OpenCV's frontal-face cascade (default); none: each image is one face crop",
    )
    parser.add_argument(
        "--tta-flip",
        action="store_true",
        help="average each face's probabilities with its mirror image's (two forward passes, more accurate)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=port_number, default=7860, help="port (default: 7860)")
    parser.add_argument(
        "--share", action="store_true", help="also open a public gradio.live link (needs the internet; off by default)"
    )
    return parser


def main(argv: Sequence[str], prog: str = "timm-acsi demo") -> int:
    args = build_parser(prog).parse_args(list(argv))
    from ..demo import SHIPPED_TAGS, build_app, default_examples, import_gradio, launch, load_recognizers

    import_gradio()  # the optional packages first: a missing one fails before any model loads
    if args.detector == "haar":
        import_extra("cv2", "demo", "Face detection (--detector haar)")
    start = time.perf_counter()
    recognizers = load_recognizers([*(args.model or []), *SHIPPED_TAGS], args.detector, args.device, args.tta_flip)
    count = len(recognizers)
    print(
        f"{prog}: {count} model{'s' * (count != 1)} loaded in {time.perf_counter() - start:.1f} s: "
        f"{', '.join(recognizers)}",
        flush=True,
    )
    launch(build_app(recognizers, args.detector, default_examples()), args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    from . import run_command

    sys.exit(run_command("demo", sys.argv[1:]))
