"""Image decoding and CLIP's preprocessing, with PIL, numpy and torch only (no torchvision).

CLIP (Radford et al. 2021), Section 2.3: "A random square crop from resized images is the
only data augmentation used during training." Evaluation follows OpenAI's released
preprocessing: bicubic resize of the shortest side, centre crop, RGB, normalisation with
the WIT statistics below. Resize, CenterCrop and RandomResizedCrop reproduce torchvision's
arithmetic and RNG draws for PIL inputs (torchvision itself is not a dependency).

Colour: like OpenAI's ``_convert_image_to_rgb``, images become RGB with ``convert("RGB")``
after cropping, so an alpha channel is dropped, not composited onto a background (the
pretrained weights saw that). One departure: 16-bit greyscale (``I;16*``) is scaled to
8 bits, where ``convert("RGB")`` would clip everything above 255 to white.
"""
import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]

_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError,
    Image.DecompressionBombError,
)


class ImageDecodeError(ValueError):
    """The input is not a decodable image (not an image, truncated, corrupt or too large)."""


def _describe(data) -> str:
    """A name for `data` in error messages."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return f"<{len(data)} bytes>"
    return str(getattr(data, "name", None) or f"<{type(data).__name__}>")


def _decode(fp: BinaryIO, label: str, max_pixels: Optional[int]) -> Image.Image:
    """Open and fully decode `fp`, mapping every decoder failure to ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS; the check below applies `max_pixels` instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                f"image {label}: {width}x{height} = {width * height} pixels exceeds "
                f"max_pixels={max_pixels} (possible decompression bomb)"
            )
        img.load()
    except ImageDecodeError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot decode image {label}: {type(e).__name__}: {e}") from e
    return img


def load_image(
    data: ImageSource, name: Optional[str] = None, max_pixels: Optional[int] = None
) -> Image.Image:
    """Open and fully decode an image from bytes, a path or a binary file object.

    `max_pixels` defaults to PIL's ``Image.MAX_IMAGE_PIXELS``; PIL's own hard limit (twice
    that) still applies above it. A missing file raises FileNotFoundError, not a decode error.
    """
    label = name or _describe(data)
    max_pixels = max_pixels or Image.MAX_IMAGE_PIXELS
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            return _decode(f, label, max_pixels)
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = io.BytesIO(data)
    return _decode(data, label, max_pixels)


def resize_shortest_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side is `size`, as torchvision's Resize(int)."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), Image.BICUBIC)


def _crop_offset(length: int, crop: int) -> int:
    """torchvision's centre-crop offset; negative when the image is zero-padded."""
    if crop > length:
        return -((crop - length) // 2)
    return int(round((length - crop) / 2.0))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to `size` x `size`, zero-padding a smaller image, as torchvision's CenterCrop."""
    width, height = img.size
    left, top = _crop_offset(width, size), _crop_offset(height, size)
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_params(
    width: int,
    height: int,
    scale: Sequence[float] = (0.9, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: Optional[torch.Generator] = None,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, height, width) of the crop."""
    area = height * width
    lo, hi = (float(r) for r in torch.log(torch.tensor(ratio)))  # float32, as torchvision
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(lo, hi, generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    return _fallback_crop(width, height, ratio)


def _fallback_crop(width: int, height: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """The central crop torchvision takes after ten failed tries."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img, size, scale, ratio, generator=None) -> Image.Image:
    """Crop a random box (torchvision's sampling) and resize it bicubically to `size` x `size`."""
    top, left, h, w = random_resized_crop_params(*img.size, scale, ratio, generator)
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def to_rgb(img: Image.Image) -> Image.Image:
    """``convert("RGB")`` as OpenAI's preprocessing does; alpha is dropped, 16-bit scaled to 8."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # same colours; avoids PIL's palette-transparency warning
    return img.convert("RGB")


def to_normalized_tensor(img: Image.Image, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD):
    """RGB PIL image -> normalised float32 tensor (3, H, W), as ToTensor then Normalize."""
    # numpy, single-threaded: torch's intra-op threads cost more than they save at this size
    x = np.asarray(to_rgb(img)).transpose(2, 0, 1)  # (3, H, W) view of uint8
    x = np.ascontiguousarray(x, dtype=np.float32)
    x /= np.float32(255)
    x -= np.asarray(mean, dtype=np.float32)[:, None, None]
    x /= np.asarray(std, dtype=np.float32)[:, None, None]
    return torch.from_numpy(x)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W): a quarter of the float bytes to move (normalise on the device)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(to_rgb(img)).transpose(2, 0, 1)))


def normalize_images(x: torch.Tensor, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> float32, normalised where they are: the same arithmetic as
    `to_normalized_tensor` (divide by 255, subtract the mean, divide by the std), so the same values."""
    mean = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return x.float().div_(255).sub_(mean).div_(std)


@dataclass
class ImageTransform:
    """Picklable PIL image -> (3, image_size, image_size) tensor; see `image_transform`."""

    image_size: int
    train: bool = False
    mean: Sequence[float] = OPENAI_DATASET_MEAN
    std: Sequence[float] = OPENAI_DATASET_STD
    scale: Sequence[float] = (0.9, 1.0)
    ratio: Sequence[float] = (3 / 4, 4 / 3)
    generator: Optional[torch.Generator] = field(default=None, repr=False)
    normalize: bool = True  # False: uint8 (3, H, W), for `normalize_images` on the device

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.train:
            img = random_resized_crop(img, self.image_size, self.scale, self.ratio, self.generator)
        else:
            img = center_crop(resize_shortest_side(img, self.image_size), self.image_size)
        return to_normalized_tensor(img, self.mean, self.std) if self.normalize else to_uint8_tensor(img)


def image_transform(
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    scale: Sequence[float] = (0.9, 1.0),
    generator: Union[torch.Generator, int, None] = None,
    normalize: bool = True,
) -> ImageTransform:
    """CLIP's train (random resized crop) or eval (resize, centre crop) preprocessing.

    `generator` (a torch.Generator or an int seed) makes training crops reproducible; with
    None they draw from torch's global RNG, which DataLoader seeds per worker. A generator
    copied into several workers repeats the same crops in each.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    return ImageTransform(
        image_size, train, tuple(mean), tuple(std), tuple(scale), generator=generator, normalize=normalize
    )
