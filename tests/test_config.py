"""Architecture configs: presets as data, exact OpenAI dimensions, unknown keys raise."""
import dataclasses

import pytest

from clip_core.config import CLIPConfig, TextConfig, VisionConfig, available_models, load_preset

# (embed_dim, image_size, vision layers, vision width, patch_size, text width, text heads)
# from OpenAI's released checkpoints (open_clip model_configs/*.json).
OPENAI = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 512, 8),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 512, 8),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 640, 10),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 768, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 1024, 16),
    "ViT-B-32": (512, 224, 12, 768, 32, 512, 8),
    "ViT-B-16": (512, 224, 12, 768, 16, 512, 8),
    "ViT-L-14": (768, 224, 24, 1024, 14, 768, 12),
    "ViT-L-14-336": (768, 336, 24, 1024, 14, 768, 12),
}


def test_available_models_lists_every_preset_sorted():
    names = available_models()
    assert names == sorted(names)
    assert set(names) == set(OPENAI) | {"tiny", "tiny-rn"}


@pytest.mark.parametrize("name", sorted(OPENAI))
def test_openai_presets_have_the_released_dimensions(name):
    c = load_preset(name)
    v, t = c.vision, c.text
    assert (c.embed_dim, v.image_size, v.layers, v.width, v.patch_size, t.width, t.heads) == OPENAI[name]
    assert (t.context_length, t.vocab_size, t.layers) == (77, 49408, 12)


@pytest.mark.parametrize("name, heads", [("RN50", 32), ("RN50x64", 64), ("ViT-B-32", 12), ("ViT-L-14", 16)])
def test_vision_heads_follow_openai_rule(name, heads):
    assert load_preset(name).vision.heads == heads


def test_tiny_presets_fit_the_real_tokenizer():
    tiny, rn = load_preset("tiny"), load_preset("tiny-rn")
    assert (tiny.vision.heads, tiny.vision.patch_size, tiny.vision.image_size) == (4, 8, 64)
    assert rn.vision.is_resnet and rn.vision.layers == (1, 1, 1, 1)
    for c in (tiny, rn):
        assert (c.text.context_length, c.text.vocab_size) == (77, 49408)


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32", "tiny", "tiny-rn"])
def test_dict_and_json_round_trip(name, tmp_path):
    c = load_preset(name)
    assert CLIPConfig.from_dict(c.to_dict()) == c
    c.to_json(tmp_path / "config.json")
    assert CLIPConfig.from_json(tmp_path / "config.json") == c


@pytest.mark.parametrize("d, bad", [
    ({"embed_dim": 512, "quick_gelu": True}, "quick_gelu"),
    ({"vision_cfg": {"image_size": 224, "patch_dropout": 0.1}}, "patch_dropout"),
    ({"text_cfg": {"hf_model_name": "x"}}, "hf_model_name"),
])
def test_unknown_keys_raise_and_are_named(d, bad):
    with pytest.raises(ValueError, match=bad):
        CLIPConfig.from_dict(d)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"ViT-B-32.*tiny"):
        load_preset("ViT-Z-99")


@pytest.mark.parametrize("kwargs, match", [
    ({"layers": (3, 4, 6), "patch_size": None}, "4 stage depths"),
    ({"layers": 12, "patch_size": None}, "4 stage depths"),
    ({"layers": (1, 1, 1, 1), "patch_size": 16}, "int layers"),
    ({"image_size": 200, "patch_size": 32}, "not divisible"),
    ({"image_size": 200, "layers": (1, 1, 1, 1), "patch_size": None}, "divisible by 32"),
    ({"width": 768, "heads": 7}, "does not divide"),
])
def test_invalid_vision_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig(**kwargs)


def test_invalid_text_heads_raise():
    with pytest.raises(ValueError, match="does not divide"):
        TextConfig(width=512, heads=7)


def test_replace_merges_nested_overrides():
    c = load_preset("ViT-B-32").replace(vision_cfg={"image_size": 160}, embed_dim=256)
    assert (c.vision.image_size, c.vision.patch_size, c.embed_dim) == (160, 32, 256)


def test_configs_are_frozen_and_layers_a_tuple():
    c = CLIPConfig.from_dict({"vision_cfg": {"layers": [1, 2, 3, 4], "patch_size": None}})
    assert c.vision.layers == (1, 2, 3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.embed_dim = 1
