"""The extract stage: Common Crawl WAT files -> candidate pairs (url, caption, uid, page_url).

`wat` streams the records and writes the pairs; `filters` holds the per-link rules.
"""
from clip_core.extract.wat import SCHEMA, STATS_NAME, extract, extract_file

__all__ = ["SCHEMA", "STATS_NAME", "extract", "extract_file"]
