"""Check at the door: what `train` reads, validated before any cluster, tracker or worker starts.

A mistake found inside the workers surfaces half a minute in, as one traceback per rank;
found here it is one InputError naming the file, the field and the fix (exit code 2).
The checks are cheap: the corpus is read up to its first usable image, a checkpoint up to
its headers.
"""
from __future__ import annotations

import json
from pathlib import Path

import fsspec

from clip_core.config import CLIPConfig, load_preset
from clip_core.errors import InputError, check
from clip_core.train.config import TrainConfig
from clip_core.train.data import check_corpus, list_shards, load_excluded_keys
from clip_core.weights import CONFIG_FILE, MODEL_FILE, STATE_FILE, is_uri, verify_checkpoint

RESUME_FIX = "give a checkpoint folder (OUT/ray/NAME/step_N), --resume auto to continue OUT's run, " \
             "or --resume never to start afresh"


def _is_dir(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.isdir(path)


def check_training_inputs(cfg: TrainConfig, resume: str | None = None) -> list[str]:
    """The corpus's shard URIs, once every input of `cfg` (and the checkpoint `resume` names) is usable.

    Raises InputError naming the file, the field and the fix.
    """
    cfg.total_steps  # --steps or --samples given
    list_shards(cfg.corpus)  # the corpus exists and has shards: the first thing a user gives
    missing = [p for p in cfg.eval if not _is_dir(p)]
    check(not missing, "--eval", f"eval set folders not found: {missing}", "give folders written by "
          "`clip-pipeline web generate` or in CLIP_benchmark's layout")
    exclude = load_excluded_keys(cfg.exclude)
    urls = check_corpus(cfg.corpus, exclude=exclude, exclude_source=cfg.exclude)
    if resume is not None:
        check(_is_dir(resume), "--resume", f"{resume} does not exist", RESUME_FIX)
        check_checkpoint_matches(resume, cfg)
    return urls


def model_config(cfg: TrainConfig):
    """The CLIPConfig that `cfg` trains: its preset with the --image-size and --context-length overrides."""
    return load_preset(cfg.preset).replace(**cfg.model_overrides())


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differences(saved, wanted) -> list[str]:
    """"vision_cfg.width: checkpoint 256 vs configured 128" for each field where two CLIPConfigs differ."""
    a, b = _flat(saved.to_dict()), _flat(wanted.to_dict())
    return [f"{k}: checkpoint {a.get(k)} vs configured {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def remote_checkpoint_config(uri: str) -> CLIPConfig:
    """The model config of a training checkpoint on an object store: its three files are there, config.json read."""
    fs, path = fsspec.core.url_to_fs(uri)
    for name in (CONFIG_FILE, MODEL_FILE, STATE_FILE):
        check(fs.isfile(f"{path}/{name}"), uri, f"not a whole training checkpoint: no {name}", RESUME_FIX)
    try:
        return CLIPConfig.from_dict(json.loads(fs.cat_file(f"{path}/{CONFIG_FILE}")))
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise InputError(f"{uri}/{CONFIG_FILE}", f"not a CLIP config ({e})", RESUME_FIX) from None


def check_checkpoint_matches(folder: str | Path, cfg: TrainConfig) -> None:
    """InputError unless `folder` (a local folder or an fsspec URI) is a whole checkpoint of the model `cfg` trains."""
    remote = is_uri(folder)
    saved, wanted = remote_checkpoint_config(str(folder)) if remote else verify_checkpoint(folder), model_config(cfg)
    if saved.to_dict() == wanted.to_dict():
        return
    diff = "; ".join(_differences(saved, wanted)[:4])
    size = (f" --image-size {cfg.image_size}" if cfg.image_size else "") + (
        f" --context-length {cfg.context_length}" if cfg.context_length else "")
    raise InputError(f"{folder}/{CONFIG_FILE}" if remote else str(Path(folder) / CONFIG_FILE), f"this checkpoint is of another model than --preset "
                     f"{cfg.preset}{size} ({diff})", "train with the checkpoint's preset to continue it, or start "
                     "afresh with --resume never or a new OUT")
