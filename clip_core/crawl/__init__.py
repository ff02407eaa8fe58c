"""The crawl stage: curated pairs -> WebDataset shards with img2dataset, URL-safe and resumable.

`download` runs img2dataset and keeps the crawl folder's books (manifest, shards, stats),
`safety` decides which URLs may be fetched, `guard` is the proxy that checks every redirect hop.
"""
from clip_core.crawl.download import CrawlStats, crawl, is_permanent

__all__ = ["CrawlStats", "crawl", "is_permanent"]
