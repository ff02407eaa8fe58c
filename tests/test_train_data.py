"""The training data stream: shard split, shuffle, corrupt samples, exact resume."""
import io
import json
import random
import tarfile
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from clip_core.errors import InputError
from clip_core.train.data import CorpusError, DataConfig, ShardLoader, check_corpus, iter_samples, list_shards

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def shape_image(colour: str, shape: str, rng: random.Random, size: int = 40) -> bytes:
    """A JPEG of one coloured shape on a light background, jittered in place and size."""
    img = Image.new("RGB", (size, size), tuple(rng.randrange(200, 256) for _ in range(3)))
    r = rng.randrange(size // 4, size // 2 - 2)
    cx, cy = rng.randrange(r, size - r), rng.randrange(r, size - r)
    box, fill = (cx - r, cy - r, cx + r, cy + r), COLOURS[colour]
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder, n_shards: int = 2, per_shard: int = 16, corrupt=(), no_image=(), seed: int = 0):
    """img2dataset-style shards NNNNN.tar of KEY.jpg/.txt/.json; returns the folder and all keys."""
    folder, rng, keys = Path(folder), random.Random(seed), []
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                caption = f"a photo of a {colour} {shape}"
                image = b"not a jpeg at all" if key in corrupt else shape_image(colour, shape, rng)
                if key not in no_image:
                    _add(tar, f"{key}.jpg", image)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption, "status": "success"}).encode())
                keys.append(key)
    return folder, keys


def _loader(folder, **kw):
    cfg = dict(corpus=str(folder), batch_size=4, image_size=32, shuffle_buffer=1, num_workers=0)
    return ShardLoader(DataConfig(**{**cfg, **kw}))


def _keys(loader, n_batches):
    out, it = [], iter(loader)
    for _ in range(n_batches):
        next(it)
        out.extend(loader.last_keys)
    return out


