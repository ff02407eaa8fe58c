"""Eval-set deduplication and the data-overlap analysis of CLIP (Radford et al. 2021), Section 5.

Stages: `near_dup.dedup` (descriptors + FAISS search, calibrated thresholds, matches and a
kept-keys manifest) and `overlap.overlap_report` (All / Clean / Overlap accuracy, binomial
test, Clopper-Pearson intervals). Never imports prefect, ray or mlflow.
"""
from dedup.calibrate import Calibration, calibrate_reference
from dedup.descriptors import make_descriptors, phash
from dedup.index import BinaryIndex, FlatIndex, build_index
from dedup.near_dup import build_references, dedup, dedup_shard
from dedup.overlap import overlap_from_matches, overlap_report, overlap_stats

__all__ = ["Calibration", "calibrate_reference", "make_descriptors", "phash", "BinaryIndex", "FlatIndex", "build_index",
           "build_references", "dedup", "dedup_shard", "overlap_from_matches", "overlap_report", "overlap_stats"]
