"""What the crawl may fetch: URL safety and input validation, before any request.

A corpus built from scraped pairs (CLIP Sec. 2.2, WIT) holds URLs written by strangers.
Fetching them from inside a cluster must not reach the cluster itself: loopback, private
ranges, link-local (169.254.169.254 is the cloud metadata service), multicast, reserved
and unspecified addresses are refused unless an operator allows a network explicitly
(`127.0.0.1/32` for the synthetic web). The decision is pure: the resolver is passed in,
so tests can map made-up hosts to any address without a DNS lookup.

The input is checked first: a missing url/caption column or an empty file is an error;
null, blank or non-UTF-8 cells and repeated URLs (the first is kept) are counted skips.
"""
from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., Sequence[tuple]]

ALLOWED_SCHEMES = ("http", "https")
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings (`127.0.0.1/32`, `fd00::/8`) as networks; a clear ValueError otherwise."""
    networks = []
    for cidr in [cidrs] if isinstance(cidrs, str) else cidrs:
        try:
            networks.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError as err:
            raise ValueError(f"allow_networks: {cidr!r} is not a CIDR network ({err})") from None
    return tuple(networks)


def _embedded_ipv4(addr: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, NAT64, Teredo)."""
    if addr.version == 4:
        return []
    found = [a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None]
    if addr in NAT64_PREFIX:
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr.teredo is not None:
        found.extend(addr.teredo)
    return found


def address_class(addr: IPAddress) -> str | None:
    """Why an address is not a public unicast one (`private`, `loopback`, ...), or None."""
    # The embedded IPv4 address first: it is where the packets go, and names the reason.
    for candidate in [*_embedded_ipv4(addr), addr]:
        for reason, flag in (
            ("unspecified", candidate.is_unspecified),
            ("loopback", candidate.is_loopback),
            ("link_local", candidate.is_link_local),
            ("multicast", candidate.is_multicast),
            ("reserved", candidate.is_reserved),
            ("private", candidate.is_private),
            ("non_global", not candidate.is_global),
        ):
            if flag:
                return reason
    return None


def check_address(addr: IPAddress, allow_networks: Sequence[IPNetwork] = ()) -> str | None:
    """Refusal reason for connecting to `addr`, or None; allowed networks always pass."""
    if any(addr in net for net in allow_networks):
        return None
    return address_class(addr)


def resolve_host(host: str, resolver: Resolver = socket.getaddrinfo) -> list[IPAddress]:
    """Every address `host` names: an IP literal itself, otherwise what `resolver` returns."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = resolver(host, None, type=socket.SOCK_STREAM)
    # sockaddr[0] is the address; IPv6 may carry a scope ("fe80::1%eth0").
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def split_url(url: str) -> tuple[str | None, str | None]:
    """(host, refusal reason) from the URL's syntax alone: scheme, host and port."""
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a malformed port
    except ValueError:
        return None, "invalid_url"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return None, "scheme"
    if not parts.hostname:
        return None, "no_host"
    return parts.hostname, None


def check_url(
    url: str,
    allow_networks: Sequence[IPNetwork] = (),
    resolver: Resolver = socket.getaddrinfo,
) -> str | None:
    """Refusal reason for fetching `url`, or None when it is safe; resolves the host once."""
    return UrlPolicy(allow_networks, resolver).check(url)


class UrlPolicy:
    """`check_url` with a per-host cache, for checking a whole list of pairs."""

    def __init__(self, allow_networks: Sequence[IPNetwork] = (), resolver: Resolver = socket.getaddrinfo):
        self.allow_networks = tuple(allow_networks)
        self.resolver = resolver
        self._hosts: dict[str, tuple[str | None, list[IPAddress]]] = {}

    def check(self, url: str) -> str | None:
        """Refusal reason for `url`, or None."""
        return self.vet(url)[0]

    def vet(self, url: str) -> tuple[str | None, list[IPAddress]]:
        """(refusal reason or None, the host's checked addresses to connect to)."""
        host, reason = split_url(url)
        if reason is not None:
            return reason, []
        if host not in self._hosts:
            self._hosts[host] = self._check_host(host)
        return self._hosts[host]

    def _check_host(self, host: str) -> tuple[str | None, list[IPAddress]]:
        try:
            addresses = resolve_host(host, self.resolver)
        except (OSError, UnicodeError, ValueError):
            return "unresolvable", []
        if not addresses:
            return "unresolvable", []
        # urllib may connect to any of the addresses: every one of them must pass.
        for addr in addresses:
            reason = check_address(addr, self.allow_networks)
            if reason is not None:
                return reason, []
        return None, addresses


