"""Checkpoint formats, one home: OpenAI's .pt, safetensors with OpenAI names, training checkpoints.

CLIP (Radford et al. 2021) was released as TorchScript archives whose state_dicts use the
parameter names of clip_core.model; we read those, plain torch.save'd state_dicts, and
safetensors files, and write safetensors under the same names. Layouts:

- a weights file: `.safetensors`, `.pt`/`.pth` (TorchScript or a state_dict, possibly wrapped
  in {"state_dict": ...} with DDP's "module." prefixes); the architecture is read off the shapes;
- a model folder: `model.safetensors` + `config.json` (what training exports to OUT/model);
- a training checkpoint: a model folder plus `train_state.pt` (step, optimizer, schedule,
  data position, RNG states), named `step_NNNNNNNN`;
- a training output folder: its newest loadable checkpoint folder -- named `checkpoint_*`,
  `step_*` or `model`, up to three levels down (e.g. `ray/<run>/step_00000100`, the exported
  `model/`) -- is used: the largest step number when every candidate's name ends in one, else
  the newest modification time. Folders that hold no weights yet (being written) are skipped.

Folders are written whole or not at all: built under a temporary name beside the target and
swapped in, so a crash leaves the previous checkpoint as it was. On an object store (an
s3:// or other fsspec URI, where nothing can be renamed) each file is one whole upload,
config.json last. A pickle is only ever read
as plain tensors: a file that names code is refused, never run.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
import zipfile
from pathlib import Path

import fsspec
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clip_core.config import CLIPConfig, TextConfig, VisionConfig, available_models, load_preset
from clip_core.errors import InputError
from clip_core.model import CLIP

__all__ = ["MODEL_FILE", "CONFIG_FILE", "STATE_FILE", "config_from_state_dict", "build_model", "load_state_dict",
           "read_safetensors", "read_torch_weights", "read_config", "read_state_dict", "load_checkpoint",
           "save_checkpoint", "write_checkpoint", "read_train_state", "verify_checkpoint", "step_folders",
           "latest_checkpoint", "export_model", "is_uri", "resolve_checkpoint", "load_model"]

MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "train_state.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Top-level entries of OpenAI's released checkpoints that are not parameters.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_SAFE_FIX = "re-export it, or restore a good copy of the checkpoint"
_RESUME_FIX = "resume from another checkpoint (--resume FOLDER), or start afresh with --resume never or a new OUT"


# ----- the architecture from the weights (OpenAI's build_model) -----

def _count_blocks(state_dict: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _require(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"not a CLIP state_dict: no {key!r} (has {len(state_dict)} keys)")
    return state_dict[key]


def _vision_from_state_dict(sd: dict) -> VisionConfig:
    if "visual.proj" in sd:  # ViT
        width, _, patch, _ = _require(sd, "visual.conv1.weight").shape
        grid = round((_require(sd, "visual.positional_embedding").shape[0] - 1) ** 0.5)
        layers = _count_blocks(sd, "visual.transformer.resblocks.")
        return VisionConfig(image_size=patch * grid, layers=layers, width=width, patch_size=patch)
    layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
    width = _require(sd, "visual.layer1.0.conv1.weight").shape[0]
    grid = round((_require(sd, "visual.attnpool.positional_embedding").shape[0] - 1) ** 0.5)
    return VisionConfig(image_size=grid * 32, layers=layers, width=width, patch_size=None)


def _same_but_heads(a: CLIPConfig, b: CLIPConfig) -> bool:
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d["vision_cfg"].pop("heads"), d["text_cfg"].pop("heads")
    return da == db


def config_from_state_dict(state_dict: dict) -> CLIPConfig:
    """Infer the architecture from weights as OpenAI's build_model does.

    Heads cannot be read from weights: OpenAI assumes width // 64. A state_dict whose every
    other dimension matches a preset takes that preset's heads (e.g. `tiny`).
    """
    sd = state_dict
    width = _require(sd, "ln_final.weight").shape[0]
    text = TextConfig(
        context_length=_require(sd, "positional_embedding").shape[0],
        vocab_size=_require(sd, "token_embedding.weight").shape[0],
        width=width, heads=max(width // 64, 1), layers=_count_blocks(sd, "transformer.resblocks."),
    )
    config = CLIPConfig(embed_dim=_require(sd, "text_projection").shape[1], vision=_vision_from_state_dict(sd), text=text)
    presets = (load_preset(name) for name in available_models())
    return next((p for p in presets if _same_but_heads(p, config)), config)


def _listing(keys: list[str], n: int = 5) -> str:
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return f"{len(keys)} ({', '.join(keys[:n])}{more})"


def _clean_state_dict(state_dict: dict) -> dict:
    """Unwrap {"state_dict": ...}, strip "module.", drop OpenAI's extra keys, copy to fp32."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if k not in _OPENAI_EXTRA_KEYS}
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"state_dict entries that are not tensors: {_listing(not_tensors)}")
    return {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone() for k, v in state_dict.items()}


