"""CLIP model: OpenAI's parameter names/shapes, output parity with OpenAI's code, loading."""
import math

import pytest
import torch
from safetensors.torch import save_file

from clip_core.config import CLIPConfig, available_models, load_preset
from clip_core.errors import InputError
from clip_core.model import (CLIP, build_model, config_from_state_dict, create_model, load_checkpoint,
                             load_state_dict, save_checkpoint)
from openai_reference import openai_model_module

# Parameter counts of OpenAI's released architectures (OpenAI's CLIP built with these dims).
PARAMS = {
    "RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
    "RN50x64": 623_258_305, "ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513, "ViT-L-14-336": 427_944_193,
}


def openai_clip(config: CLIPConfig) -> torch.nn.Module:
    """OpenAI's CLIP with the same dims; vision heads set by hand where a preset overrides width//64."""
    v, t = config.vision, config.text
    ref = openai_model_module().CLIP(
        config.embed_dim, v.image_size, v.layers, v.width, v.patch_size,
        t.context_length, t.vocab_size, t.width, t.heads, t.layers)
    if v.is_resnet:
        ref.visual.attnpool.num_heads = v.heads
    else:
        for block in ref.visual.transformer.resblocks:
            block.attn.num_heads, block.attn.head_dim = v.heads, v.width // v.heads
    return ref.eval()


def tokens(batch: int, context_length: int = 77) -> torch.Tensor:
    """Random token rows: [SOT] words [EOT] then padding, with the EOT at varying positions."""
    text = torch.zeros(batch, context_length, dtype=torch.long)
    for i in range(batch):
        n = 3 + (i * 17) % (context_length - 4)
        text[i, 0], text[i, 1:n + 1], text[i, n + 1] = 49406, torch.randint(1, 49405, (n,)), 49407
    return text


def images(config: CLIPConfig, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, config.vision.image_size, config.vision.image_size)


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max() <= rtol * b.abs().max(), f"max rel diff {(a - b).abs().max() / b.abs().max():.2e}"


def assert_same_outputs(ours, ref, config: CLIPConfig, rtol: float = 1e-5) -> None:
    image, text = images(config), tokens(2, config.text.context_length)
    with torch.no_grad():
        assert_close(ours.encode_image(image), ref.encode_image(image), rtol)
        assert_close(ours.encode_text(text), ref.encode_text(text), rtol)


def shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_ref():
    torch.manual_seed(1)
    return openai_clip(load_preset("tiny"))


# ----- architecture -----

@pytest.mark.parametrize("name", available_models())
def test_preset_has_openai_names_and_shapes(name):
    with torch.device("meta"):
        ours = create_model(name)
        ref = openai_clip(ours.config)
    assert shapes(ours) == shapes(ref)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert n == PARAMS.get(name, n)


def test_init_follows_openai():
    model = create_model("tiny-rn")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert all(b.bn3.weight.abs().sum() == 0 for layer in (model.visual.layer1, model.visual.layer4) for b in layer)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_forward_returns_normalised_features_and_scale(name):
    model = create_model(name).eval()
    image_features, text_features, scale = model(images(model.config, 3), tokens(3))
    assert image_features.shape == text_features.shape == (3, model.config.embed_dim)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6)


def test_text_features_come_from_the_end_of_text_token():
    model = create_model("tiny").eval()
    text = tokens(2)
    eot = text.argmax(dim=-1)
    changed = text.clone()
    changed[0, eot[0] + 1:] = 5  # tokens after [EOT] are invisible to a causal model
    with torch.no_grad():
        assert_close(model.encode_text(changed), model.encode_text(text))
        assert_close(model.encode_text(text[:, : eot.max() + 1]), model.encode_text(text))


# ----- parity with OpenAI's code -----

def check_parity_both_directions(name: str) -> None:
    config = load_preset(name)
    ref, ours = openai_clip(config), create_model(name).eval()
    own_weights = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True)  # theirs into ours
    assert_same_outputs(ours, ref, config)
    ref.load_state_dict(own_weights, strict=True)  # ours into theirs
    ours.load_state_dict(own_weights, strict=True)
    assert_same_outputs(ours, ref, config)


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_tiny_parity_both_directions(name):
    check_parity_both_directions(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_full_size_parity_both_directions(name):
    check_parity_both_directions(name)


# ----- build_model / checkpoints -----

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


# ----- bad input -----

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


def test_wrong_image_size_and_too_long_text_raise():
    model = create_model("tiny")
    with pytest.raises(ValueError, match="expects 64x64 images, got 48x48"):
        model.encode_image(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="context_length 77"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))


def test_create_model_overrides():
    model = create_model("tiny", vision_cfg={"image_size": 96})
    assert model.visual.positional_embedding.shape == (145, 128)
    assert model.encode_image(torch.zeros(1, 3, 96, 96)).shape == (1, 128)


# ----- gradient checkpointing -----

def _grads(model: CLIP, image: torch.Tensor, text: torch.Tensor) -> dict:
    model.zero_grad()
    image_features, text_features, scale = model(image, text)
    logits = scale * image_features @ text_features.T
    labels = torch.arange(len(image))
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_the_same_gradients():
    model = create_model("tiny")
    image, text = images(model.config, 4), tokens(4)
    plain = _grads(model, image, text)
    model.set_grad_checkpointing(True)
    assert model.transformer.grad_checkpointing and model.visual.transformer.grad_checkpointing
    checkpointed = _grads(model, image, text)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for k in plain:
        assert torch.allclose(plain[k], checkpointed[k], rtol=1e-5, atol=1e-7), k
