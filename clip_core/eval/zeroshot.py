"""Zero-shot classification with prompt ensembles (Radford et al. 2021, Sections 3.1.2-3.1.4).

The text encoder turns class names into the weights of a linear classifier: each class's
prompts ("a photo of a {c}.", ...) are embedded, L2-normalised, averaged and normalised
again (the ensemble is built in embedding space, so it costs one classifier). Logits are
100 * normalised image features @ classifier (100 = the clipped logit scale of training).
Metrics follow CLIP_benchmark: acc1, acc5 (None with fewer than 5 classes) and mean
per-class recall; per-example correctness is kept for the overlap analysis (Section 5).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clip_core.eval.datasets import EvalSet, check_templates, fill_template, load_eval_set
from clip_core.eval.features import Tokenizer, encode_texts, extract_split

__all__ = ["ZeroShotResult", "class_prompts", "zeroshot_classifier", "zeroshot_logits",
           "classification_metrics", "mean_per_class_recall", "topk_correct", "check_labels",
           "zeroshot_from_features",
           "evaluate_zeroshot", "LOGIT_SCALE"]

LOGIT_SCALE = 100.0
ClassName = str | Sequence[str]  # a class, or several synonyms of one class


@dataclass
class ZeroShotResult:
    """Metrics plus per-example top-1 correctness and predictions, in sample-index order."""

    metrics: dict[str, float | None]
    correct: np.ndarray  # (N,) bool
    predictions: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64
    keys: list[str] | None = None


def class_prompts(classname: ClassName, templates: Sequence[str]) -> list[str]:
    """Every template filled with the class name (and with each synonym, if several)."""
    names = [classname] if isinstance(classname, str) else list(classname)
    return [fill_template(t, name) for name in names for t in templates]


def zeroshot_classifier(model, classnames: Sequence[ClassName], templates: Sequence[str], *,
                        batch_size: int = 256, tokenizer: Tokenizer | None = None, device=None,
                        progress: bool | None = None) -> torch.Tensor:
    """(D, C) classifier: per class, the normalised mean of its normalised prompt embeddings."""
    templates = check_templates(templates)
    if not classnames:
        raise ValueError("no class names")
    prompts = [class_prompts(c, templates) for c in classnames]
    flat = [p for group in prompts for p in group]
    text_features = encode_texts(model, flat, batch_size=batch_size, tokenizer=tokenizer, device=device,
                                 normalize=True, progress=progress, desc="class prompts")  # (P, D)
    owner = torch.cat([torch.full((len(g),), i) for i, g in enumerate(prompts)])  # (P,) class of each prompt
    sums = torch.zeros(len(prompts), text_features.shape[1]).index_add_(0, owner, text_features)
    return F.normalize(sums, dim=-1).T  # (D, C); mean and sum normalise to the same vector


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor,
                    logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """(N, C) logits = scale * normalised image features @ classifier."""
    return logit_scale * F.normalize(image_features.float(), dim=-1) @ classifier.float()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: the label is among the k highest logits."""
    topk = logits.topk(k, dim=1).indices  # (N, k)
    return (topk == labels[:, None]).any(dim=1)


def mean_per_class_recall(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Recall averaged over the classes present in `labels` (balanced accuracy)."""
    classes = np.unique(labels)
    return float(np.mean([np.mean(predictions[labels == c] == c) for c in classes]))


def check_labels(labels: np.ndarray, num_classes: int) -> None:
    """Raise unless every label is a class index in 0..num_classes-1."""
    if labels.size == 0:
        raise ValueError("no examples to evaluate")
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = int(labels.max() if labels.max() >= num_classes else labels.min())
        raise ValueError(f"label {bad} is outside 0..{num_classes - 1}: the class list has {num_classes} "
                         f"names but the labels need at least {int(labels.max()) + 1}")


def classification_metrics(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> ZeroShotResult:
    """acc1, acc5 (None with < 5 classes), mean_per_class_recall of (N, C) logits."""
    labels_np = np.asarray(labels, dtype=np.int64)
    check_labels(labels_np, logits.shape[1])
    target = torch.from_numpy(labels_np)
    correct = topk_correct(logits, target, 1).numpy()
    predictions = logits.argmax(dim=1).numpy().astype(np.int64)
    acc5 = float(topk_correct(logits, target, 5).float().mean()) if logits.shape[1] >= 5 else None
    metrics = {"acc1": float(correct.mean()), "acc5": acc5,
               "mean_per_class_recall": mean_per_class_recall(predictions, labels_np)}
    return ZeroShotResult(metrics, correct, predictions, labels_np)


def zeroshot_from_features(image_features: torch.Tensor, labels: np.ndarray,
                           classifier: torch.Tensor) -> ZeroShotResult:
    """Zero-shot metrics of precomputed image features against a (D, C) classifier."""
    return classification_metrics(zeroshot_logits(image_features, classifier), labels)


def evaluate_zeroshot(model, eval_set: EvalSet | str, *, batch_size: int = 64, tokenizer: Tokenizer | None = None,
                      transform=None, device=None, progress: bool | None = None,
                      num_workers: int = 0) -> ZeroShotResult:
    """Zero-shot classification of an eval set's split with its class names and templates."""
    eval_set = load_eval_set(eval_set) if isinstance(eval_set, str) else eval_set
    if eval_set.kind != "classification":
        raise ValueError(f"eval set {eval_set.name} is a {eval_set.kind} set, not classification")
    classifier = zeroshot_classifier(model, eval_set.classnames, eval_set.templates, tokenizer=tokenizer,
                                     device=device, progress=progress)
    split = extract_split(model, eval_set.root, eval_set.split, batch_size=batch_size, transform=transform,
                          device=device, progress=progress, num_workers=num_workers)
    result = zeroshot_from_features(split.image_features, split.labels, classifier)
    result.keys = split.keys
    return result