def test_bad_corpora_raise_clearly(tmp_path):
    with pytest.raises(InputError, match="missing: corpus does not exist"):
        list_shards(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .tar shards"):
        list_shards(str(tmp_path / "empty"))
    folder, keys = make_shards(tmp_path / "textonly", 1, 4, no_image={f"00000{i:04d}" for i in range(4)})
    with pytest.raises(CorpusError, match="no images"):
        check_corpus(str(folder))


def test_samples_group_members_by_key(tmp_path):
    folder, keys = make_shards(tmp_path, 1, 3)
    samples = list(iter_samples(list_shards(str(folder))[0]))
    assert [k for k, _ in samples] == keys
    assert set(samples[0][1]) == {"jpg", "txt", "json"}


def test_training_reads_the_keys_that_webdataset_reads(tmp_path):
    """One reader and one sample key: the keys dedup writes to matches.parquet are the keys `--exclude` drops."""
    import fsspec

    from clip_core.data.webdataset import iter_shard

    jpeg, folder = shape_image("red", "circle", random.Random(0)), tmp_path / "c"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in (("sub/a.JPG", jpeg), ("sub/a.txt", b"a red circle"), ("b.jpg", jpeg), ("b.txt", b"b")):
            _add(tar, name, data)
    fs, path = fsspec.core.url_to_fs(str(folder / "00000.tar"))
    assert [k for k, _ in iter_samples(str(folder / "00000.tar"))] == [s["__key__"] for s in iter_shard(fs, path)]
    loader = _loader(folder, exclude=frozenset({"sub/a"}), batch_size=1)
    assert _keys(loader, 2) == ["b", "b"]  # two epochs of the one sample left; the upper-case JPG was read
    assert loader.stats().excluded == 2 and loader.stats().skipped == 0


def test_one_epoch_sees_every_sample_once(tmp_path):
    folder, keys = make_shards(tmp_path, 3, 8)
    loader = _loader(folder)
    images, tokens = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and tokens.shape == (4, 77)
    assert sorted(_keys(_loader(folder), 6)) == sorted(keys)


def test_ranks_and_workers_split_an_epoch(tmp_path):
    folder, keys = make_shards(tmp_path, 1, 16)  # fewer shards than streams: shards are sliced
    seen = []
    for rank in range(2):
        seen += _keys(_loader(folder, rank=rank, world_size=2, num_workers=2, batch_size=2), 4)
    assert sorted(seen) == sorted(keys)


@pytest.mark.parametrize("buffer", [8, 1000])
def test_shuffle_buffer_mixes_within_each_epoch(tmp_path, buffer):
    folder, keys = make_shards(tmp_path, 2, 16)
    got = _keys(_loader(folder, shuffle_buffer=buffer), 16)  # two epochs
    assert got[:32] != keys and got[:32] != got[32:]
    assert sorted(got[:32]) == sorted(keys) == sorted(got[32:])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(tmp_path, workers):
    folder, keys = make_shards(tmp_path, 3, 8)
    kw = dict(shuffle_buffer=6, num_workers=workers, batch_size=3)
    whole = _loader(folder, **kw)
    expected = _keys(whole, 14)  # crosses an epoch boundary
    first = _loader(folder, **kw)
    head = _keys(first, 5)  # odd: the next batch comes from the second worker
    state = first.state_dict()
    second = _loader(folder, **kw)
    second.load_state_dict(state)
    assert head + _keys(second, 9) == expected


def test_resume_gives_the_same_crops(tmp_path):
    folder, _ = make_shards(tmp_path, 2, 8)
    a = iter(_loader(folder, shuffle_buffer=4))
    for _ in range(2):
        next(a)
    expected = next(a)[0]
    first = _loader(folder, shuffle_buffer=4)
    it = iter(first)
    next(it), next(it)
    second = _loader(folder, shuffle_buffer=4)
    second.load_state_dict(first.state_dict())
    assert torch.equal(next(iter(second))[0], expected)


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    bad = {"000000001", "000000005", "000010002"}
    folder, keys = make_shards(tmp_path, 2, 8, corrupt=bad, no_image={"000010006"})
    loader = _loader(folder)
    got = _keys(loader, 3)  # 16 - 4 broken = 12 good = one epoch
    assert sorted(got) == sorted(set(keys) - bad - {"000010006"})
    stats = loader.stats()
    assert (stats.skipped, stats.good, stats.skip_reasons) == (4, 12, {"incomplete": 1, "undecodable": 3, "truncated": 0})


def test_resampled_streams_draw_with_replacement(tmp_path):
    folder, keys = make_shards(tmp_path, 4, 4)
    loader = _loader(folder, resampled=True, seed=3)
    got = Counter(_keys(loader, 8))
    assert sum(got.values()) == 32 and set(got) <= set(keys) and max(got.values()) > 1
    assert loader.stats().epoch >= 1


def test_a_position_for_another_layout_is_refused(tmp_path):
    folder, _ = make_shards(tmp_path, 2, 4)
    state = _loader(folder).state_dict()
    with pytest.raises(ValueError, match="layout|saved for"):
        _loader(folder, world_size=2).load_state_dict(state)


@pytest.mark.slow
def test_shards_stream_from_s3(tmp_path, monkeypatch):
    import fsspec
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    S3FileSystem.clear_instance_cache()  # a cached client may point at another test's server
    try:
        folder, keys = make_shards(tmp_path, 2, 6)
        fs = fsspec.filesystem("s3")
        bucket = f"corpus-{uuid.uuid4().hex[:8]}"  # moto's backend is shared by every server in the process
        fs.mkdir(bucket)
        fs.put([str(p) for p in sorted(folder.glob("*.tar"))], f"{bucket}/shards/")
        assert sorted(_keys(_loader(f"s3://{bucket}/shards", num_workers=1), 3)) == sorted(keys)
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()


def test_a_truncated_shard_is_read_up_to_the_damage(tmp_path):
    folder, keys = make_shards(tmp_path, 2, 8)
    shard = folder / "00001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    loader = _loader(folder)
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        got = _keys(loader, 4)
    assert set(keys[:8]) <= set(got) and set(got) <= set(keys)


def test_excluded_keys_are_left_out_and_counted(tmp_path):
    """dedup's matches.parquet names near-copies of eval images: training never sees them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clip_core.train.data import load_excluded_keys

    folder, keys = make_shards(tmp_path / "c", n_shards=2, per_shard=8)
    dropped = set(keys[::4])  # 4 of 16: the other 12 make 3 batches of 4
    pq.write_table(pa.table({"key": sorted(dropped), "eval_set": ["shapes"] * len(dropped)}),
                   tmp_path / "matches.parquet")
    loader = _loader(folder, exclude=load_excluded_keys(str(tmp_path / "matches.parquet")))
    seen = _keys(loader, (len(keys) - len(dropped)) // 4)
    assert sorted(seen) == sorted(set(keys) - dropped)
    assert loader.stats().excluded == len(dropped)
    (tmp_path / "keys.txt").write_text("\n".join(sorted(dropped)) + "\n")
    assert load_excluded_keys(str(tmp_path / "keys.txt")) == dropped
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="bad.parquet: has no 'key' column"):
        load_excluded_keys(str(tmp_path / "bad.parquet"))
