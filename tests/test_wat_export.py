"""The synthetic web's pages as WAT files: `extract` gives back the web's pairs."""
import pyarrow.parquet as pq

from flows.cli import main
from clip_core.extract import extract


def test_extract_of_the_web_wat_gives_back_its_pairs(tmp_path):
    web = tmp_path / "web"
    assert main(["web", "generate", str(web), "--pairs", "300", "--eval-size", "2", "--wat"]) == 0
    wat_files = sorted((web / "wat").glob("*.warc.wat.gz"))
    assert wat_files

    stats = extract([str(f) for f in wat_files], str(tmp_path / "pairs"), workers=1)
    got = pq.read_table(sorted((tmp_path / "pairs").glob("part-*.parquet"))).to_pydict()
    pairs = pq.read_table(web / "pairs.parquet").to_pydict()
    # what extraction must keep: non-empty alts (whitespace collapsed), first (url, caption) only
    expected = []
    for url, caption in zip(pairs["url"], pairs["caption"]):
        caption = " ".join(caption.split())
        if caption and (url, caption) not in expected:
            expected.append((url, caption))
    assert list(zip(got["url"], got["caption"])) == expected
    assert stats.to_dict()["totals"]["pages"] == 15  # 300 pairs, 20 a page
    assert all(p.endswith(".html") for p in got["page_url"])