def load_state_dict(model: nn.Module, state_dict: dict, assign: bool = False) -> nn.Module:
    """Strict load whose errors name the missing/unexpected keys and mismatched shapes."""
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(state_dict)), sorted(set(state_dict) - set(ours))
    if missing or unexpected:
        raise ValueError(f"state_dict does not match the model: missing keys {_listing(missing)}; "
                         f"unexpected keys {_listing(unexpected)}")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
           for k, v in state_dict.items() if v.shape != ours[k].shape]
    if bad:
        raise ValueError(f"shape mismatch in {len(bad)} tensors: " + "; ".join(bad[:5]))
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


def _from_weights(config: CLIPConfig, state_dict: dict) -> CLIP:
    with torch.device("meta"):  # skip random init: every tensor comes from the state_dict
        model = CLIP(config)
    return load_state_dict(model, state_dict, assign=True).eval()


def build_model(state_dict: dict) -> CLIP:
    """A fp32 CLIP in eval mode with the architecture inferred from (OpenAI's) weights."""
    state_dict = _clean_state_dict(state_dict)
    return _from_weights(config_from_state_dict(state_dict), state_dict)


# ----- files -----

def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/", 1)[-1].startswith("code/") for name in z.namelist())


def read_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """The tensors of a .safetensors file; InputError naming the file when it is not a whole one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:  # its message never names the file
        raise InputError(str(path), f"not a safetensors file, or a truncated one ({e})", _SAFE_FIX) from e


def read_torch_weights(path: str | Path) -> dict:
    """torch.load of plain tensors and containers only: a pickle of code is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, i.e. running the file's code: never do that here
        named = re.search(r"GLOBAL (\S+)", str(e), re.IGNORECASE)
        if named:
            raise InputError(str(path), f"a pickle that is not plain weights (it names {named.group(1)}); this "
                             "project never unpickles code", "convert it to safetensors where it came from") from None
        raise InputError(str(path), "not a PyTorch checkpoint (not a pickle of tensors)", _SAFE_FIX) from None
    except (RuntimeError, EOFError) as e:  # a torch.save zip that is cut short or damaged
        raise InputError(str(path), f"not a whole PyTorch checkpoint ({str(e).split('.')[0]})", _SAFE_FIX) from None


def read_config(path: str | Path) -> CLIPConfig:
    """The CLIPConfig of a checkpoint folder's config.json; InputError naming the file when it is not one."""
    try:
        return CLIPConfig.from_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (a checkpoint folder holds config.json and "
                                "model.safetensors)") from None
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        kind = "not JSON" if isinstance(e, json.JSONDecodeError) else "not a CLIP config"
        raise InputError(str(path), f"{kind} ({e})", _SAFE_FIX) from None


def read_state_dict(path: str | Path) -> dict:
    """The tensors of one weights file: safetensors, OpenAI's TorchScript archive, or a torch.save'd dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if _is_torchscript(path):  # OpenAI's released .pt files
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    return read_torch_weights(path)


def load_checkpoint(path: str | Path) -> CLIP:
    """A fp32 CLIP from .safetensors, .pt/.pth (TorchScript or state_dict) or a saved folder."""
    path = Path(path)
    if path.is_dir():
        config = read_config(path / CONFIG_FILE)
        return _from_weights(config, _clean_state_dict(read_safetensors(path / MODEL_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return build_model(read_state_dict(path))


def save_checkpoint(model: CLIP, folder: str | Path, config: CLIPConfig | None = None) -> Path:
    """Write model.safetensors (OpenAI key names) and config.json into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state_dict, str(folder / MODEL_FILE))
    (config or model.config).to_json(folder / CONFIG_FILE)
    return folder


# ----- folders, written whole -----

