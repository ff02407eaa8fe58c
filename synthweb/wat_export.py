"""The synthetic web's pages as Common Crawl WAT files, so a run can start from `extract`.

Page n lists pairs [n * pairs_per_page, (n + 1) * pairs_per_page) as the server's
`/s/{site}/page{n}.html` does. Every other page links its images by a root-relative path,
as many real pages do, so extraction has URLs to resolve against the page.
"""
import posixpath
from collections.abc import Iterator
from urllib.parse import urlsplit

import fsspec
import pyarrow.parquet as pq

from synthweb.generator import site_name
from synthweb.spec import load_spec
from synthweb.wat_writer import write_wat_file


def web_pages(root: str) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(page_url, [(src, alt), ...]) for every page of the web at `root`."""
    spec = load_spec(root)
    with fsspec.open(posixpath.join(root, "pairs.parquet"), "rb") as f:
        pairs = pq.read_table(f, columns=["uid", "url", "caption"]).sort_by("uid").to_pydict()
    per_page = spec.pairs_per_page
    for n, start in enumerate(range(0, len(pairs["uid"]), per_page)):
        page_url = f"{spec.base_url}/s/{site_name(n % spec.n_sites)}/page{n}.html"
        urls, alts = pairs["url"][start:start + per_page], pairs["caption"][start:start + per_page]
        if n % 2:
            urls = [urlsplit(u).path for u in urls]  # root-relative, resolved against the page
        yield page_url, list(zip(urls, alts))


def write_web_wat(root: str, out_uri: str, pages_per_file: int = 500) -> list[str]:
    """Write the web's pages as `OUT/NNNNN.warc.wat.gz`; returns the file URIs."""
    fs, out = fsspec.core.url_to_fs(out_uri)
    fs.makedirs(out, exist_ok=True)
    files, batch = [], []
    for page in web_pages(root):
        batch.append(page)
        if len(batch) == pages_per_file:
            files.append(_write(out_uri, len(files), batch))
            batch = []
    if batch or not files:
        files.append(_write(out_uri, len(files), batch))
    return files


def _write(out_uri: str, index: int, pages: list) -> str:
    return write_wat_file(f"{out_uri.rstrip('/')}/{index:05d}.warc.wat.gz", pages)
