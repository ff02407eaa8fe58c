"""Image decoding and CLIP preprocessing against answers computed independently with numpy."""
import io
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from clip_core.transforms import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    ImageDecodeError,
    center_crop,
    image_transform,
    load_image,
    random_resized_crop_params,
    resize_shortest_side,
)

MEAN = np.array(OPENAI_DATASET_MEAN, dtype=np.float32)
STD = np.array(OPENAI_DATASET_STD, dtype=np.float32)


def _rgb(width, height, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _expected(arr: np.ndarray) -> np.ndarray:
    """ToTensor then Normalize, in float32 numpy: (H, W, 3) uint8 -> (3, H, W)."""
    x = arr.astype(np.float32) / np.float32(255)
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_eval_on_exact_size_is_pure_normalisation():
    img = _rgb(224, 224)
    out = image_transform(224)(img)
    assert out.dtype == torch.float32 and out.shape == (3, 224, 224)
    np.testing.assert_array_equal(out.numpy(), _expected(np.asarray(img)))


@pytest.mark.parametrize(
    "size, resized, box",
    [
        ((300, 200), (336, 224), (56, 0, 280, 224)),  # round(112 / 2) = 56
        ((301, 200), (337, 224), (56, 0, 280, 224)),  # int(224 * 301 / 200) = 337; round(56.5) = 56
        ((200, 450), (224, 504), (0, 140, 224, 364)),  # portrait: crop rows 140..364
    ],
)
def test_eval_resizes_shortest_side_then_centre_crops(size, resized, box):
    img = _rgb(*size, seed=1)
    assert resize_shortest_side(img, 224).size == resized
    want = np.asarray(img.resize(resized, Image.BICUBIC))[box[1] : box[3], box[0] : box[2]]
    np.testing.assert_array_equal(image_transform(224)(img).numpy(), _expected(want))


def test_resize_is_a_no_op_at_the_target_size():
    img = _rgb(224, 300)
    assert resize_shortest_side(img, 224) is img


def test_center_crop_pads_a_small_image_with_zeros_as_torchvision():
    img = Image.fromarray(np.full((3, 5, 3), 200, dtype=np.uint8))  # 5 wide, 3 high
    out = np.asarray(center_crop(img, 8))
    # torchvision pads left (8-5)//2 = 1, right 2, top (8-3)//2 = 2, bottom 3
    want = np.zeros((8, 8, 3), dtype=np.uint8)
    want[2:5, 1:6] = 200
    np.testing.assert_array_equal(out, want)


def test_center_crop_pads_one_side_and_crops_the_other():
    arr = np.arange(10 * 2, dtype=np.uint8).reshape(10, 2)  # 2 wide, 10 high
    out = np.asarray(center_crop(Image.fromarray(arr), 4))
    want = np.zeros((4, 4), dtype=np.uint8)
    want[:, 1:3] = arr[3:7]  # top = round(6 / 2) = 3, left pad (4-2)//2 = 1
    np.testing.assert_array_equal(out, want)


def _image_in_mode(mode: str) -> Image.Image:
    rng = np.random.default_rng(2)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16))
    base = Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA")
    if mode == "P-transparency":
        img = base.convert("RGB").convert("P")
        img.info["transparency"] = bytes(range(256))
        return img
    return base.convert(mode)


MODES = ["1", "L", "LA", "P", "P-transparency", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("train", [False, True])
def test_every_mode_gives_a_float_rgb_tensor(mode, train):
    out = image_transform(16, train=train, generator=0)(_image_in_mode(mode))
    assert out.dtype == torch.float32 and out.shape == (3, 16, 16)
    assert torch.isfinite(out).all()


def test_alpha_is_dropped_not_composited():
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., :3] = (10, 20, 30)  # fully transparent pixels keep their stored colour
    out = image_transform(8)(Image.fromarray(arr, "RGBA"))
    np.testing.assert_array_equal(out.numpy(), _expected(np.broadcast_to(arr[..., :3], (8, 8, 3))))


