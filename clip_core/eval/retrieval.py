"""Zero-shot image-text retrieval, recall@k (Radford et al. 2021, Section 3.1.5, Table 13).

Each image has several captions (five in Flickr30k and MSCOCO). Image-to-text: a hit when
any of the image's captions ranks in the top k of all captions. Text-to-image: a hit when
the caption's own image ranks in the top k of all images. Key names follow CLIP_benchmark,
which names a direction by what is retrieved: `text_retrieval_recall@k` is image-to-text,
`image_retrieval_recall@k` is text-to-image. A rank counts the candidates scoring strictly
higher than the positive, so ties go to the query. Scores are computed in chunks, so the
full (texts x images) matrix never has to fit in memory.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip_core.eval.datasets import EvalSet, load_eval_set
from clip_core.eval.features import Tokenizer, encode_texts, extract_split

__all__ = ["retrieval_metrics", "text_to_image_ranks", "image_to_text_ranks", "flatten_captions",
           "evaluate_retrieval", "RECALL_KS"]

RECALL_KS = (1, 5, 10)


def flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """All captions in one list and, for each, the index of its image."""
    texts = [c for caps in captions for c in caps]
    image_index = np.repeat(np.arange(len(captions)), [len(caps) for caps in captions])
    return texts, image_index.astype(np.int64)


def text_to_image_ranks(image_features: torch.Tensor, text_features: torch.Tensor,
                        text_image_index: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(T,) per caption: how many images score strictly higher than its own image."""
    ranks = []
    for start in range(0, len(text_features), chunk):
        scores = text_features[start:start + chunk] @ image_features.T  # (c, I)
        own = text_image_index[start:start + chunk]
        positive = scores.gather(1, own[:, None])  # (c, 1)
        ranks.append((scores > positive).sum(dim=1))
    return torch.cat(ranks)


def image_to_text_ranks(image_features: torch.Tensor, text_features: torch.Tensor,
                        text_image_index: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(I,) per image: how many captions score strictly higher than its best own caption."""
    ranks = []
    for start in range(0, len(image_features), chunk):
        scores = image_features[start:start + chunk] @ text_features.T  # (c, T)
        images = torch.arange(start, start + len(scores))
        positive = text_image_index[None, :] == images[:, None]  # (c, T)
        best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
        ranks.append((scores > best).sum(dim=1))
    return torch.cat(ranks)


def _check(image_features: torch.Tensor, text_features: torch.Tensor, index: torch.Tensor) -> None:
    if len(image_features) == 0 or len(text_features) == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if image_features.shape[1] != text_features.shape[1]:
        dims = image_features.shape[1], text_features.shape[1]
        raise ValueError(f"feature dimensions differ: images {dims[0]}, texts {dims[1]}")
    if len(index) != len(text_features):
        raise ValueError(f"{len(text_features)} captions but {len(index)} caption-to-image indices")
    if index.min() < 0 or index.max() >= len(image_features):
        raise ValueError(f"caption-to-image index outside 0..{len(image_features) - 1}")
    without = np.setdiff1d(np.arange(len(image_features)), index.numpy())
    if without.size:
        raise ValueError(f"{without.size} images have no caption (first: image {int(without[0])})")


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_image_index: Sequence[int] | np.ndarray | torch.Tensor,
                      ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """CLIP_benchmark's image_retrieval_recall@k (text->image) and text_retrieval_recall@k (image->text)."""
    index = torch.as_tensor(np.asarray(text_image_index), dtype=torch.long)
    _check(image_features, text_features, index)
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    t2i = text_to_image_ranks(images, texts, index)
    i2t = image_to_text_ranks(images, texts, index)
    metrics = {f"image_retrieval_recall@{k}": float((t2i < k).float().mean()) for k in ks}
    metrics.update({f"text_retrieval_recall@{k}": float((i2t < k).float().mean()) for k in ks})
    return metrics


def evaluate_retrieval(model, eval_set: EvalSet | str, *, batch_size: int = 64, ks: Sequence[int] = RECALL_KS,
                       tokenizer: Tokenizer | None = None, transform=None, device=None,
                       progress: bool | None = None, num_workers: int = 0) -> dict[str, float]:
    """Recall@k both ways on a retrieval eval set (images with several captions each)."""
    eval_set = load_eval_set(eval_set) if isinstance(eval_set, str) else eval_set
    if eval_set.kind != "retrieval":
        raise ValueError(f"eval set {eval_set.name} is a {eval_set.kind} set, not retrieval")
    split = extract_split(model, eval_set.root, eval_set.split, batch_size=batch_size, transform=transform,
                          device=device, progress=progress, num_workers=num_workers)
    texts, text_image_index = flatten_captions(split.captions)
    if not texts:
        raise ValueError(f"eval set {eval_set.name}: no captions")
    text_features = encode_texts(model, texts, batch_size=max(batch_size, 256), tokenizer=tokenizer,
                                 device=device, progress=progress, desc="captions")
    return retrieval_metrics(split.image_features, text_features, text_image_index, ks)
