"""What the crawl may fetch: URL safety and input validation, before any request.

A corpus built from scraped pairs (CLIP Sec. 2.2, WIT) holds URLs written by strangers.
Fetching them from inside a cluster must not reach the cluster itself: loopback, private
ranges, link-local (169.254.169.254 is the cloud metadata service), multicast, reserved
and unspecified addresses are refused unless an operator allows a network explicitly
(`127.0.0.1/32` for the synthetic web). The decision is pure: the resolver is passed in,
so tests can map made-up hosts to any address without a DNS lookup.

The options and the input are checked first: an option out of range, a missing file, a
url/caption column that is missing or not text, or an empty file is an error; null, blank
or non-UTF-8 cells and repeated URLs (the first is kept) are counted skips. URLs are percent-encoded as HTTP needs them (spaces,
non-ASCII paths, IDNA host names; existing %XX escapes kept) before they are checked, so
the URL fetched is the URL checked. When nothing is left to fetch, the error says how many
URLs were refused and skipped, why, and the fix.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.checks import finite_number, whole_number
from clip_core.data.parquet import check_column, list_parquet, parquet_errors
from clip_core.errors import InputError, check

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., Sequence[tuple]]

ALLOWED_SCHEMES = ("http", "https")
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# Refusals an allowlist entry lifts (not scheme, syntax or DNS ones).
NETWORK_REASONS = ("loopback", "private", "link_local", "non_global", "unspecified", "reserved", "multicast")
# RFC 3986 pchar beyond quote()'s unreserved set; query and fragment also carry "?".
PATH_SAFE = "/:@!$&'()*+,;="
QUERY_SAFE = PATH_SAFE + "?"
USERINFO_SAFE = ":!$&'()*+,;="
STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
CONTROL = re.compile(r"[\x00-\x20\x7f]")
RESIZE_MODES = ("center_crop", "keep_ratio", "keep_ratio_largest", "border", "no")  # img2dataset's
MAX_IMAGE_SIZE = 16_384


def check_options(image_size, processes, threads, number_sample_per_shard, timeout, retries,
                  encode_quality, resize_mode) -> None:
    """InputError for an option out of range (named as its command-line flag)."""
    for flag, value, low, high in (
        ("--image-size", image_size, 1, MAX_IMAGE_SIZE), ("--processes", processes, 1, None),
        ("--threads", threads, 1, None), ("--number-sample-per-shard", number_sample_per_shard, 1, None),
        ("--retries", retries, 0, None), ("--encode-quality", encode_quality, 0, 100),  # JPEG quality
    ):
        whole_number(flag, value, low, high)
    finite_number("--timeout", timeout, "seconds per request, such as --timeout 10", above=0)
    check(resize_mode in RESIZE_MODES, "--resize-mode", f"must be one of {list(RESIZE_MODES)}, got {resize_mode!r}")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings (`127.0.0.1/32`, `fd00::/8`) as networks; a clear ValueError otherwise."""
    networks = []
    for cidr in [cidrs] if isinstance(cidrs, str) else cidrs:
        try:
            networks.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError as err:
            raise InputError("--allow-network", f"{cidr!r} is not a CIDR network ({err})",
                             "write a network such as 127.0.0.1/32 or fd00::/8") from None
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


def _quote(text: str, safe: str) -> str:
    """Percent-encode what HTTP cannot carry (space, non-ASCII, a stray %); %XX escapes stay."""
    return quote(STRAY_PERCENT.sub("%25", text), safe=safe + "%")


def _ascii_netloc(netloc: str) -> str | None:
    """The netloc with its host in IDNA (bücher.example -> xn--bcher-kva.example); None if impossible."""
    if netloc.isascii():
        return netloc
    userinfo, at, hostport = netloc.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        host, colon, port = hostport, "", ""
    if host.startswith("["):  # an IPv6 literal is ASCII or invalid
        return None
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return (_quote(userinfo, USERINFO_SAFE) + at if at else "") + host + colon + port


def normalise_url(url: str) -> str | None:
    """`url` as an HTTP client can send it (spaces, non-ASCII, IDNA host); None when the host cannot be encoded.

    urllib sends a path with a space or a non-ASCII character as it is, and fails before the
    request ("URL can't contain control characters", a UnicodeEncodeError) on every try.
    Browsers encode such URLs; so does this, idempotently: a well-formed URL comes back unchanged.
    """
    url = CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url  # split_url refuses it with its reason
    netloc = _ascii_netloc(parts.netloc)
    if netloc is None:
        return None
    normal = parts._replace(netloc=netloc, path=_quote(parts.path, PATH_SAFE),
                            query=_quote(parts.query, QUERY_SAFE), fragment=_quote(parts.fragment, QUERY_SAFE))
    return url if normal == parts else urlunsplit(normal)


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