def test_16_bit_greyscale_is_scaled_not_clipped():
    arr = np.full((8, 8), 128 * 256, dtype=np.uint16)
    out = image_transform(8)(Image.fromarray(arr))
    np.testing.assert_array_equal(out.numpy(), _expected(np.full((8, 8, 3), 128, dtype=np.uint8)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_train_output_is_the_sampled_crop_resized():
    img = _rgb(120, 90, seed=3)
    top, left, h, w = random_resized_crop_params(120, 90, (0.5, 1.0), (3 / 4, 4 / 3), _gen(7))
    want = np.asarray(img.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC))
    out = image_transform(32, train=True, scale=(0.5, 1.0), generator=7)(img)
    np.testing.assert_array_equal(out.numpy(), _expected(want))


def test_train_is_deterministic_per_seed_and_varies_across_seeds():
    img = _rgb(120, 90, seed=4)
    def run(seed):
        return image_transform(32, train=True, scale=(0.3, 1.0), generator=seed)(img)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    boxes = {random_resized_crop_params(120, 90, (0.3, 1.0), generator=_gen(s)) for s in range(20)}
    assert len(boxes) > 10


def test_a_transform_with_a_generator_survives_pickling():
    t = image_transform(16, train=True, generator=3)
    assert torch.equal(pickle.loads(pickle.dumps(t))(_rgb(40, 30)), t(_rgb(40, 30)))


def _torchvision_get_params(width, height, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, transcribed, drawing from the global RNG."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("size, scale", [((640, 480), (0.08, 1.0)), ((250, 240), (0.9, 1.0))])
def test_crop_params_follow_torchvision_draw_for_draw(size, scale):
    for seed in range(200):
        torch.manual_seed(seed)
        want = _torchvision_get_params(*size, scale, (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        assert random_resized_crop_params(*size, scale) == want
        assert random_resized_crop_params(*size, scale, generator=_gen(seed)) == want


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.3, 0.6), (0.08, 1.0)])
def test_crop_area_and_aspect_within_bounds(scale):
    width = height = 400
    ratio = (3 / 4, 4 / 3)
    g = _gen(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(width, height, scale, ratio, g)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        slack = 0.5 * (w + h) + 0.25  # w and h are each rounded from the exact sqrt
        assert scale[0] * width * height - slack <= w * h <= scale[1] * width * height + slack
        assert ratio[0] - 1 / h <= w / h <= ratio[1] + 1 / h or (w, h) == (width, height)


def test_crop_falls_back_to_the_centre_after_ten_misses():
    # a 300x200 image has aspect 1.5 > 4/3: no crop of 90 %+ of its area fits, every try misses
    box = random_resized_crop_params(300, 200, (0.9, 1.0), (3 / 4, 4 / 3), _gen(0))
    assert box == (0, (300 - 267) // 2, 200, 267)  # w = round(200 * 4 / 3)
    assert random_resized_crop_params(100, 400, (0.95, 1.0)) == ((400 - 133) // 2, 0, 133, 100)


def test_load_image_decodes_bytes_paths_and_files(tmp_path):
    img = _rgb(20, 10)
    data = _encoded(img, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for source in (data, path, str(path), io.BytesIO(data)):
        out = load_image(source)
        assert out.size == (20, 10)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_non_image_bytes_raise_naming_the_image():
    with pytest.raises(ImageDecodeError, match="shard-3/000042"):
        load_image(b"<html>404 not found</html>", name="shard-3/000042")
    with pytest.raises(ImageDecodeError, match=r"<26 bytes>"):
        load_image(b"<html>404 not found</html>")


def test_non_image_file_raises_naming_its_path(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not really a jpeg")
    with pytest.raises(ImageDecodeError, match="notes.jpg"):
        load_image(path)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_raises(fmt):
    data = _encoded(_rgb(64, 64), fmt)
    with pytest.raises(ImageDecodeError, match="cut"):
        load_image(data[: len(data) // 2], name="cut")


def test_corrupt_png_raises():
    data = bytearray(_encoded(_rgb(64, 64), "PNG"))
    data[60:80] = b"\xff" * 20  # inside the first IDAT chunk: bad CRC / bad zlib stream
    with pytest.raises(ImageDecodeError):
        load_image(bytes(data))


def test_decompression_bomb_is_refused_before_decoding():
    data = _encoded(Image.new("L", (100, 100)), "PNG")
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageDecodeError, match="bomb"):
        load_image(data, name="big.png", max_pixels=9_999)


def test_pil_hard_bomb_limit_becomes_the_same_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    data = _encoded(Image.new("L", (100, 100)), "PNG")  # 10x PIL's limit: PIL itself raises
    with pytest.raises(ImageDecodeError, match="DecompressionBomb"):
        load_image(data, max_pixels=10**6)
