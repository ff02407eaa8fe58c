"""clip_core/data/webdataset.py's shard lister: the one that dedup, training and the eval sets share."""
import pytest

from clip_core.data.webdataset import list_shards, write_shards
from clip_core.errors import InputError


def test_shards_are_listed_sorted_as_uris(tmp_path):
    write_shards(str(tmp_path / "c"), [{"__key__": f"{i:03d}", "txt": "x"} for i in range(5)], maxcount=2)
    (tmp_path / "c" / "000000.parquet").write_text("img2dataset's listing, not a shard")
    shards = list_shards(str(tmp_path / "c"))
    assert shards == [f"file://{tmp_path}/c/{i:06d}.tar" for i in range(3)]
    assert list_shards(str(tmp_path / "c"), where="corpus") == shards
    (tmp_path / "empty").mkdir()
    assert list_shards(str(tmp_path / "empty")) == []  # unchecked, an empty folder is no error


@pytest.mark.parametrize("name, problem", [
    ("missing", "no such folder"),
    ("afile", "is a file, not a folder"),
    ("empty", r"no .tar shards \(empty corpus, or not a WebDataset folder\?\)"),
])
def test_checked_listing_names_the_folder_and_the_fix(tmp_path, name, problem):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a shard")
    uri = str(tmp_path / name)
    with pytest.raises(InputError, match=rf"^corpus {uri}: {problem} \(pass the folder crawl wrote\)$"):
        list_shards(uri, where=f"corpus {uri}", fix="pass the folder crawl wrote")


def test_the_image_field_is_found_case_blind_in_order_of_preference():
    from clip_core.data.webdataset import image_field

    assert image_field({"__key__": "a", "txt": "x", "PNG": b"1", "jpg": b"2"}) == "jpg"
    assert image_field({"__key__": "a", "Webp": b"1"}) == "Webp"
    assert image_field({"__key__": "jpg", "txt": "no image"}) is None


def test_a_damaged_shard_error_crosses_a_process_whole():
    import pickle

    from clip_core.data.webdataset import DamagedShardError

    err = pickle.loads(pickle.dumps(DamagedShardError("s/00001.tar", 7, "truncated", "unexpected end", "00001/0007")))
    assert (err.path, err.samples_read, err.reason, err.detail, err.lost_key) == (
        "s/00001.tar", 7, "truncated", "unexpected end", "00001/0007")
    assert isinstance(err, InputError) and "after 7 complete samples" in str(err)


def test_a_glob_or_one_tar_file_lists_like_a_folder(tmp_path):
    write_shards(str(tmp_path / "c"), [{"__key__": f"{i:04d}", "txt": "x"} for i in range(6)], maxcount=2)
    folder = list_shards(str(tmp_path / "c"))
    assert list_shards(str(tmp_path / "c" / "00000[01].tar")) == folder[:2]
    assert list_shards(str(tmp_path / "c" / "000002.tar")) == folder[2:]
    with pytest.raises(InputError, match="the glob matches no .tar shard"):
        list_shards(str(tmp_path / "c" / "9*.tar"), where="corpus")
