"""Shared test setup: CPU by default; `gpu` tests run only where CUDA is present."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# every Ray started by the tests stays on 127.0.0.1 (flows.common.loopback_ray; set before ray is imported)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two pytest-xdist workers
    # each keeps its own Ray folder, so a ray.init() without an address never finds the other's cluster
    os.environ.setdefault("RAY_TMPDIR", f"/tmp/ray-{os.environ['PYTEST_XDIST_WORKER']}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores more only oversubscribe, and one is deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real 2-node Ray cluster on 127.0.0.1 (head and worker, one CPU each); (cluster, its node ids)."""
    import shutil
    import tempfile

    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp)  # the session and the address file in a folder of ours, not /tmp/ray
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            yield cluster, {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
        finally:
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 for this module, a fresh bucket; boto/s3fs (and Ray's workers) point at it."""
    import uuid

    import fsspec
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            env.setenv(key, value)
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        S3FileSystem.clear_instance_cache()  # a cached client may point at another test's server
        try:
            bucket = f"test-{uuid.uuid4().hex[:8]}"  # moto's backend is shared by every server in the process
            fsspec.filesystem("s3").mkdir(bucket)
            yield bucket
        finally:
            S3FileSystem.clear_instance_cache()
            server.stop()


def wait_until_answering(url: str, server, seconds: float = 120.0) -> None:
    """Poll url (a health route) until it answers; fail with the reason if the server exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError as e:
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered (server exit code {server.poll()}): {e}") from e
            time.sleep(1)


BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # Debian's chromium first (`make browser`)


def find_browser() -> str | None:
    """A headless Chromium's path, or None (asserting that CI, which runs `make browser`, has one)."""
    import shutil

    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    assert browser or not os.environ.get("CI"), "CI runs `make browser` first: no Chromium was installed"
    return browser


def chromium() -> str:
    """The headless browser's path; the test skips, saying why, where none is installed (not on CI)."""
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium installed (`make browser` installs Debian's; CI runs it)")
    return browser


def visible_text(dom: str) -> str:
    """The text a reader sees in a DOM dump: no styles, no scripts, entities decoded."""
    import html
    import re

    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def browse(browser: str, url: str, shot: Path, expect: list[str]) -> str:
    """The page's text after its scripts ran, as headless Chromium renders it (and a screenshot);
    a second, longer look when the single-page app had not drawn everything expected yet."""
    import subprocess

    from PIL import Image

    for budget in (20_000, 60_000):
        out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                              f"--user-data-dir={shot.parent / 'profile'}", "--window-size=1600,1200",
                              f"--virtual-time-budget={budget}", f"--screenshot={shot}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180)
        text = visible_text(out.stdout)
        if all(e in text for e in expect):
            break
    assert shot.stat().st_size > 10_000 and Image.open(shot).size == (1600, 1200)
    return text
