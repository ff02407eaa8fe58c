"""Writing WAT files as Common Crawl does, for tests and for the synthetic web's pages.

A WAT file is a gzipped WARC of `metadata` records whose payload is a JSON envelope
describing one captured record; for an HTML response it lists the page's links
(`HTML-Metadata.Links`, `path` "IMG@/src" for images, with their `alt`). Output is
deterministic: fixed dates and record ids derived from the content.
"""
from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable, Sequence

import fsspec
from warcio.warcwriter import WARCWriter

from clip_core.extract.wat import IMG_PATH, _get

_WAT_DATE = "2024-01-01T00:00:00Z"


def _record_id(*parts: str) -> str:
    """A deterministic WARC-Record-ID, so identical input gives identical files."""
    return f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, chr(0).join(parts))}>"


def wat_envelope(page_url: str, links: Iterable[tuple[str, str | None]],
                 base: str | None = None, title: str | None = None) -> dict:
    """The JSON Common Crawl writes for an HTML response whose `<img>` tags are `links`."""
    head: dict = {"Title": title or page_url}
    if base is not None:
        head["Base"] = base
    link_list = [{"path": IMG_PATH, "url": src, **({"alt": alt} if alt is not None else {})}
                 for src, alt in links]
    http = {"Response-Message": {"Version": "HTTP/1.1", "Status": "200", "Reason": "OK"},
            "Headers": {"Content-Type": "text/html; charset=UTF-8"},
            "HTML-Metadata": {"Head": head, "Links": link_list}}
    warc = {"WARC-Type": "response", "WARC-Target-URI": page_url, "WARC-Date": _WAT_DATE,
            "WARC-Record-ID": _record_id("response", page_url),
            "Content-Type": "application/http; msgtype=response"}
    return {"Container": {"Filename": "synthetic.warc.gz", "Compressed": True},
            "Envelope": {"Format": "WARC", "WARC-Header-Metadata": warc,
                         "Payload-Metadata": {
                             "Actual-Content-Type": "application/http; msgtype=response",
                             "HTTP-Response-Metadata": http}}}


def _request_envelope(page_url: str) -> dict:
    """The JSON Common Crawl writes for the HTTP request of a page (no links)."""
    warc = {"WARC-Type": "request", "WARC-Target-URI": page_url, "WARC-Date": _WAT_DATE,
            "WARC-Record-ID": _record_id("request", page_url),
            "Content-Type": "application/http; msgtype=request"}
    http = {"Request-Message": {"Method": "GET", "Path": "/", "Version": "HTTP/1.1"},
            "Headers": {"User-Agent": "clip-pipeline-synthetic"}}
    return {"Container": {"Filename": "synthetic.warc.gz", "Compressed": True},
            "Envelope": {"Format": "WARC", "WARC-Header-Metadata": warc,
                         "Payload-Metadata": {
                             "Actual-Content-Type": "application/http; msgtype=request",
                             "HTTP-Request-Metadata": http}}}


def write_wat_record(writer: WARCWriter, target_uri: str, envelope: dict) -> None:
    """Append one WAT `metadata` record (Content-Type application/json) to `writer`."""
    data = json.dumps(envelope, separators=(",", ":")).encode()
    refers_to = _get(envelope, "Envelope", "WARC-Header-Metadata", "WARC-Record-ID") or ""
    headers = {"WARC-Date": _WAT_DATE, "Content-Type": "application/json",
               "WARC-Record-ID": _record_id("wat", target_uri, refers_to),
               "WARC-Refers-To": refers_to}
    writer.write_record(writer.create_warc_record(
        target_uri, "metadata", payload=io.BytesIO(data), length=len(data),
        warc_headers_dict=headers))


def write_warcinfo(writer: WARCWriter, filename: str) -> None:
    """Append the `warcinfo` record that opens every Common Crawl WAT file."""
    data = b"software: clip-pipeline\r\nformat: WARC File Format 1.0\r\n"
    writer.write_record(writer.create_warc_record(
        "", "warcinfo", payload=io.BytesIO(data), length=len(data),
        warc_headers_dict={"WARC-Date": _WAT_DATE, "WARC-Filename": filename,
                           "WARC-Record-ID": _record_id("warcinfo", filename),
                           "Content-Type": "application/warc-fields"}))


def write_wat_file(path: str, pages: Iterable[Sequence], *,
                   storage_options: dict | None = None) -> str:
    """Write a gzipped WAT file of pages `(page_url, [(src, alt), ...], base=None)`.

    Each page gets a request and a response `metadata` record, as in Common Crawl; an alt
    of None leaves the attribute out. Returns `path`.
    """
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        writer = WARCWriter(f, gzip=True)
        write_warcinfo(writer, path.rsplit("/", 1)[-1])
        for page in pages:
            page_url, links, base = (*page, None)[:3]
            write_wat_record(writer, page_url, _request_envelope(page_url))
            write_wat_record(writer, page_url, wat_envelope(page_url, links, base))
    return path
