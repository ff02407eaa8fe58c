"""dedup/copy_detector.py and dedup/augment.py: the Appendix C detector trains, saves and loads."""
import numpy as np
import pytest
import torch

from dedup.augment import COPY_KINDS, copy_of, image_source, procedural_image, train_view
from dedup.copy_detector import (BlurPool, CopyDetector, DetectorConfig, default_detector_path, encode_images,
                                 info_nce, load_detector, save_detector, train_copy_detector)

TINY = DetectorConfig(image_size=32, widths=(8, 16, 32), depths=(1, 1, 1), embed_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_blur_pool_halves_and_keeps_constants():
    x = torch.ones(2, 4, 8, 8)
    y = BlurPool(4)(x)
    assert y.shape == (2, 4, 4, 4)
    assert torch.allclose(y[:, :, 1:, 1:], torch.ones(()))  # zero padding only touches the border


def test_model_outputs_unit_vectors():
    z = CopyDetector(TINY)(torch.randn(3, 3, 32, 32))
    assert z.shape == (3, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)


def test_info_nce_known_values():
    z = torch.eye(8)
    assert info_nce(z, z).item() == pytest.approx(np.log(1 + 7 * np.exp(-1 / 0.07)), abs=1e-6)
    same = torch.nn.functional.normalize(torch.ones(8, 4), dim=1)
    assert info_nce(same, same).item() == pytest.approx(np.log(8), abs=1e-5)  # no signal: chance


def test_augmentations_are_seeded_and_sized():
    img = procedural_image(np.random.default_rng(0), 96)
    a, b = (train_view(img, np.random.default_rng(5), 32) for _ in range(2))
    assert a.size == (32, 32) and np.array_equal(np.asarray(a), np.asarray(b))
    for kind in COPY_KINDS:
        assert copy_of(img, np.random.default_rng(1), [kind]).mode == "RGB"
    assert copy_of(img, np.random.default_rng(1), ["crop"]).size == (82, 82)  # 85% of each side


@pytest.mark.slow
def test_short_training_decreases_the_loss(tmp_path):
    rng = np.random.default_rng(0)
    pool = [procedural_image(rng, 64) for _ in range(48)]
    model, losses = train_copy_detector(pool, tmp_path / "det", steps=40, batch_size=16, lr=3e-3, config=TINY)
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3
    loaded = load_detector(tmp_path / "det")
    assert loaded.config == TINY and not loaded.training
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # fp16 storage: the same descriptors up to rounding
        assert torch.allclose(loaded(x), model(x), atol=2e-2)


def test_image_source_and_pool_need_two_images():
    rng = np.random.default_rng(0)
    assert image_source()(rng).size == (128, 128)
    with pytest.raises(ValueError, match="at least two images"):
        train_copy_detector([procedural_image(rng)], None, steps=1, config=TINY)


def test_save_load_roundtrip(tmp_path):
    model = CopyDetector(TINY).eval()
    save_detector(model, tmp_path / "d", {"note": "test"})
    assert load_detector(tmp_path / "d").config == TINY
    with pytest.raises(FileNotFoundError, match="no copy detector"):
        load_detector(tmp_path / "missing")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "model.safetensors"]  # no temp files


def test_a_damaged_detector_is_an_input_error_naming_the_file(tmp_path):
    """Issue 14: a random-bytes model.safetensors gave safetensors' own traceback, the file unnamed."""
    from clip_core.errors import InputError
    save_detector(CopyDetector(TINY).eval(), tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(InputError, match=r"d/model.safetensors: cannot read detector weights"):
        load_detector(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text('{"config": {"image_size": 32, "no_such_field": 1}}')
    with pytest.raises(InputError, match=r"d/config.json: not a copy detector config"):
        load_detector(tmp_path / "d")


def test_shipped_detector_loads_and_tells_copies_apart():
    path = default_detector_path()
    assert (path / "model.safetensors").stat().st_size < 2 * 1024 * 1024
    model = load_detector()
    rng = np.random.default_rng(3)
    images = [procedural_image(rng, 128) for _ in range(16)]
    copies = [copy_of(im, rng) for im in images]
    sims = encode_images(model, images) @ encode_images(model, copies).T  # (16, 16)
    assert np.allclose(np.linalg.norm(encode_images(model, images[:2]), axis=1), 1, atol=1e-4)
    assert (sims.argmax(axis=0) == np.arange(16)).mean() >= 0.9
    assert np.diag(sims).mean() > sims[~np.eye(16, dtype=bool)].mean() + 0.2
