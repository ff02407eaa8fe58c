"""CLIP model: OpenAI's parameter names/shapes, output parity with OpenAI's code (loading: test_weights.py)."""
import math

import pytest
import torch

from clip_core.config import CLIPConfig, available_models, load_preset
from clip_core.model import CLIP, create_model
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


# ----- bad input -----

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