# img2dataset's own columns: an input column of the same name cannot travel with a sample.
RESERVED_COLUMNS = ("key", "status", "error_message", "width", "height", "original_width",
                    "original_height", "exif", "md5", "sha256", "sha512")


@dataclass
class PreparedPairs:
    """The pairs split into what will be fetched, what was refused and what was skipped."""

    safe: pa.Table  # url, caption, then the input's other columns, in input order
    refused: pa.Table  # url, reason
    skipped: Counter
    refused_counts: Counter
    input_rows: int

    @property
    def extra_columns(self) -> list[str]:
        """Input columns kept beside url and caption (uid, query_ids, ...)."""
        return self.safe.column_names[2:]


def _parquet_files(uri: str) -> list[str]:
    """The file itself, or a folder's `*.parquet` files in name order (curate's part-NNNNN shards)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.isdir(path):
        return [uri]
    files = sorted(p for p in fs.glob(f"{path.rstrip('/')}/*.parquet") if not p.rsplit("/", 1)[-1].startswith(("_", ".")))
    if not files:
        raise ValueError(f"{uri} is a folder without Parquet files")
    return [fs.unstrip_protocol(p) for p in files]


def read_pairs(uri: str) -> pa.Table:
    """Read pairs Parquet (a file or a folder of shards); clear errors for non-Parquet, empty, missing columns."""
    tables = []
    for file in _parquet_files(uri):
        with fsspec.open(file, "rb") as f:
            try:
                tables.append(pq.read_table(f))
            except pa.ArrowInvalid as err:
                raise ValueError(f"{file} is not a readable Parquet file: {err}") from None
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    for name in ("url", "caption"):
        if name not in table.column_names:
            raise ValueError(f"{uri} has no {name!r} column; columns present: {table.column_names}")
    reserved = [c for c in table.column_names if c in RESERVED_COLUMNS]
    if reserved:
        raise ValueError(f"{uri}: columns {reserved} are reserved by img2dataset; rename them")
    if table.num_rows == 0:
        raise ValueError(f"{uri} has no rows")
    return table


def _as_bytes(table: pa.Table, name: str) -> list[bytes | None]:
    """A text column as raw bytes, so invalid UTF-8 is counted instead of raising."""
    column = table.column(name)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"column {name!r} must hold text, found {column.type}")
    return column.cast(pa.large_binary()).to_pylist()


def _decode(raw: bytes | None, name: str) -> tuple[str | None, str | None]:
    """(text, skip reason) for one cell."""
    if raw is None:
        return None, f"null_{name}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"non_utf8_{name}"
    return (text, None) if text.strip() else (None, f"empty_{name}")


def prepare_pairs(table: pa.Table, policy: UrlPolicy) -> PreparedPairs:
    """Skip bad rows and duplicate URLs (first kept), refuse unsafe URLs; nothing is fetched."""
    skipped, refused_counts, seen = Counter(), Counter(), set()
    keep, urls, captions, refused = [], [], [], {"url": [], "reason": []}
    for i, (raw_url, raw_caption) in enumerate(zip(_as_bytes(table, "url"), _as_bytes(table, "caption"))):
        url, reason = _decode(raw_url, "url")
        caption, caption_reason = _decode(raw_caption, "caption")
        reason = reason or caption_reason
        if reason is None:
            url = url.strip()
            reason = "duplicate_url" if url in seen else None
            seen.add(url)
        if reason is not None:
            skipped[reason] += 1
            continue
        refusal = policy.check(url)
        if refusal is not None:
            refused_counts[refusal] += 1
            refused["url"].append(url)
            refused["reason"].append(refusal)
            continue
        keep.append(i)
        urls.append(url)
        captions.append(caption)
    extras = [c for c in table.column_names if c not in ("url", "caption")]
    safe = pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string()),
                     **{c: table.column(c).take(keep) for c in extras}})
    refused_table = pa.table({k: pa.array(v, pa.string()) for k, v in refused.items()})
    return PreparedPairs(safe, refused_table, skipped, refused_counts, table.num_rows)
