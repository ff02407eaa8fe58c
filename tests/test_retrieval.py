"""Retrieval recall@k on constructed features with several captions per image (known answers)."""
import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_core.eval.retrieval import (
    evaluate_retrieval, flatten_captions, image_to_text_ranks, retrieval_metrics, text_to_image_ranks,
)
from clip_core.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def unit(*pairs) -> torch.Tensor:
    """A unit vector in R^3 from (axis, weight) pairs."""
    v = torch.zeros(3)
    for axis, w in pairs:
        v[axis] = w
    return v / v.norm()


def hand_case():
    """3 images e0, e1, e2; captions: img0 [t0], img1 [t1], img2 [t2, t3]."""
    images = torch.eye(3)
    texts = torch.stack([unit((0, 1)), unit((0, 1), (1, 0.6)), unit((2, 1)), unit((2, 1.2), (1, 1))])
    return images, texts, [0, 1, 2, 2]


def test_hand_case_known_recalls():
    # text->image: t1 scores img0 (0.86) above its img1 (0.51): 3 of 4 at rank 0.
    # image->text: img1's own t1 (0.51) is beaten by t3 (0.64): 2 of 3 at rank 0.
    images, texts, index = hand_case()
    m = retrieval_metrics(images, texts, index, ks=(1, 2, 5))
    assert m["image_retrieval_recall@1"] == pytest.approx(0.75)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["image_retrieval_recall@2"] == m["text_retrieval_recall@2"] == 1.0
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2, 5)}


def test_item_i_matches_item_i():
    images = F.normalize(torch.randn(20, 16), dim=-1)
    texts = images.repeat_interleave(5, dim=0) + 0.01 * torch.randn(100, 16)  # 5 captions each
    m = retrieval_metrics(images, texts, np.repeat(np.arange(20), 5))
    assert all(v == 1.0 for v in m.values()) and len(m) == 6


def test_any_caption_counts_for_image_to_text():
    # image 0 has one wrong caption (pointing at image 1) and one right one: still a hit at 1
    images = torch.eye(3)[:2]
    texts = torch.stack([unit((1, 1), (0, 0.2)), unit((0, 1)), unit((1, 1))])
    m = retrieval_metrics(images, texts, [0, 0, 1], ks=(1,))
    assert m["text_retrieval_recall@1"] == 1.0
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)


def reference_ranks(images, texts, index):
    """Brute force: sort every row, find the position of the first positive."""
    s = (texts @ images.T).numpy()
    t2i = [int(np.sum(s[t] > s[t, index[t]])) for t in range(len(texts))]
    i2t = [int(np.sum(s[:, i] > max(s[t, i] for t in range(len(texts)) if index[t] == i)))
           for i in range(len(images))]
    return t2i, i2t


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_ranks_match_brute_force(chunk):
    g = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    index = torch.cat([torch.arange(12), torch.randint(0, 12, (18,), generator=g)])
    t2i, i2t = reference_ranks(images, texts, index.tolist())
    assert text_to_image_ranks(images, texts, index, chunk).tolist() == t2i
    assert image_to_text_ranks(images, texts, index, chunk).tolist() == i2t


def test_bad_input():
    with pytest.raises(ValueError, match="1 images have no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], [0, 1])
    with pytest.raises(ValueError, match="2 captions but 3"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], [0, 1, 2])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.eye(3), torch.eye(3), [0, 1, 7])
    with pytest.raises(ValueError, match="dimensions differ"):
        retrieval_metrics(torch.eye(3), torch.eye(4), [0, 1, 2, 2])


def test_flatten_captions():
    texts, index = flatten_captions([("a", "b"), ("c",), ("d", "e", "f")])
    assert texts == list("abcdef") and index.tolist() == [0, 0, 1, 2, 2, 2]


class FakeCLIP:
    """Image with red 40k -> e_k; caption "image k ..." -> e_k (a perfect model)."""

    config = SimpleNamespace(vision=SimpleNamespace(image_size=8))

    def encode_image(self, images):
        red = (images[:, 0, 0, 0] * OPENAI_DATASET_STD[0] + OPENAI_DATASET_MEAN[0]) * 255
        return torch.eye(5)[torch.round(red / 40).long()]

    def encode_text(self, ids):
        return torch.eye(5)[ids[:, 0]]


def test_evaluate_retrieval_on_shards(tmp_path):
    (tmp_path / "set" / "test").mkdir(parents=True)
    with tarfile.open(tmp_path / "set" / "test" / "000000.tar", "w") as tar:
        for k in range(5):
            buf = io.BytesIO()
            Image.new("RGB", (9, 9), (40 * k, 0, 0)).save(buf, "PNG")
            caps = [f"image {k} caption {j}" for j in range(k % 3 + 1)]
            fields = {"png": buf.getvalue(), "json": json.dumps(caps).encode()}
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"s{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tokenizer = lambda texts: torch.tensor([[int(t.split()[1])] for t in texts])  # noqa: E731
    m = evaluate_retrieval(FakeCLIP(), str(tmp_path / "set"), tokenizer=tokenizer, batch_size=2, progress=False)
    assert m == {f"{d}_retrieval_recall@{k}": 1.0 for k in (1, 5, 10) for d in ("image", "text")}
