"""data_card.html (issue 20 item 5) on a corpus whose every count is known by construction."""
import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_core.crawl import CrawlStats
from clip_core.curation.curate import curate
from clip_core.data.webdataset import write_shard
from clip_core.errors import InputError
from clip_core.executors import LocalExecutor
from flows.data_card import CARD_NAME, gather_facts, write_data_card

CLI = str(Path(sys.executable).parent / "clip-pipeline")
CAPTIONS = ["a red cat", "a red cat on a mat", "a blue dog", "blue sky over the sea <script>x</script>",
            "no query here", "red red red"]
# url host, status: three from img.example.org (all downloaded), two from cdn.example.net:8080 (one), one IPv6
ROWS = [("http://img.example.org/1.jpg", "success"), ("http://img.example.org/2.jpg", "success"),
        ("https://cdn.example.net:8080/3.png", "success"), ("http://img.example.org/4.jpg", "success"),
        ("http://user@[::1]:80/5.jpg", "failed_to_download"),
        ("https://cdn.example.net:8080/6.png", "failed_to_resize")]


def _jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 150), color).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def corpus(tmp_path):
    """Curated by the real curate; shards, their Parquet and crawl_stats.json as a crawl leaves them."""
    pq.write_table(pa.table({"url": [u for u, _ in ROWS], "caption": CAPTIONS}), tmp_path / "pairs.parquet")
    pq.write_table(pa.table({"query": ["red", "cat", "blue", "sea"], "kind": ["unigram"] * 4}),
                   tmp_path / "queries.parquet")
    curated = str(tmp_path / "curated")
    curate(str(tmp_path / "pairs.parquet"), str(tmp_path / "queries.parquet"), curated, max_per_query=2,
           executor=LocalExecutor(1))
    shards = tmp_path / "shards"
    shards.mkdir()
    ok = [i for i, (_, status) in enumerate(ROWS) if status == "success"]
    write_shard(fsspec.filesystem("file"), str(shards / "00000.tar"),
                [{"__key__": f"{i:09d}", "jpg": _jpeg((40 * i, 90, 200)), "txt": CAPTIONS[i]} for i in ok])
    pq.write_table(pa.table({"url": [u for u, _ in ROWS], "caption": CAPTIONS,
                             "status": [s for _, s in ROWS]}), shards / "00000.parquet")
    stats = CrawlStats(input_rows=6, queued=6, attempted=6, success=4, failed_to_download=1, failed_to_resize=1,
                       errors={"HTTP Error 404: Not Found": 1, "Image decoding error": 1},
                       refused={"private_address": 2}, pairs=curated)
    (shards / "crawl_stats.json").write_text(json.dumps(stats.to_dict()))
    return str(shards), curated


def test_counts_hosts_captions_and_failures_are_the_corpus_own(corpus):
    shards, curated = corpus
    facts = gather_facts(shards)  # curation found from crawl_stats.json's `pairs`
    funnel = dict(facts.funnel)
    assert funnel["candidate pairs"] == 6 and funnel["matched a query"] == 5  # "no query here" matches none
    assert funnel["downloaded"] == 4 and funnel["queued for download"] == 6
    assert facts.hosts == [("img.example.org", 3, 3), ("cdn.example.net", 2, 1), ("[::1]", 1, 0)]
    assert facts.captions["n"] == 4 and facts.captions["words"][50] == 4.5  # rows 0-3: 3, 6, 3, 6 words
    assert facts.captions["tokens"][50] == 6.5  # 5 (<start> a red cat <end>), 8, 5 and more: (5 + 8) / 2
    assert ("crawl: refused", "private_address", 2) in facts.failures
    assert ("crawl: failed", "HTTP Error 404: Not Found", 1) in facts.failures
    head = {q: (m, k) for q, m, k in facts.queries["head"]}
    assert head["red"][0] == 3 and head["red"][1] >= 2  # in three captions; two kept anyway: "cat" (2 <= t) keeps them
    assert dict(facts.queries["buckets"])["1-9"] == 4  # red 3, cat 2, blue 2, sea 1
    assert len(facts.samples) == 4
    for jpg, caption in facts.samples:
        image = Image.open(io.BytesIO(jpg))
        assert image.format == "JPEG" and max(image.size) <= 128 and caption in CAPTIONS


def test_the_card_is_one_self_contained_escaped_file(corpus):
    shards, _ = corpus
    card = write_data_card(shards)
    assert card.uri == f"{shards}/{CARD_NAME}" and Path(card.uri).read_text() == card.html
    sources = re.findall(r'src="([^"]*)"', card.html)
    assert sources and all(s.startswith("data:image/") for s in sources)  # pictures inside, no paths
    for source in sources:
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    assert "<script>" not in card.html and "&lt;script&gt;" in card.html  # captions are text, not markup
    assert "href=" not in card.html and [p.name for p in Path(shards).iterdir() if "card" in p.name] == [CARD_NAME]
    links = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", card.markdown)
    assert links and all(link.startswith("data:image/") for link in links)  # the Prefect artifact too


def test_a_folder_that_is_not_a_crawl_is_bad_input(tmp_path, corpus):
    with pytest.raises(InputError, match="crawl the corpus first"):
        write_data_card(str(tmp_path))
    with pytest.raises(InputError, match="not a finished dedup output"):
        write_data_card(corpus[0], dedup=str(tmp_path / "nowhere"))
    out = subprocess.run([CLI, "data-card", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "crawl the corpus first" in out.stderr


def test_the_command_writes_the_card(corpus):
    shards, curated = corpus
    out = subprocess.run([CLI, "data-card", shards, "--curated", curated], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert (Path(shards) / CARD_NAME).is_file() and "t = 2 pairs at most" in (Path(shards) / CARD_NAME).read_text()


def test_a_corpus_on_s3_gets_its_card_there(corpus, s3):
    """Shards and curation on S3 (a moto server on 127.0.0.1): read and written through fsspec."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    shards, curated = corpus
    fs.put(curated, f"{s3}/curated", recursive=True)
    stats = json.loads((Path(shards) / "crawl_stats.json").read_text()) | {"pairs": f"s3://{s3}/curated"}
    (Path(shards) / "crawl_stats.json").write_text(json.dumps(stats))
    fs.put(shards, f"{s3}/shards", recursive=True)
    card = write_data_card(f"s3://{s3}/shards")
    assert card.uri == f"s3://{s3}/shards/{CARD_NAME}" and fs.cat_file(card.uri).decode() == card.html
    assert dict(gather_facts(f"s3://{s3}/shards").funnel)["candidate pairs"] == 6  # curation found on S3 too


def test_the_card_drawn_in_a_child_process_is_the_same_card(corpus, tmp_path):
    """build-corpus draws it apart from the flow's process (flows.data_card.write_data_card_apart)."""
    from flows.data_card import write_data_card_apart

    shards, _ = corpus
    apart = write_data_card_apart(shards)
    assert apart == write_data_card(shards) and Path(apart.uri).read_text() == apart.html
    with pytest.raises(InputError, match="crawl the corpus first"):  # bad input crosses the process whole
        write_data_card_apart(str(tmp_path / "nothing"))