PAIRS_FIX = "give the pairs Parquet that curate writes: string columns url and caption, one row a pair"


def read_pairs(uri: str) -> pa.Table:
    """Read pairs Parquet (a file or a folder of shards); InputError for non-Parquet, empty, missing or non-text columns."""
    tables = []
    for file in list_parquet(uri, PAIRS_FIX):  # a file, or a folder of shards (curate's part-NNNNN) in order
        with parquet_errors(file, PAIRS_FIX), fsspec.open(file, "rb") as f:
            tables.append(pq.read_table(f))
    try:
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except pa.ArrowException as err:
        raise InputError(uri, f"its part files have clashing schemas ({err})", PAIRS_FIX) from None
    for name in ("url", "caption"):
        check_column(uri, table.schema, name, "text", PAIRS_FIX)
    reserved = [c for c in table.column_names if c in RESERVED_COLUMNS]
    check(not reserved, uri, f"columns {reserved} are reserved by img2dataset", "rename them")
    check(table.num_rows > 0, uri, "has no rows", PAIRS_FIX)
    return table


def _as_bytes(table: pa.Table, name: str) -> list[bytes | None]:
    """A text column as raw bytes, so invalid UTF-8 is counted instead of raising."""
    column = table.column(name)
    check_column(name, table.schema, name, "text", PAIRS_FIX)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
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
    """Skip bad rows and duplicate URLs (first kept), encode and refuse unsafe URLs; nothing is fetched."""
    skipped, refused_counts, seen = Counter(), Counter(), set()
    keep, urls, captions, refused = [], [], [], {"url": [], "reason": []}
    for i, (raw_url, raw_caption) in enumerate(zip(_as_bytes(table, "url"), _as_bytes(table, "caption"))):
        url, reason = _decode(raw_url, "url")
        caption, caption_reason = _decode(raw_caption, "caption")
        reason = reason or caption_reason
        if reason is None:
            url = url.strip()
            fetchable = normalise_url(url)
            reason = "duplicate_url" if (fetchable or url) in seen else None
            seen.add(fetchable or url)
        if reason is not None:
            skipped[reason] += 1
            continue
        refusal = "invalid_url" if fetchable is None else policy.check(fetchable)
        if refusal is not None:
            refused_counts[refusal] += 1
            refused["url"].append(url)  # as the input wrote it
            refused["reason"].append(refusal)
            continue
        keep.append(i)
        urls.append(fetchable)
        captions.append(caption)
    extras = [c for c in table.column_names if c not in ("url", "caption")]
    rows = pa.array(keep, pa.int64())  # typed: an empty list would be null-typed, which take() rejects
    safe = pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string()),
                     **{c: table.column(c).take(rows) for c in extras}})
    refused_table = pa.table({k: pa.array(v, pa.string()) for k, v in refused.items()})
    return PreparedPairs(safe, refused_table, skipped, refused_counts, table.num_rows)


def _by_reason(counts: Counter) -> str:
    """`loopback 3, scheme 1`: counts by reason, the largest first."""
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common())


def _nothing_fetchable_fix(refused: Counter) -> str:
    """The likeliest fix for a list of which no URL may be fetched."""
    if "loopback" in refused:
        return ("URLs on this machine need their network allowed: --allow-network 127.0.0.1/32 "
                "for the synthetic web on 127.0.0.1; allow_networks=[...] in Python")
    if any(reason in refused for reason in NETWORK_REASONS):
        return "to crawl a private network on purpose, allow it: --allow-network CIDR"
    if "unresolvable" in refused:
        return "check that the URLs' host names resolve from this machine"
    return "give pairs with http(s) URLs and non-empty captions"


def check_fetchable(prepared: PreparedPairs, uri: str) -> None:
    """InputError when no row is left to fetch: how many were refused and skipped, why, and the fix."""
    if prepared.safe.num_rows:
        return
    n, refused, skipped = prepared.input_rows, prepared.refused_counts, prepared.skipped
    parts = [f"{sum(refused.values())} of {n} URLs refused ({_by_reason(refused)})"] if refused else []
    parts += [f"{sum(skipped.values())} of {n} rows skipped ({_by_reason(skipped)})"] if skipped else []
    raise InputError(uri, "nothing to fetch: " + "; ".join(parts), _nothing_fetchable_fix(refused))
