"""Image transforms of the paper's recipe (Sec. 4.2): faces squashed to 256x256, 224 crops.

Training picks one of ten crops (the four corners and centre of
:func:`torchvision.transforms.functional.five_crop`, and their horizontal flips) uniformly per sample; evaluation
takes the centre crop. ``train_crops="random"``
swaps in timm's own RandomResizedCrop + flip pipeline (with colour jitter and random erasing as asked).

Grayscale models (trained on FER-2013's grayscale faces) get every image converted to grayscale and
replicated to three channels, in training and evaluation alike, so a colour photo looks like their data.
"""

from typing import Callable, Sequence, Tuple

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms
from torchvision.transforms import functional as F

TRAIN_CROPS = ("five_flip", "random")


class RandomTenCrop:
    """Return one of the five ``size`` crops (4 corners + centre) or its horizontal flip, chosen uniformly.

    Draws from torch's RNG, so DataLoader workers get distinct, seedable streams; a plain class so it pickles.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        index = int(torch.randint(10, ()))
        crop = F.five_crop(img, self.size)[index % 5]
        return F.hflip(crop) if index >= 5 else crop

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def create_fer_transform(
    is_training: bool,
    img_size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    train_crops: str = "five_flip",
    scale: Tuple[float, float] = (0.08, 1.0),
    color_jitter: float = 0.4,
    re_prob: float = 0.0,
    grayscale: bool = False,
) -> Callable:
    """Build the paper's train or eval transform: PIL RGB image -> normalised float tensor ``[3, img_size, img_size]``.

    Args:
        is_training: training (random crop) or evaluation (centre crop) pipeline.
        img_size: crop size fed to the network.
        resize: faces are first resized to ``resize x resize`` (aligned faces are square, so no aspect is kept).
        mean, std: normalisation.
        train_crops: ``"five_flip"`` (paper: one of 5 crops x 2 flips) or ``"random"`` (timm's
            RandomResizedCrop + horizontal flip + colour jitter, from :func:`timm.data.create_transform`).
        scale, color_jitter, re_prob: ``"random"`` crops only: RandomResizedCrop area range, colour-jitter
            strength and random-erasing probability (timm's arguments of the same names).
        grayscale: convert every image to grayscale, replicated to 3 channels, before anything else.
    """
    if train_crops not in TRAIN_CROPS:
        raise ValueError(f"Unknown train_crops {train_crops!r}; use one of {', '.join(TRAIN_CROPS)}.")
    if resize < img_size:
        raise ValueError(f"resize={resize} is smaller than img_size={img_size}; crops need resize >= img_size.")
    mean, std = tuple(mean), tuple(std)
    gray = [transforms.Grayscale(num_output_channels=3)] if grayscale else []
    if is_training and train_crops == "random":
        timm_tf = create_transform(
            img_size,
            is_training=True,
            scale=tuple(scale),
            color_jitter=color_jitter,
            re_prob=re_prob,
            mean=mean,
            std=std,
            interpolation="bilinear",
        )
        return transforms.Compose([*gray, timm_tf]) if gray else timm_tf
    crop = RandomTenCrop(img_size) if is_training else transforms.CenterCrop(img_size)
    return transforms.Compose(
        [
            *gray,
            transforms.Resize((resize, resize), interpolation=transforms.InterpolationMode.BILINEAR),
            crop,
            transforms.ToTensor(),
            transforms.Normalize(mean=mean, std=std),
        ]
    )