def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` to `folder`; an existing `folder` is moved aside first, then removed."""
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _aside(folder: Path) -> Path:
    """A fresh temporary folder beside `folder` (same file system: the swap is a rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_checkpoint(model: CLIP, folder: str | Path, train_state: dict | None = None) -> Path:
    """model.safetensors, config.json and (given) train_state.pt into `folder`, whole or not at all."""
    folder = Path(folder)
    tmp = _aside(folder)
    try:
        save_checkpoint(model, tmp)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def is_uri(path: str | Path) -> bool:
    """Whether `path` names a remote fsspec location (s3://...) rather than a local path or file:// URI."""
    return "://" in str(path) and not str(path).startswith("file://")


def _upload_model(checkpoint: Path, uri: str) -> str:
    """Upload model.safetensors, then config.json, each file one whole object (an object store has no rename)."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)
    for name in (MODEL_FILE, CONFIG_FILE):  # config.json last: a reader that finds it finds the weights
        fs.put_file(str(checkpoint / name), f"{path.rstrip('/')}/{name}")
    return uri


def export_model(checkpoint: str | Path, folder: str | Path) -> Path | str:
    """Copy a checkpoint's model (safetensors + config.json, no training state) to `folder`, whole or not at all.

    `folder` may be an fsspec URI (s3://bucket/out/model): then the URI is returned.
    """
    if is_uri(folder):
        return _upload_model(Path(checkpoint), str(folder))
    folder = Path(folder)
    tmp = _aside(folder)
    try:
        for name in (MODEL_FILE, CONFIG_FILE):
            shutil.copy2(Path(checkpoint) / name, tmp / name)
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_train_state(folder: str | Path) -> dict:
    """The train_state.pt of a checkpoint folder (tensors on the CPU)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in {folder}: not a training checkpoint")
    return read_torch_weights(path)


def verify_checkpoint(folder: str | Path) -> CLIPConfig:
    """The model config of a whole training checkpoint; InputError naming the damaged or missing file.

    Cheap: reads the safetensors header (which must cover the file) and the zip directory of
    train_state.pt (at its end, so a cut file has none), not the tensors.
    """
    folder = Path(folder)
    for name in (CONFIG_FILE, MODEL_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise InputError(str(folder), f"not a whole training checkpoint: no {name}", _RESUME_FIX)
    try:
        with safe_open(str(folder / MODEL_FILE), "pt"):
            pass
    except SafetensorError as e:
        raise InputError(str(folder / MODEL_FILE), f"truncated or not a safetensors file ({e})", _RESUME_FIX) from None
    try:
        zipfile.ZipFile(folder / STATE_FILE).close()
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(str(folder / STATE_FILE), f"truncated or damaged ({e})", _RESUME_FIX) from None
    return read_config(folder / CONFIG_FILE)


def _remote_step_folders(uri: str) -> list[str]:
    """Complete `step_N` folders under an fsspec URI, oldest first, as URIs."""
    fs, root = fsspec.core.url_to_fs(uri)
    protocol = uri.split("://", 1)[0]
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), p) for p in entries
             if (m := STEP_DIR.match(p.rstrip("/").rsplit("/", 1)[-1])) and fs.isfile(f"{p}/{STATE_FILE}")]
    return [f"{protocol}://{p}" for _, p in sorted(found)]


def step_folders(root: str | Path) -> list[Path] | list[str]:
    """Complete `step_N` training checkpoint folders under `root`, oldest first (URIs for a remote `root`)."""
    if is_uri(root):
        return _remote_step_folders(str(root))
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | str | None:
    """The newest complete `step_N` checkpoint folder under `root` (a URI for a remote `root`), or None."""
    folders = step_folders(root)
    return folders[-1] if folders else None


# ----- which checkpoint a path means (see the module docstring) -----

_CHECKPOINT_DIR = re.compile(r"^(?:checkpoint|step)(?:[_-](.*))?$")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_CHECKPOINT_FIX = ("pass a model.safetensors (+ config.json) written by `clip-pipeline train`, "
                   "an OpenAI .pt, or a training output folder")


def _step(name: str) -> int | None:
    match = _CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match and match.group(1) and match.group(1).isdigit() else None


def _newest_first(folders: list[Path]) -> list[Path]:
    """By step number when every name has one, else by modification time (then name)."""
    steps = [_step(f.name) for f in folders]
    if all(s is not None for s in steps):
        return [f for _, f in sorted(zip(steps, folders), key=lambda t: (t[0], t[1].name), reverse=True)]
    return sorted(folders, key=lambda f: (f.stat().st_mtime, f.name), reverse=True)


def _checkpoint_folders(folder: Path, depth: int = 3) -> list[Path]:
    """Folders named checkpoint_*/step_*/model up to `depth` levels down (not inside one another)."""
    found = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _CHECKPOINT_DIR.match(d.name) or d.name == "model":
            found.append(d)
        elif depth > 1:
            found += _checkpoint_folders(d, depth - 1)
    return found


def resolve_checkpoint(path: str | Path) -> Path:
    """The file or folder `load_checkpoint` should read for CKPT (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / MODEL_FILE).is_file():
        return path if (path / CONFIG_FILE).is_file() else path / MODEL_FILE
    for candidate in _newest_first(_checkpoint_folders(path)):
        try:
            return resolve_checkpoint(candidate)
        except FileNotFoundError:
            continue  # e.g. a checkpoint still being written
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(weights) == 1:
        return weights[0]
    found = f"several weight files ({', '.join(p.name for p in weights)})" if weights else "no weights"
    raise FileNotFoundError(f"no checkpoint in {path}: {found}; expected model.safetensors + config.json, "
                            f"one weight file, or checkpoint_*/step_* folders")


def load_model(checkpoint: str | Path) -> tuple[CLIP, Path]:
    """(model in eval mode, resolved path); a file that is no loadable CLIP raises InputError naming it."""
    resolved = resolve_checkpoint(checkpoint)
    try:
        return load_checkpoint(resolved).eval(), resolved
    except Exception as err:  # noqa: BLE001 -- any failure to read these bytes means a bad checkpoint file
        if isinstance(err, InputError) and str(resolved) in str(err):
            raise
        what = "model.safetensors does not match config.json" if resolved.is_dir() else "cannot load a CLIP from it"
        raise InputError(f"checkpoint {resolved}", f"{what}: {type(err).__name__}: {err}", _CHECKPOINT_FIX) from err
