"""Prediction throughput: face detection, preprocessing and the network, measured separately.

- detector: OpenCV's Haar cascade on scikit-image's astronaut photo (512x512, one face), ms per image;
- preprocessing: numpy/Pillow crop -> normalised batch, ms per face;
- network: faces/s for a batch of face crops through ``ExpressionRecognizer``'s torch backend (eval mode,
  ``torch.inference_mode``), for timm's resnet18, coresnet18 and acsinet18 with a FER-7 head, at the FER-2013
  size (48) and the RAF-DB size (224), with the throughput ratio to resnet18 (``faces/s vs r18``: below 1 is
  slower) measured in the same interleaved rounds (A B C, B C A, ...);
- end to end: ``rec(photo)`` (detect + crop + preprocess + network) on the astronaut, ms per image.

Every step is warmed up before it is timed; ``--threads`` caps torch's and OpenCV's threads alike. Freshly
initialised weights: speed does not depend on them::

    python benchmarks/predict_throughput.py
    nice -n 19 python benchmarks/predict_throughput.py --threads 1 --clock cpu   # on a CPU shared with other jobs
    python benchmarks/predict_throughput.py --device cuda --channels-last --sizes 224 --batch-sizes 1 64
"""

import argparse
import functools
import statistics
from typing import Callable

import numpy as np
import timm
import torch
from skimage import data as skdata
from train_throughput import CLOCKS, add_clock_args, check_clock, interleaved

import timm_acsi
from timm_acsi.cli._args import positive_int
from timm_acsi.extras import import_extra
from timm_acsi.inference import ExpressionRecognizer, HaarFaceDetector, Preprocessor, square_box
from timm_acsi.inference.torch_backend import TorchBackend
from timm_acsi.sources import LoadedModel

BASELINE = "resnet18"


def _median_time(fn: Callable[[], object], args: argparse.Namespace, device: torch.device) -> float:
    """One warm-up call, then the median over ``args.rounds`` of the mean time of ``args.iters`` calls (seconds)."""
    fn()
    times = interleaved({"fn": fn}, args.iters, args.rounds, device, CLOCKS[args.clock])
    return statistics.median(times["fn"])


def _backend(name: str, size: int, device: torch.device, channels_last: bool) -> TorchBackend:
    model = timm.create_model(name, num_classes=7).to(device).eval()
    cfg = dict(
        input_size=(3, size, size),
        interpolation="bilinear",
        mean=timm.data.IMAGENET_DEFAULT_MEAN,
        std=timm.data.IMAGENET_DEFAULT_STD,
        crop_pct=0.875,
        crop_mode="center",
    )
    loaded = LoadedModel(
        model=model,
        architecture=name,
        label_names=timm_acsi.FER7_LABELS,
        data_config=cfg,
        grayscale=False,
        source=f"{name} (random init)",
    )
    return TorchBackend(loaded, channels_last=channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[BASELINE, "coresnet18", "acsinet18"])
    parser.add_argument("--sizes", nargs="+", type=positive_int, default=[48, 224], help="network input sizes")
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 32], help="faces per batch")
    parser.add_argument("--iters", type=positive_int, default=3, help="timed calls per round")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    add_clock_args(parser)
    args = parser.parse_args()
    check_clock(parser, args)
    if BASELINE not in args.models:
        args.models.insert(0, BASELINE)
    cv2 = import_extra("cv2", "predict", "Face detection with OpenCV's Haar cascade")
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    device = torch.device(args.device)
    cpu = torch.device("cpu")

    photo = skdata.astronaut()
    detector = HaarFaceDetector()
    detect_s = _median_time(lambda: detector(photo), args, cpu)
    box = detector(photo)[0].box
    x, y, w, h = square_box(box, 0.2, photo.shape[1], photo.shape[0])
    crop = np.ascontiguousarray(photo[y : y + h, x : x + w])
    unit = "ms" if args.clock == "wall" else "CPU ms"
    print(
        f"predict throughput on {device} ({torch.get_num_threads()} torch threads, {cv2.getNumThreads()} OpenCV "
        f"threads), {args.clock} clock, torch {torch.__version__}, timm {timm.__version__}; median of "
        f"{args.rounds} rounds x {args.iters} calls"
    )
    print(f"detector  haar frontal-face cascade, 512x512 photo: {detect_s * 1e3:.1f} {unit}/image")
    for size in args.sizes:
        pre = Preprocessor(_backend(BASELINE, size, device, False).data_config)
        pre_s = _median_time(lambda pre=pre: pre([crop] * 32), args, cpu) / 32
        print(f"preprocess {w}x{h} crop -> {size}x{size}: {pre_s * 1e3:.2f} {unit}/face")

    rate = "faces/s" if args.clock == "wall" else "faces/cpu-s"
    print(f"\n{'model':<12} {'size':>4} {'batch':>5} {rate:>11} {unit + '/batch':>12} {'faces/s vs r18':>14}")
    for size in args.sizes:
        backends = {n: _backend(n, size, device, args.channels_last) for n in args.models}
        for bs in args.batch_sizes:
            batch = Preprocessor(backends[BASELINE].data_config)([crop] * bs)
            calls = {name: functools.partial(backends[name], batch) for name in args.models}
            for call in calls.values():
                call()  # warm-up
            times = interleaved(calls, args.iters, args.rounds, device, CLOCKS[args.clock])
            base = statistics.median(times[BASELINE])
            for name in args.models:
                t = statistics.median(times[name])
                print(f"{name:<12} {size:>4} {bs:>5} {bs / t:>11.1f} {t * 1e3:>12.1f} {base / t:>14.3f}")

    rec = ExpressionRecognizer(_backend("acsinet18", min(args.sizes), device, args.channels_last))
    end_s = _median_time(lambda: rec(photo), args, device)
    print(f"\nend to end rec(photo), acsinet18 at {min(args.sizes)}: {end_s * 1e3:.1f} {unit}/image (one face)")


if __name__ == "__main__":
    main()
