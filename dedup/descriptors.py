"""Image descriptors for duplicate detection: a DCT perceptual hash, the learned copy
detector, and optionally a CLIP image encoder.

CLIP (Radford et al. 2021), Section 5 and Appendix C, ran a duplicate detector over every
eval set. Exact and near-exact copies are caught by a perceptual hash (pHash: the signs of
the low DCT frequencies of a 32x32 grey thumbnail against their median); crops, rescales and
colour shifts by the learned detector (`copy_detector.py`). CLIP's own embeddings were found
"too semantic" for the job, so `clip:PATH` is offered for comparison, not as the default.
A descriptor spec joins names with "+": the image matches if any descriptor matches (OR).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np
import scipy.fft
import torch
from PIL import Image

from clip_core.errors import InputError
from clip_core.transforms import ImageDecodeError, load_image

# "default" is the combination with the best recall at the precision target (bench/dedup_bench.py).
ALIASES = MappingProxyType({"default": "phash256+detector", "combined": "phash+detector"})


def phash(images: Sequence[Image.Image], hash_size: int = 8, highfreq_factor: int = 4) -> np.ndarray:
    """DCT perceptual hashes (N, hash_size**2 / 8) uint8, bits packed as FAISS binary codes."""
    side = hash_size * highfreq_factor
    grey = np.stack([np.asarray(im.convert("L").resize((side, side), Image.LANCZOS), np.float32)
                     for im in images]) if len(images) else np.zeros((0, side, side), np.float32)
    low = scipy.fft.dctn(grey, type=2, axes=(1, 2), norm="ortho")[:, :hash_size, :hash_size]
    low = low.reshape(len(grey), hash_size * hash_size)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1)


def hamming_similarity(distance: np.ndarray, nbits: int) -> np.ndarray:
    """Hamming distance -> similarity in [0, 1] (1 = identical codes)."""
    return 1.0 - np.asarray(distance, np.float32) / nbits


def pair_similarity(descriptor, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Similarity of row i of `a` with row i of `b`, on the scale the index reports."""
    if descriptor.binary:
        return hamming_similarity(np.unpackbits(a ^ b, axis=1).sum(axis=1), a.shape[1] * 8)
    return np.einsum("nd,nd->n", a.astype(np.float32), b.astype(np.float32))


def same_device(a, b) -> bool:
    """Whether torch devices `a` and `b` are one device (cuda without an index is the current one)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != "cuda" or b.type != "cuda":
        return a.type == b.type  # one cpu, one mps
    current = torch.cuda.current_device
    return (current() if a.index is None else a.index) == (current() if b.index is None else b.index)


def model_on(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """`model` itself if its weights are on `device`, else a copy moved there (the original stays put)."""
    if same_device(next(model.parameters()).device, device):
        return model
    return copy.deepcopy(model).to(device)


@dataclass
class PHashDescriptor:
    """A binary perceptual hash (searched with Hamming distance)."""

    hash_size: int = 8
    name: str = "phash"
    binary: bool = True

    @property
    def dim(self) -> int:
        return self.hash_size * self.hash_size  # bits

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        return phash(images, self.hash_size)

    def to(self, device: str) -> PHashDescriptor:
        """Itself: the hash runs in numpy, on no device."""
        return self


@dataclass
class DetectorDescriptor:
    """The learned copy detector of Appendix C (inner product of L2-normalised vectors)."""

    model: torch.nn.Module = field(repr=False)
    batch_size: int = 256
    name: str = "detector"
    binary: bool = False

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        from dedup.copy_detector import encode_images
        return encode_images(self.model, images, self.batch_size)

    def to(self, device: str) -> DetectorDescriptor:
        """This descriptor with its model on `device` (a copy where it moves: this one is unchanged)."""
        model = model_on(self.model, device)
        return self if model is self.model else replace(self, model=model)


@dataclass
class ClipDescriptor:
    """A CLIP checkpoint's normalised image features (semantic; for comparison)."""

    model: torch.nn.Module = field(repr=False)
    batch_size: int = 64
    name: str = "clip"
    binary: bool = False

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        from clip_core.transforms import image_transform
        transform = image_transform(self.model.config.vision.image_size)
        device = next(self.model.parameters()).device
        out = [self.model.encode_image(torch.stack([transform(im) for im in images[i:i + self.batch_size]]).to(device),
                                       normalize=True).float().cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def to(self, device: str) -> ClipDescriptor:
        """This descriptor with its model on `device` (a copy where it moves: this one is unchanged)."""
        model = model_on(self.model, device)
        return self if model is self.model else replace(self, model=model)


def make_descriptors(spec: str = "default", detector_path=None, device: str = "cpu") -> list:
    """Descriptors for a spec: phash (64 bits), phash256, detector, combined, default, clip:PATH, or a "+" join."""
    names = ALIASES.get(spec, spec).split("+")
    out = []
    for name in names:
        if name in ("phash", "phash256"):
            out.append(PHashDescriptor(hash_size=8 if name == "phash" else 16, name=name))
        elif name == "detector":
            from dedup.copy_detector import load_detector
            out.append(DetectorDescriptor(load_detector(detector_path, device)))
        elif name.startswith("clip:"):
            from clip_core.weights import load_model  # a bad checkpoint: InputError naming the file
            out.append(ClipDescriptor(load_model(name[5:])[0].to(device).eval(), name=name))
        else:
            raise InputError("--descriptor", f"unknown descriptor {name!r} in {spec!r}",
                             "use phash, phash256, detector, combined, default, clip:PATH or a '+' join of them")
    if len({d.name for d in out}) != len(out):
        raise InputError("--descriptor", f"descriptor spec {spec!r} names a descriptor twice", "name each once")
    return out


def decode_all(blobs: Sequence[bytes], names: Sequence[str]) -> tuple[list[Image.Image], list[int], list[str]]:
    """Decode image bytes to RGB; returns (images, indexes that decoded, error messages)."""
    images, ok, errors = [], [], []
    for i, (blob, name) in enumerate(zip(blobs, names)):
        try:
            images.append(load_image(blob, name=name).convert("RGB"))
            ok.append(i)
        except ImageDecodeError as e:
            errors.append(str(e))
    return images, ok, errors


def descriptors_on(descriptors: Sequence, device: str) -> list:
    """The descriptors with their models on `device`: a shard task's, whatever device they were built on."""
    return [d.to(device) for d in descriptors]


def encode(descriptors: Sequence, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
    """{descriptor name: (N, dim) codes} for a list of images."""
    return {d.name: d.encode(images) for d in descriptors}
