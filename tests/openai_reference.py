"""OpenAI's reference CLIP code (openai-clip 1.0.1, installed --no-deps) as a test oracle.

The package's __init__ imports torchvision, which has no CPU build here, so the three
modules are loaded by path. clip.py's torchvision and pkg_resources imports are satisfied
with stand-ins that its tokenize() never touches; model.py imports only torch and numpy.
"""
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _package_dir() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or spec.origin is None:
        pytest.fail("openai-clip is not installed: run `make setup` (it installs it --no-deps)")
    return Path(spec.origin).parent


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _stand_ins() -> None:
    if "torchvision.transforms" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tvt = types.ModuleType("torchvision.transforms")
        for name in ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize"):
            setattr(tvt, name, object)
        tv.transforms = tvt
        sys.modules.setdefault("torchvision", tv)
        sys.modules["torchvision.transforms"] = tvt
    if "pkg_resources" not in sys.modules:
        from packaging import version

        pr = types.ModuleType("pkg_resources")
        pr.packaging = types.SimpleNamespace(version=version)
        sys.modules["pkg_resources"] = pr


def openai_model_module() -> types.ModuleType:
    """OpenAI's clip/model.py (ModifiedResNet, VisionTransformer, CLIP, build_model)."""
    if "_openai_clip.model" in sys.modules:
        return sys.modules["_openai_clip.model"]
    return _load("_openai_clip.model", _package_dir() / "model.py")


def openai_clip_module() -> types.ModuleType:
    """OpenAI's clip/clip.py, for clip.tokenize."""
    if "_openai_clip.clip" in sys.modules:
        return sys.modules["_openai_clip.clip"]
    _stand_ins()
    pkg = types.ModuleType("_openai_clip")
    pkg.__path__ = [str(_package_dir())]
    sys.modules.setdefault("_openai_clip", pkg)
    return _load("_openai_clip.clip", _package_dir() / "clip.py")
