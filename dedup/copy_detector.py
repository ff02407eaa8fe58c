"""The learned copy detector of CLIP Appendix C, small enough to train on a CPU.

Radford et al. (2021), Appendix C: a ResNet-50 "modified to use anti-aliased pooling" and
GELU activations, trained with the InfoNCE loss at a fixed temperature of 0.07 to match each
image with its own augmentations; no labels. Here the network is a few GELU conv stages with
blur pooling (Zhang 2019) between them, a GeM pool beside a 2x2 layout pool, and an
L2-normalised linear output, trained with
symmetric InfoNCE between two augmented views of every image in a batch. The same code runs
on a GPU (`device="cuda"`). The shipped default lives in `dedup/assets/`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from safetensors.torch import load_file, save
from torch import nn

from clip_core.data.parquet import atomic_open
from clip_core.errors import InputError
from dedup.augment import image_source, sample_photos, train_view

TEMPERATURE = 0.07  # fixed, as Appendix C
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def default_detector_path() -> Path:
    """The shipped detector, trained by `train_default_detector`."""
    return Path(__file__).resolve().parent / "assets" / "copy_detector"


@dataclass(frozen=True)
class DetectorConfig:
    image_size: int = 64
    widths: tuple = (16, 32, 64, 128, 192)  # one stage each; a blur pool between stages
    depths: tuple = (1, 1, 1, 1, 1)
    embed_dim: int = 128


class BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling: a fixed [1 2 1] binomial blur, then subsampling."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        kernel = (k[:, None] * k[None, :]) / 16
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, stride=2, padding=1, groups=x.shape[1])


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, BatchNorm, GELU (Appendix C's activation)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class CopyDetector(nn.Module):
    """Image (B, 3, S, S) -> L2-normalised copy descriptor (B, embed_dim)."""

    def __init__(self, config: DetectorConfig = DetectorConfig()):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for i, (width, depth) in enumerate(zip(config.widths, config.depths)):
            layers += [BlurPool(c_in)] if i else []
            layers += [conv_block(c_in if j == 0 else width, width) for j in range(depth)]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.gem_p = nn.Parameter(torch.tensor(3.0))
        self.proj = nn.Linear(5 * c_in, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, S / 2^(stages-1), same)
        gem = x.clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)  # (B, C)
        # a 2x2 layout beside the global pool: a global pool alone cannot tell a shape's position
        layout = F.adaptive_avg_pool2d(x, 2).flatten(1)  # (B, 4C)
        return F.normalize(self.proj(torch.cat([gem, layout], dim=1)), dim=-1)


def to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) float tensor, squashed (no crop) and normalised."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE: view i of z1 must pick view i of z2 among the batch, and back."""
    logits = z1 @ z2.T / temperature  # (B, B)
    labels = torch.arange(len(z1), device=z1.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _as_sampler(images_or_generator) -> Callable[[np.random.Generator], Image.Image]:
    """A list of images (or image bytes) or a callable rng -> image, as a sampler."""
    if callable(images_or_generator):
        return images_or_generator
    pool = [im if isinstance(im, Image.Image) else _decode(im) for im in images_or_generator]
    if len(pool) < 2:
        raise ValueError("train_copy_detector needs at least two images (the negatives are the others)")
    return lambda rng: pool[int(rng.integers(len(pool)))]


def _decode(data) -> Image.Image:
    from clip_core.transforms import load_image
    return load_image(data).convert("RGB")


class ViewPairs(torch.utils.data.IterableDataset):
    """Endless batches of two augmented views of `batch_size` freshly drawn images."""

    def __init__(self, sample, batch_size: int, size: int, seed: int):
        self.sample, self.batch_size, self.size, self.seed = sample, batch_size, size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            images = [self.sample(rng) for _ in range(self.batch_size)]
            yield tuple(to_tensor([train_view(im, rng, self.size) for im in images], self.size) for _ in range(2))


def train_copy_detector(images_or_generator, out: str | Path | None, steps: int = 500, *,
                        batch_size: int = 96, lr: float = 2e-3, config: DetectorConfig = DetectorConfig(),
                        device: str = "cpu", seed: int = 0, init: str | Path | None = None, num_workers: int = 0,
                        save_every: int = 0, log: Callable[[int, float], None] | None = None
                        ) -> tuple[CopyDetector, list[float]]:
    """Train a detector with InfoNCE on augmented views; save it to `out` (if given).

    `images_or_generator`: images (PIL or encoded bytes) or a callable rng -> PIL image.
    `num_workers` > 0 draws the augmentations in DataLoader workers beside the model step;
    `save_every` > 0 also writes `out` every that many steps (a long run can be stopped).
    """
    torch.manual_seed(seed)
    model = load_detector(init) if init else CopyDetector(config)
    data = ViewPairs(_as_sampler(images_or_generator), batch_size, model.config.image_size, seed)
    batches = iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=num_workers))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for step in range(steps):
        v1, v2 = (v.to(device) for v in next(batches))
        loss = info_nce(model(v1), model(v2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log:
            log(step, losses[-1])
        if out is not None and (step + 1 == steps or (save_every and (step + 1) % save_every == 0)):
            _checkpoint(model, out, step + 1, losses, batch_size=batch_size, lr=lr, seed=seed)
    return model.eval(), losses


def _checkpoint(model: CopyDetector, out, step: int, losses: list[float], **meta) -> None:
    """Save in eval mode (BatchNorm running statistics), then resume training."""
    save_detector(model.eval(), out, {"steps": step, **meta, "final_loss": float(np.mean(losses[-20:]))})
    model.train()


def save_detector(model: CopyDetector, out: str | Path, meta: dict | None = None) -> Path:
    """Write `out/model.safetensors` (fp16) and `out/config.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().half().contiguous() for k, v in model.state_dict().items()
             if v.is_floating_point()}
    cfg = {"config": asdict(model.config), "temperature": TEMPERATURE, "train": meta or {}}
    # each file written aside and renamed: a run killed while saving leaves the previous detector whole
    fs = LocalFileSystem()
    with atomic_open(fs, str(out / "model.safetensors")) as f:
        f.write(save(state))
    with atomic_open(fs, str(out / "config.json"), "w") as f:
        f.write(json.dumps(cfg, indent=2) + "\n")
    return out


_DETECTOR_FIX = "pass a folder written by `clip-pipeline dedup train-detector`, or leave --detector out"


def _read_detector(path: Path) -> tuple[CopyDetector, dict]:
    """(an untrained model of the folder's config, its weights); InputError naming the bad file."""
    try:
        raw = json.loads((path / "config.json").read_text())["config"]
        model = CopyDetector(DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}))
    except Exception as err:  # noqa: BLE001 -- any bad field or JSON is the same mistake for the user
        raise InputError(str(path / "config.json"), f"not a copy detector config ({type(err).__name__}: {err})",
                         _DETECTOR_FIX) from err
    try:
        state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error type for a damaged file
        raise InputError(str(path / "model.safetensors"), f"cannot read detector weights ({err})",
                         _DETECTOR_FIX) from err
    return model, state


def load_detector(path: str | Path | None = None, device: str = "cpu") -> CopyDetector:
    """Load a detector folder (default: the shipped one), in eval mode on `device`."""
    path = Path(path) if path else default_detector_path()
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no copy detector at {path} (expected config.json and model.safetensors)")
    model, state = _read_detector(path)
    try:
        model.load_state_dict(state, strict=False)  # BatchNorm step counters are not stored
    except RuntimeError as e:
        raise InputError(str(path), f"detector weights do not fit its config.json (an older format?): {e}",
                         _DETECTOR_FIX) from e
    missing = {k for k in set(model.state_dict()) - set(state) if not k.endswith("num_batches_tracked")}
    if missing:
        raise InputError(str(path), f"detector lacks {sorted(missing)[:5]}", _DETECTOR_FIX)
    return model.to(device).eval()


@torch.no_grad()
def encode_images(model: CopyDetector, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
    """Copy descriptors (N, embed_dim) float32 of PIL images."""
    device = next(model.parameters()).device
    out = [model(to_tensor(images[i:i + batch_size], model.config.image_size).to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.embed_dim), np.float32)


def train_default_detector(out: str | Path | None = None, steps: int = 1200, seed: int = 0, device: str = "cpu",
                           num_workers: int = 1, **kwargs) -> tuple[CopyDetector, list[float]]:
    """Train the shipped default: procedural scenes mixed with scikit-image's training photos."""
    source = image_source(sample_photos(), photo_fraction=0.5, size=128)
    return train_copy_detector(source, out or default_detector_path(), steps, seed=seed, device=device,
                               num_workers=num_workers, **kwargs)
