"""Prediction throughput: face detection, preprocessing and the network, measured separately.

- detector: OpenCV's Haar cascade on scikit-image's astronaut photo (512x512, one face), ms per image;
- preprocessing: numpy/Pillow crop -> normalised batch, ms per face;
- network: faces/s for a batch of face crops through ``ExpressionRecognizer``'s torch backend (eval mode,
  ``torch.inference_mode``), for timm's resnet18, coresnet18 and acsinet18 with a FER-7 head, at the FER-2013
  size (48) and the RAF-DB size (224), with the ratio to resnet18 measured in the same interleaved rounds;
- end to end: ``rec(photo)`` (detect + crop + preprocess + network) on the astronaut, ms per image.

Freshly initialised weights: speed does not depend on them. Run it niced on a shared machine::

    nice -n 19 python benchmarks/predict_throughput.py
    python benchmarks/predict_throughput.py --device cuda --channels-last --sizes 224 --batch-sizes 1 64
"""

import argparse
import functools
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import timm
import torch
from skimage import data as skdata

import timm_acsi
from timm_acsi.inference import ExpressionRecognizer, HaarFaceDetector, Preprocessor, square_box
from timm_acsi.inference.torch_backend import TorchBackend
from timm_acsi.sources import LoadedModel

BASELINE = "resnet18"


def _median_time(fn: Callable[[], None], iters: int, rounds: int, sync: Callable[[], None]) -> float:
    """Median over ``rounds`` of the mean time of ``iters`` calls, in seconds."""
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


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
    loaded = LoadedModel(model, name, timm_acsi.FER7_LABELS, cfg, False, f"{name} (random init)")
    return TorchBackend(loaded, channels_last=channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[BASELINE, "coresnet18", "acsinet18"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[48, 224], help="network input sizes")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32], help="faces per batch")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if BASELINE not in args.models:
        args.models.insert(0, BASELINE)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    photo = skdata.astronaut()
    detector = HaarFaceDetector()
    detect_s = _median_time(lambda: detector(photo), args.iters, args.rounds, lambda: None)
    box = detector(photo)[0].box
    x, y, w, h = square_box(box, 0.2, photo.shape[1], photo.shape[0])
    crop = np.ascontiguousarray(photo[y : y + h, x : x + w])
    print(
        f"predict throughput on {device} ({torch.get_num_threads()} torch threads), torch {torch.__version__}, "
        f"timm {timm.__version__}; median of {args.rounds} rounds x {args.iters} calls"
    )
    print(f"detector  haar frontal-face cascade, 512x512 photo: {detect_s * 1e3:.1f} ms/image")
    for size in args.sizes:
        pre = Preprocessor(_backend(BASELINE, size, device, False).data_config)
        pre_s = _median_time(lambda pre=pre: pre([crop] * 32), args.iters, args.rounds, lambda: None) / 32
        print(f"preprocess {w}x{h} crop -> {size}x{size}: {pre_s * 1e3:.2f} ms/face")

    print(f"\n{'model':<12} {'size':>4} {'batch':>5} {'faces/s':>9} {'ms/batch':>9} {'vs resnet18':>11}")
    for size in args.sizes:
        backends = {n: _backend(n, size, device, args.channels_last) for n in args.models}
        for bs in args.batch_sizes:
            batch = Preprocessor(backends[BASELINE].data_config)([crop] * bs)
            for name in args.models:
                backends[name](batch)  # warm-up
            times: Dict[str, List[float]] = {n: [] for n in args.models}
            for _ in range(args.rounds):  # interleaved: load changes hit every model alike
                for name in args.models:
                    call = functools.partial(backends[name], batch)
                    times[name].append(_median_time(call, args.iters, 1, sync))
            base = statistics.median(times[BASELINE])
            for name in args.models:
                t = statistics.median(times[name])
                print(f"{name:<12} {size:>4} {bs:>5} {bs / t:>9.1f} {t * 1e3:>9.1f} {base / t:>11.3f}")

    rec = ExpressionRecognizer(_backend("acsinet18", min(args.sizes), device, args.channels_last))
    rec(photo)
    end_s = _median_time(lambda: rec(photo), args.iters, args.rounds, sync)
    print(f"\nend to end rec(photo), acsinet18 at {min(args.sizes)}: {end_s * 1e3:.1f} ms/image (one face)")


if __name__ == "__main__":
    main()
