"""Architecture configs for CLIP (Radford et al. 2021, Section 2.4 and Table 19/20).

A config is data: one JSON per preset in open_clip's shape
{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}. Unknown keys raise.
`patch_size: null` selects the ModifiedResNet image encoder, an int the ViT.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

_PRESETS = "presets"


def _check_keys(cls: type, d: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown keys in {where}: {unknown} (known: {sorted(known)})")


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12  # int: ViT depth; 4-tuple: ResNet stages
    width: int = 768
    patch_size: int | None = 32  # None: ModifiedResNet
    heads: int | None = None  # None: OpenAI's rule (ResNet width*32//64, ViT width//64)

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.heads is None:
            object.__setattr__(self, "heads", self.width * 32 // 64 if self.is_resnet else self.width // 64)
        self._validate()

    @property
    def is_resnet(self) -> bool:
        return self.patch_size is None

    @property
    def tower_width(self) -> int:
        """Width of the attention that the heads split: attnpool's width*32 for ResNets."""
        return self.width * 32 if self.is_resnet else self.width

    def _validate(self) -> None:
        if self.is_resnet:
            if not (isinstance(self.layers, tuple) and len(self.layers) == 4):
                raise ValueError(f"a ResNet (patch_size=None) needs 4 stage depths, got layers={self.layers!r}")
            if self.image_size % 32:
                raise ValueError(f"a ResNet needs image_size divisible by 32, got {self.image_size}")
        else:
            if not isinstance(self.layers, int):
                raise ValueError(f"a ViT needs an int layers, got {self.layers!r}")
            if self.image_size % self.patch_size:
                raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.heads < 1 or self.tower_width % self.heads:
            raise ValueError(f"heads={self.heads} does not divide the vision attention width {self.tower_width}")

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        _check_keys(cls, d, "vision_cfg")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.is_resnet else self.layers
        return d


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12

    def __post_init__(self):
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"text heads={self.heads} does not divide width {self.width}")

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        _check_keys(cls, d, "text_cfg")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        """Build from open_clip's layout: embed_dim, vision_cfg, text_cfg."""
        unknown = sorted(set(d) - {"embed_dim", "vision_cfg", "text_cfg"})
        if unknown:
            raise ValueError(f"unknown keys in CLIP config: {unknown} (known: ['embed_dim', 'text_cfg', 'vision_cfg'])")
        return cls(
            embed_dim=d.get("embed_dim", 512),
            vision=VisionConfig.from_dict(d.get("vision_cfg", {})),
            text=TextConfig.from_dict(d.get("text_cfg", {})),
        )

    def to_dict(self) -> dict:
        return {"embed_dim": self.embed_dim, "vision_cfg": self.vision.to_dict(), "text_cfg": self.text.to_dict()}

    def replace(self, **overrides: Any) -> CLIPConfig:
        """A copy with overrides merged in, e.g. replace(vision_cfg={"image_size": 160})."""
        d = self.to_dict()
        for key, value in overrides.items():
            d[key] = {**d[key], **value} if isinstance(value, dict) and isinstance(d.get(key), dict) else value
        return CLIPConfig.from_dict(d)

    @classmethod
    def from_json(cls, path: str | Path) -> CLIPConfig:
        """Read a config from a JSON file."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_json(self, path: str | Path) -> None:
        """Write the config as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _preset_dir():
    return resources.files("clip_core") / _PRESETS


def available_models() -> list[str]:
    """Names of the architecture presets, sorted."""
    return sorted(p.name[: -len(".json")] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> CLIPConfig:
    """The config of a preset, e.g. load_preset("ViT-B-32")."""
    path = _preset_dir() / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    return CLIPConfig.from_dict(json.loads(path.read_text()))
