"""The synthetic web's spec: everything needed to regenerate or serve it, saved as `web.json`.

The generator writes the spec; the server reads it back and derives every response from
(spec, url path) alone, so the web scales to millions of URLs without stored images.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import fsspec

# Per-URL outcomes; "ok" takes whatever probability the failure rates leave.
FATES = (
    "ok", "404", "500", "slow", "timeout", "redirect301", "redirect302",
    "html", "truncated", "corrupt", "bomb", "noai",
)
CAPTION_KINDS = ("describe", "misspelled", "filename", "spam", "empty", "long", "foreign", "mismatch")
EVAL_SETS = ("shapes", "colors", "counts", "digits", "words", "retrieval")


def default_failure_rates() -> dict[str, float]:
    """Failure rates close to what a crawl of real alt-text pairs meets."""
    return {"404": 0.03, "500": 0.01, "slow": 0.01, "timeout": 0.002, "redirect301": 0.01,
            "redirect302": 0.01, "html": 0.01, "truncated": 0.01, "corrupt": 0.005,
            "bomb": 0.001, "noai": 0.01}


def default_caption_rates() -> dict[str, float]:
    """Rates of the noisy alt-text kinds; "describe" takes the rest."""
    return {"misspelled": 0.06, "filename": 0.05, "spam": 0.04, "empty": 0.04,
            "long": 0.01, "foreign": 0.04, "mismatch": 0.05}


def default_kind_rates() -> dict[str, float]:
    """How often a web image shows shapes, a handwritten digit or a word."""
    return {"shapes": 0.7, "digit": 0.15, "word": 0.15}


def default_eval_sizes(n_test: int = 300, n_train: int = 300) -> dict[str, dict[str, int]]:
    """Eval set sizes per split; the retrieval set has a test split only."""
    sizes = {name: {"test": n_test, "train": n_train} for name in EVAL_SETS if name != "retrieval"}
    sizes["retrieval"] = {"test": n_test}
    return sizes


@dataclass(frozen=True)
class WebSpec:
    seed: int = 0
    n_pairs: int = 10_000
    base_url: str = "http://127.0.0.1:8000"
    image_size: int = 128
    pairs_per_page: int = 20
    n_sites: int = 50
    kind_rates: dict = field(default_factory=default_kind_rates)
    failure_rates: dict = field(default_factory=default_failure_rates)
    caption_rates: dict = field(default_factory=default_caption_rates)
    duplicate_rate: float = 0.03
    near_duplicate_rate: float = 0.03
    duplicate_window: int = 1000
    planted_rate: float = 0.003
    planted_test_fraction: float = 0.75
    eval_sizes: dict = field(default_factory=default_eval_sizes)
    slow_seconds: float = 0.5
    timeout_seconds: float = 12.0
    bomb_size: int = 30_000
    jpeg_quality: int = 90
    version: int = 1

    def __post_init__(self):
        _check_rates("failure_rates", self.failure_rates, FATES[1:])
        _check_rates("caption_rates", self.caption_rates, CAPTION_KINDS[1:])
        _check_rates("kind_rates", self.kind_rates, ("shapes", "digit", "word"))
        content = self.duplicate_rate + self.near_duplicate_rate + self.planted_rate
        if not 0 <= content <= 1:
            raise ValueError(f"duplicate, near-duplicate and planted rates sum to {content}")
        if unknown := set(self.eval_sizes) - set(EVAL_SETS):
            raise ValueError(f"unknown eval sets {sorted(unknown)}; known: {EVAL_SETS}")
        if bad := {s for splits in self.eval_sizes.values() for s in splits} - {"test", "train"}:
            raise ValueError(f"eval splits must be test or train, got {sorted(bad)}")
        if self.n_pairs < 1 or self.image_size < 16:
            raise ValueError("n_pairs must be >= 1 and image_size >= 16")

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WebSpec":
        """Build a spec from a dict; unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(d) - names:
            raise ValueError(f"unknown web.json keys {sorted(unknown)}")
        return cls(**d)


def _check_rates(name: str, rates: dict, known: tuple[str, ...]) -> None:
    if unknown := set(rates) - set(known):
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}; known: {known}")
    if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1 + 1e-9:
        raise ValueError(f"{name} must be non-negative and sum to at most 1: {rates}")


def save_spec(spec: WebSpec, fs, path: str) -> None:
    """Write the spec as JSON to `path` on filesystem `fs`."""
    from clip_core.data.parquet import atomic_open

    with atomic_open(fs, path, "w") as f:
        json.dump(spec.to_dict(), f, indent=2, sort_keys=True)


def load_spec(root: str, storage_options: dict | None = None) -> WebSpec:
    """Read `ROOT/web.json` (any fsspec URI)."""
    with fsspec.open(root.rstrip("/") + "/web.json", "r", **(storage_options or {})) as f:
        return WebSpec.from_dict(json.load(f))
