"""Evaluation (Radford et al. 2021, Section 3): zero-shot classification, retrieval, linear probes.

Submodules load on first use, so `from clip_core.eval.datasets import load_eval_set` does not
import scikit-learn.
"""
from importlib import import_module

_EXPORTS = {
    "EvalSet": "datasets", "Sample": "datasets", "load_eval_set": "datasets", "iter_samples": "datasets",
    "read_image": "datasets", "read_images": "datasets", "paper_prompts": "datasets",
    "encode_images": "features", "encode_texts": "features", "extract_split": "features",
    "zeroshot_classifier": "zeroshot", "evaluate_zeroshot": "zeroshot", "classification_metrics": "zeroshot",
    "retrieval_metrics": "retrieval", "evaluate_retrieval": "retrieval",
    "evaluate_linear_probe": "linear_probe",
    "evaluate": "run", "resolve_checkpoint": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
