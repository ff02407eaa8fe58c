"""Checkpoint formats (clip_core.weights): OpenAI's .pt, safetensors with OpenAI names, training
checkpoint folders written whole, and which checkpoint a path means."""
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

import clip_core.weights as weights
from clip_core.config import load_preset
from clip_core.errors import InputError
from clip_core.model import CLIP, create_model
from clip_core.weights import (build_model, config_from_state_dict, export_model, latest_checkpoint, load_checkpoint,
                               load_model, load_state_dict, resolve_checkpoint, save_checkpoint, step_folders,
                               verify_checkpoint, write_checkpoint)
from test_model import assert_same_outputs, images, openai_clip, tokens


@pytest.fixture(scope="module")
def tiny_ref():
    torch.manual_seed(1)
    return openai_clip(load_preset("tiny"))


# ----- the architecture from the weights; weights files -----

@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_build_model_infers_the_preset(name):
    model = create_model(name)
    built = build_model(model.state_dict())
    assert built.config == load_preset(name) and not built.training
    assert all(p.device.type == "cpu" for p in built.state_dict().values())
    assert_same_outputs(built, model.eval(), model.config)


def test_build_model_reads_openai_fp16_checkpoints(tiny_ref):
    state_dict = {k: v.half() if v.is_floating_point() else v for k, v in tiny_ref.state_dict().items()}
    state_dict.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    model = build_model(state_dict)
    assert model.config == load_preset("tiny")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same_outputs(model, tiny_ref, model.config, rtol=5e-3)


def test_build_model_copies_the_weights(tiny_ref):
    state_dict = tiny_ref.state_dict()
    model = build_model(state_dict)
    state_dict["text_projection"].zero_()
    assert model.text_projection.abs().sum() > 0


def test_openai_heads_rule_for_unknown_dims():
    config = load_preset("tiny").replace(embed_dim=64, vision_cfg={"heads": None}, text_cfg={"heads": 2})
    with torch.device("meta"):
        inferred = config_from_state_dict(CLIP(config).state_dict())
    assert inferred == config and inferred.vision.heads == 2


