"""dedup/descriptors.py: pHash against a plain reference, descriptor specs, decoding."""
import io

import numpy as np
import pytest
import scipy.fft
import torch
from PIL import Image

from dedup.augment import copy_of, procedural_image
from dedup.descriptors import (ALIASES, ClipDescriptor, PHashDescriptor, decode_all, hamming_similarity,
                               make_descriptors, pair_similarity, phash)


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_phash(img: Image.Image) -> int:
    """The textbook pHash: 32x32 grey, 2-D DCT, top-left 8x8 against its median, as one int."""
    grey = np.asarray(img.convert("L").resize((32, 32), Image.LANCZOS), np.float64)
    dct = scipy.fft.dct(scipy.fft.dct(grey, axis=0, norm="ortho"), axis=1, norm="ortho")
    low = dct[:8, :8].ravel()
    bits = "".join("1" if v > np.median(low) else "0" for v in low)
    return int(bits, 2)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [procedural_image(rng, 128) for _ in range(12)]


def test_phash_equals_the_textbook_definition(images):
    codes = phash(images)
    assert codes.shape == (12, 8) and codes.dtype == np.uint8
    for img, code in zip(images, codes):
        assert int.from_bytes(code.tobytes(), "big") == _reference_phash(img)


def test_phash_survives_rescale_and_jpeg_but_not_a_different_image(images):
    rng = np.random.default_rng(1)
    d = PHashDescriptor()
    codes = d.encode(images)
    copies = d.encode([copy_of(im, rng, ["rescale"]) for im in images])
    same = pair_similarity(d, codes, copies)
    other = pair_similarity(d, codes, np.roll(codes, 1, axis=0))
    assert same.mean() > 0.9 and other.mean() < 0.7


def test_larger_hashes_and_empty_input():
    img = procedural_image(np.random.default_rng(2))
    assert phash([img], hash_size=16).shape == (1, 32)  # 256 bits
    assert phash([]).shape == (0, 8)
    assert PHashDescriptor(hash_size=16).dim == 256


def test_similarity_scales():
    np.testing.assert_allclose(hamming_similarity(np.array([0, 32, 64]), 64), [1.0, 0.5, 0.0])
    a = np.eye(3, dtype=np.float32)
    d = type("Float", (), {"binary": False})()
    np.testing.assert_allclose(pair_similarity(d, a, a), 1.0)


def test_descriptor_specs():
    assert ALIASES["combined"] == "phash+detector"
    assert [d.name for d in make_descriptors("default")] == ALIASES["default"].split("+")
    assert [d.name for d in make_descriptors("phash")] == ["phash"]
    with pytest.raises(ValueError, match="unknown descriptor"):
        make_descriptors("phash+sift")
    with pytest.raises(ValueError, match="twice"):
        make_descriptors("phash+phash")


def test_a_bad_clip_checkpoint_descriptor_is_an_input_error(tmp_path):
    from clip_core.errors import InputError
    (tmp_path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(InputError, match="model.safetensors"):
        make_descriptors(f"phash+clip:{tmp_path / 'model.safetensors'}")
    with pytest.raises(InputError, match="--descriptor: unknown descriptor"):
        make_descriptors("sift")


def test_detector_descriptor_encodes_unit_vectors(images):
    (d,) = make_descriptors("detector")
    z = d.encode(images[:3])
    assert z.shape == (3, d.dim) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-4)


@pytest.mark.slow
def test_clip_checkpoint_descriptor(tmp_path, images):
    from clip_core.model import create_model
    from clip_core.weights import save_checkpoint
    save_checkpoint(create_model("tiny"), tmp_path / "clip")
    (d,) = make_descriptors(f"clip:{tmp_path / 'clip'}")
    assert isinstance(d, ClipDescriptor) and d.name.startswith("clip:")
    z = d.encode(images[:2])
    assert z.shape == (2, d.dim) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-4)


def test_decode_all_reports_unreadable_images(images):
    buf = io.BytesIO()
    images[0].save(buf, "JPEG")
    decoded, ok, errors = decode_all([buf.getvalue(), b"junk", buf.getvalue()[:50]], ["a.jpg", "b.jpg", "c.jpg"])
    assert ok == [0] and len(decoded) == 1 and decoded[0].mode == "RGB"
    assert len(errors) == 2 and "b.jpg" in errors[0]
