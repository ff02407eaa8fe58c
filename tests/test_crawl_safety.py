"""Crawl safety: the pure URL decision function and the redirect guard proxy.

Private and public addresses appear only in the decision function, with a fake resolver;
every request goes to 127.0.0.0/8 (a server on 127.0.0.1 inside the allowlist and one on
127.0.0.2 outside it, which must see no request).
"""
import socket
from collections import Counter
from urllib.parse import quote

import pytest

from clip_core.crawl import crawl, is_permanent
from clip_core.crawl.guard import GuardProxy
from clip_core.crawl.safety import UrlPolicy, check_url, parse_networks
from test_crawl import LOOPBACK, _image_bytes, fake_resolver, outside, web, write_pairs  # noqa: F401  (fixtures)


# URL safety: the pure decision function.

@pytest.mark.parametrize("url, reason", [
    ("http://10.0.0.1/a.jpg", "private"),
    ("http://192.168.1.1/a.jpg", "private"),
    ("http://172.16.0.1/a.jpg", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link_local"),
    ("http://127.0.0.1:8000/a.jpg", "loopback"),
    ("http://[::1]/a.jpg", "loopback"),
    ("http://[fe80::1]/a.jpg", "link_local"),
    ("http://224.0.0.1/a.jpg", "multicast"),
    ("http://0.0.0.0/a.jpg", "unspecified"),
    ("http://240.0.0.1/a.jpg", "reserved"),
    ("http://100.64.0.1/a.jpg", "non_global"),
    ("http://[::ffff:10.0.0.1]/a.jpg", "private"),
    ("http://[2002:a00:1::1]/a.jpg", "private"),  # 6to4 around 10.0.0.1
    ("ftp://93.184.216.34/a.jpg", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("javascript:alert(1)", "scheme"),
    ("http:///a.jpg", "no_host"),
    ("http://93.184.216.34:99999/a.jpg", "invalid_url"),
    ("http://93.184.216.34/a.jpg", None),  # public: accepted by the decision only, never fetched
    ("HTTPS://93.184.216.34/a.jpg", None),
])
def test_check_url_table(url, reason):
    assert check_url(url, resolver=fake_resolver({})) == reason


def test_allowlist_admits_only_its_networks():
    allow = parse_networks(["127.0.0.1/32", "10.1.0.0/16"])
    assert check_url("http://127.0.0.1:9/a.jpg", allow) is None
    assert check_url("http://10.1.2.3/a.jpg", allow) is None
    assert check_url("http://127.0.0.2:9/a.jpg", allow) == "loopback"
    assert check_url("http://10.2.0.1/a.jpg", allow) == "private"
    with pytest.raises(ValueError, match="not a CIDR"):
        parse_networks(["localhost"])


def test_resolved_hosts_checked_every_address_and_cached():
    resolve = fake_resolver({"img.test": ["93.184.216.34"], "meta.test": ["169.254.169.254"],
                             "mixed.test": ["93.184.216.34", "10.0.0.7"], "v6.test": ["fe80::1%eth0"]})
    policy = UrlPolicy(parse_networks(["10.0.0.7/32"]), resolve)
    assert policy.check("http://img.test/a.jpg") is None
    assert policy.check("https://img.test:8443/b.jpg") is None
    assert policy.check("http://meta.test/") == "link_local"
    assert policy.check("http://mixed.test/") is None  # the private one is allowlisted
    assert UrlPolicy((), resolve).check("http://mixed.test/") == "private"
    assert policy.check("http://v6.test/") == "link_local"
    assert policy.check("http://nowhere.test/") == "unresolvable"
    assert policy.check("http://127.0.0.1/") == "loopback"
    assert resolve.calls["img.test"] == 1 and "127.0.0.1" not in resolve.calls


# The guard proxy: redirects and connect-time addresses obey the policy.

@pytest.mark.slow
@pytest.mark.parametrize("guard", [True, False])
def test_guard_refuses_redirects_out_of_the_allowlist(tmp_path, web, outside, guard):
    to_outside = web.url("/redirect/1?to=" + quote(outside.url("/img/1.jpg"), safe=""))
    to_inside = web.url("/redirect/2?to=" + quote(web.url("/img/2.jpg"), safe=""))
    to_ftp = web.url("/redirect/3?to=" + quote(f"ftp://127.0.0.2:{outside.server.server_address[1]}/x", safe=""))
    pairs = write_pairs(tmp_path / "pairs.parquet", [to_outside, to_inside, to_ftp], ["out", "in", "ftp"])
    stats = crawl(pairs, str(tmp_path / "out"), image_size=32, threads=3, allow_networks=LOOPBACK,
                  guard=guard, timeout=3)
    if guard:
        assert sum(outside.hits.values()) == 0
        assert stats.success == 1 and stats.errors == {"HTTP Error 403: Refused by crawl policy (loopback)": 1,
                                                       "HTTP Error 403: Refused by crawl policy (scheme)": 1}
        assert all(is_permanent(e) for e in stats.errors)
    else:  # why the guard exists: urllib follows the redirect unchecked
        assert outside.hits == Counter({"/img/1.jpg": 1}) and stats.success == 2


def _through(proxy, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.server.server_address[1]), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _connect(proxy, target: str, then: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.server.server_address[1]), timeout=5) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        reply = sock.recv(65536)
        if reply.startswith(b"HTTP/1.1 200"):
            sock.sendall(then)
            while chunk := sock.recv(65536):
                reply += chunk
    return reply


def test_guard_proxy_pins_vetted_addresses(web, outside):
    port = web.server.server_address[1]
    resolve = fake_resolver({"img.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"]})
    with GuardProxy(UrlPolicy(parse_networks(LOOPBACK), resolve), timeout=5) as proxy:
        ok = _through(proxy, f"GET http://img.test:{port}/img/3.jpg HTTP/1.1\r\nHost: img.test\r\n"
                             "Proxy-Connection: keep-alive\r\nConnection: close\r\n\r\n".encode())
        assert ok.startswith(b"HTTP/1.0 200") and ok.endswith(_image_bytes(3, "JPEG"))
        meta = _through(proxy, b"GET http://meta.test/latest HTTP/1.1\r\nHost: meta.test\r\n\r\n")
        assert meta.startswith(b"HTTP/1.1 403 Refused by crawl policy (link_local)")
        outside_port = outside.server.server_address[1]
        assert _connect(proxy, f"127.0.0.2:{outside_port}", b"").startswith(b"HTTP/1.1 403")
        tunnel = _connect(proxy, f"img.test:{port}", b"GET /png/4.png HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"200 Connection established" in tunnel and tunnel.endswith(_image_bytes(4, "PNG"))
        assert _through(proxy, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert sum(outside.hits.values()) == 0 and resolve.calls["img.test"] == 1