def test_load_safetensors_plain_pt_and_wrapped_pt(tiny_ref, tmp_path):
    state_dict = tiny_ref.state_dict()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "m.safetensors")
    torch.save(state_dict, tmp_path / "m.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, tmp_path / "w.pth")
    for file in ("m.safetensors", "m.pt", "w.pth"):
        assert_same_outputs(load_checkpoint(tmp_path / file), tiny_ref, load_preset("tiny"))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_load_torchscript_archive_like_openai_releases(tmp_path):
    config = load_preset("tiny-rn")
    ref = openai_clip(config)
    for key, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        ref.__dict__.pop(key, None)  # OpenAI's archives hold these as top-level tensors
        ref.register_buffer(key, torch.tensor(value))
    torch.jit.save(torch.jit.trace(ref, (images(config), tokens(2)), check_trace=False), tmp_path / "RN.pt")
    assert_same_outputs(load_checkpoint(tmp_path / "RN.pt"), ref, config)


def test_save_checkpoint_round_trip(tmp_path):
    model = create_model("tiny").eval()
    save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert_same_outputs(loaded, model, model.config)


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")


def test_random_bytes_are_named_as_not_a_safetensors_file(tmp_path):
    save_checkpoint(create_model("tiny"), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "loose.safetensors").write_bytes(b"\x00" * 3)
    for path in (tmp_path / "ckpt", tmp_path / "loose.safetensors"):
        with pytest.raises(InputError, match=r"model.safetensors: not a safetensors file|"
                                             r"loose.safetensors: not a safetensors file"):
            load_checkpoint(path)


def test_a_pickle_of_code_is_refused_without_suggesting_to_unpickle_it(tmp_path):
    import fractions
    import os

    class RunsCode:
        def __reduce__(self):
            return os.getpid, ()

    torch.save({"weights": torch.zeros(2), "hook": RunsCode()}, tmp_path / "code.pt")
    torch.save({"ratio": fractions.Fraction(1, 3)}, tmp_path / "objects.pt")
    (tmp_path / "noise.pt").write_bytes(b"\x80\x02garbage" * 10)
    for name in ("code.pt", "objects.pt"):
        with pytest.raises(InputError, match=f"{name}: a pickle that is not plain weights .*never unpickles code") as e:
            load_checkpoint(tmp_path / name)
        assert "weights_only" not in str(e.value) and "convert it to safetensors" in str(e.value)
    with pytest.raises(InputError, match="noise.pt: not a PyTorch checkpoint") as e:
        load_checkpoint(tmp_path / "noise.pt")
    assert "weights_only" not in str(e.value)


# ----- state_dicts that do not fit -----

def test_missing_and_unexpected_keys_are_named(tiny_ref):
    state_dict = tiny_ref.state_dict()
    del state_dict["ln_final.bias"]
    state_dict["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys 1 \(ln_final.bias\).*unexpected keys 1 \(extra.weight\)"):
        load_state_dict(create_model("tiny"), state_dict)


def test_many_missing_keys_are_counted():
    state_dict = {k: v for k, v in create_model("tiny").state_dict().items() if "resblocks" not in k}
    with pytest.raises(ValueError, match=r"missing keys 96 \(.*\+91 more\)"):
        load_state_dict(create_model("tiny"), state_dict)


def test_shape_mismatch_names_key_and_shapes():
    state_dict = create_model("tiny").state_dict()
    state_dict["text_projection"] = torch.zeros(128, 64)
    with pytest.raises(ValueError, match=r"text_projection: checkpoint \(128, 64\) vs model \(128, 128\)"):
        load_state_dict(create_model("tiny"), state_dict)


def test_not_a_clip_state_dict():
    with pytest.raises(ValueError, match="not a CLIP state_dict"):
        build_model({"weight": torch.zeros(3)})


# ----- training checkpoint folders, written whole -----

def test_a_training_checkpoint_round_trips_weights_and_state(tmp_path):
    model = create_model("tiny")
    folder = write_checkpoint(model, tmp_path / "step_00000003", {"step": 3, "optimizer": {}})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "train_state.pt"]
    assert verify_checkpoint(folder) == model.config
    assert weights.read_train_state(folder) == {"step": 3, "optimizer": {}}
    assert_same_outputs(load_checkpoint(folder), model.eval(), model.config)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    first = write_checkpoint(create_model("tiny"), tmp_path / "step_00000001", {"step": 1})
    before = (first / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(weights.torch, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(create_model("tiny-rn"), first, {"step": 2})
    assert (first / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no temporary left behind


def test_export_copies_the_model_without_the_training_state_and_swaps_it_in(tmp_path, monkeypatch):
    checkpoint = write_checkpoint(create_model("tiny"), tmp_path / "ray" / "step_00000002", {"step": 2})
    out = tmp_path / "out" / "model"
    export_model(checkpoint, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    before = (out / "model.safetensors").read_bytes()
    (checkpoint / "config.json").unlink()  # a damaged checkpoint: the copy fails half way
    with pytest.raises(FileNotFoundError):
        export_model(checkpoint, out)
    assert (out / "model.safetensors").read_bytes() == before and (out / "config.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temporary left behind


def test_only_whole_step_folders_count(tmp_path):
    model = create_model("tiny")
    for step in (2, 10):
        write_checkpoint(model, tmp_path / f"step_{step:08d}", {"step": step})
    save_checkpoint(model, tmp_path / "step_00000020")  # weights but no train_state.pt: not a training checkpoint
    (tmp_path / "model").mkdir()
    assert [p.name for p in step_folders(tmp_path)] == ["step_00000002", "step_00000010"]
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_a_damaged_training_checkpoint_is_named(tmp_path):
    folder = write_checkpoint(create_model("tiny"), tmp_path / "step_00000001", {"step": 1})
    data = (folder / "train_state.pt").read_bytes()
    (folder / "train_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"train_state.pt: truncated or damaged.*--resume never"):
        verify_checkpoint(folder)
    (folder / "train_state.pt").unlink()
    with pytest.raises(InputError, match="not a whole training checkpoint: no train_state.pt"):
        verify_checkpoint(folder)


# ----- which checkpoint a path means -----

def _touch_checkpoint(folder, model=None):
    save_checkpoint(model or create_model("tiny"), folder)
    return folder


def test_resolve_checkpoint_picks_the_newest(tmp_path):
    run = tmp_path / "run"
    model = create_model("tiny")
    for step in (2, 10):
        _touch_checkpoint(run / f"step_{step:06d}", model)
    (run / "step_000020").mkdir()  # being written: no weights yet
    assert resolve_checkpoint(run) == run / "step_000010"
    ray = tmp_path / "ray"
    for i, name in enumerate(("checkpoint_2025-01-02_00-00-00.000000", "checkpoint_2025-01-01_00-00-00.000000")):
        _touch_checkpoint(ray / "checkpoints" / name, model)
        os.utime(ray / "checkpoints" / name, (time.time() - 100 * i, time.time() - 100 * i))
    assert resolve_checkpoint(ray).name == "checkpoint_2025-01-02_00-00-00.000000"


def test_resolve_checkpoint_in_a_training_output(tmp_path):
    out = tmp_path / "out"
    model = create_model("tiny")
    for step in (4, 8):
        _touch_checkpoint(out / "ray" / "train" / f"step_{step:08d}", model)
    nested = out / "ray" / "train" / "step_00000008"
    assert resolve_checkpoint(out) == nested  # step numbers decide
    _touch_checkpoint(out / "model", model)  # the exported final model, written last
    for i, folder in enumerate((out / "model", nested, out / "ray" / "train" / "step_00000004")):
        os.utime(folder, (time.time() - 100 * i, time.time() - 100 * i))
    assert resolve_checkpoint(out) == out / "model"  # mixed names: modification time decides


def test_resolve_checkpoint_files_and_failures(tmp_path):
    folder = _touch_checkpoint(tmp_path / "c")
    assert resolve_checkpoint(folder / "model.safetensors") == folder / "model.safetensors"
    (folder / "config.json").unlink()
    assert resolve_checkpoint(folder) == folder / "model.safetensors"  # architecture from the weights
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "missing")


def test_load_model_names_the_file_that_is_no_clip(tmp_path):
    model, resolved = load_model(_touch_checkpoint(tmp_path / "ok"))
    assert resolved == tmp_path / "ok" and not model.training
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"checkpoint .*other.pt: cannot load a CLIP from it.*not a CLIP state_dict"):
        load_model(tmp_path / "other.pt")
    shutil.copytree(tmp_path / "ok", tmp_path / "mixed")
    create_model("tiny-rn").config.to_json(tmp_path / "mixed" / "config.json")
    with pytest.raises(InputError, match="model.safetensors does not match config.json"):
        load_model(tmp_path / "mixed")
