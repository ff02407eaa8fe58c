"""The crawl stage end to end against the synthetic web on 127.0.0.1: what should land does."""
import tarfile

import pyarrow.parquet as pq
import pytest

from clip_core.crawl import crawl
from synthweb.generator import generate_web
from synthweb.server import serve_web
from flows.common import free_port

RATES = {"404": 0.1, "500": 0.05, "slow": 0.05, "redirect301": 0.05, "redirect302": 0.05, "html": 0.05,
         "corrupt": 0.05, "bomb": 0.03, "noai": 0.1}
SERVED = {"ok", "slow", "redirect301", "redirect302"}


@pytest.mark.slow
def test_crawl_of_the_synthetic_web_keeps_exactly_the_served_images(tmp_path):
    port = free_port()
    web = str(tmp_path / "web")
    generate_web(web, n_pairs=240, seed=3, base_url=f"http://127.0.0.1:{port}", image_size=64,
                 failure_rates=RATES, eval_sizes=2)
    truth = pq.read_table(f"{web}/truth.parquet").to_pylist()
    pairs = {p["uid"]: p for p in pq.read_table(f"{web}/pairs.parquet").to_pylist()}

    expected = {t["uid"] for t in truth
                if t["fate"] in SERVED and pairs[t["uid"]]["caption"].strip()}
    bombs = {t["uid"] for t in truth if t["fate"] == "bomb"}
    assert bombs and len(expected) > 100

    with serve_web(web, port=port):
        stats = crawl(f"{web}/pairs.parquet", str(tmp_path / "shards"), image_size=32, threads=8,
                      allow_networks=["127.0.0.1/32"], timeout=5, number_sample_per_shard=100,
                      per_host_rps=0, per_host_concurrency=0)
    got = {}
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(tar) as f:
            names = {m.name for m in f.getmembers()}
            for name in names:
                if name.endswith(".json"):
                    import json

                    meta = json.loads(f.extractfile(name).read())
                    assert name[:-5] + ".jpg" in names
                    got[int(meta["uid"])] = meta["caption"]
    assert set(got) == expected
    assert all(got[uid] == pairs[uid]["caption"] for uid in got)
    assert stats.success == len(expected) and not bombs & set(got)
    assert stats.skipped.get("empty_caption", 0) + stats.skipped.get("null_caption", 0) > 0
