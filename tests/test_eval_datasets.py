"""Eval set reader: WebDataset shards and ImageFolder trees written here, paper prompts, bad input."""
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clip_core.eval.datasets import (
    EvalSet, check_templates, fill_template, iter_samples, list_splits, load_eval_set, paper_prompts,
    read_image, read_images,
)
from clip_core.data.webdataset import DamagedShardError
from clip_core.errors import InputError
from clip_core.transforms import ImageDecodeError


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cls_members(keys_labels) -> list[tuple[str, bytes]]:
    pairs = [((f"{key}.png", png(label * 20)), (f"{key}.cls", b"%d" % label)) for key, label in keys_labels]
    return [m for pair in pairs for m in pair]


def write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def cls_set(tmp_path):
    root = tmp_path / "shapes"
    write_lines(root / "classnames.txt", ["circle", "square", "triangle"])
    write_lines(root / "templates.txt", ["a photo of a {c}.", "a drawing of a {}."])
    # written out of name order: the reader sorts shards by name
    write_tar(root / "test" / "000001.tar", cls_members([("c", 2), ("d", 0)]))
    write_tar(root / "test" / "000000.tar", cls_members([("a", 0), ("b", 1)]))
    write_tar(root / "train" / "000000.tar", cls_members([("t", 1)]))
    return root


def test_webdataset_classification_order_and_fields(cls_set):
    samples = list(iter_samples(cls_set, "test"))
    assert [(s.key, s.label, s.index) for s in samples] == [("a", 0, 0), ("b", 1, 1), ("c", 2, 2), ("d", 0, 3)]
    assert samples[2].ext == "png" and samples[2].captions is None
    assert read_image(samples[2]).getpixel((0, 0)) == (40, 0, 0)
    assert [im.size for im in read_images(samples)] == [(8, 8)] * 4


def test_load_eval_set_classification(cls_set):
    es = load_eval_set(cls_set)
    assert isinstance(es, EvalSet)
    assert (es.name, es.kind, es.split, es.num_classes) == ("shapes", "classification", "test", 3)
    assert es.classnames == ("circle", "square", "triangle")
    assert es.templates == ("a photo of a {c}.", "a drawing of a {c}.")  # `{}` normalised
    assert es.splits == ("test", "train")
    assert [s.key for s in es.with_split("train").samples()] == ["t"]
    assert list_splits(str(cls_set)) == ("test", "train")


def test_retrieval_set_txt_and_json(tmp_path):
    root = tmp_path / "flickr"
    write_tar(root / "test" / "000000.tar", [
        ("a.jpg", png(1)), ("a.txt", b"a red dog\na dog running\n"),
        ("b.webp", png(2)), ("b.json", json.dumps(["one", "two", "three"]).encode()),
        ("c.jpg", png(3)), ("c.json", json.dumps({"captions": ["x y"]}).encode()),
    ])
    es = load_eval_set(root)
    assert es.kind == "retrieval" and es.classnames == ()
    got = [(s.key, s.captions, s.ext) for s in es.samples()]
    assert got == [("a", ("a red dog", "a dog running"), "jpg"), ("b", ("one", "two", "three"), "webp"),
                   ("c", ("x y",), "jpg")]


def test_image_folder_sorted_folders(tmp_path):
    root = tmp_path / "folders"
    for cls, names in {"dog": ["b.jpg", "a.png"], "cat": ["z.jpg"]}.items():
        for i, name in enumerate(names):
            (root / "test" / cls).mkdir(parents=True, exist_ok=True)
            (root / "test" / cls / name).write_bytes(png(i))
    (root / "test" / "dog" / "notes.txt").write_text("not an image")
    es = load_eval_set(root)
    assert es.classnames == ("cat", "dog") and es.templates == ("a photo of a {c}.",)
    assert [(s.key, s.label, s.index) for s in es.samples()] == [("cat/z", 0, 0), ("dog/a", 1, 1), ("dog/b", 1, 2)]


def test_image_folder_with_readable_classnames(tmp_path):
    root = tmp_path / "synsets"
    for folder in ("n02", "n01"):
        (root / "test" / folder).mkdir(parents=True)
        (root / "test" / folder / "x.png").write_bytes(png(0))
    write_lines(root / "classnames.txt", ["goldfish", "shark"])  # sorted folder order n01, n02
    es = load_eval_set(root)
    assert es.classnames == ("goldfish", "shark")
    assert [(s.key, s.label) for s in es.samples()] == [("n01/x", 0), ("n02/x", 1)]


def test_paper_prompts_fill_missing_files(tmp_path):
    root = tmp_path / "c10"
    write_tar(root / "test" / "0.tar", cls_members([("a", 3)]))
    es = load_eval_set(root, dataset_name="cifar10")
    assert es.name == "cifar10" and es.num_classes == 10 and es.classnames[3] == "cat"
    assert len(es.templates) == 18 and all("{c}" in t and "{}" not in t for t in es.templates)


def test_paper_prompts_override_only_when_asked(cls_set):
    assert load_eval_set(cls_set, dataset_name="cifar10").classnames == ("circle", "square", "triangle")
    assert load_eval_set(cls_set, dataset_name="CIFAR-10", use_paper_prompts=True).num_classes == 10


def test_paper_prompts_names_and_synonyms():
    assert len(paper_prompts("imagenet1k")[0]) == 1000
    assert len(paper_prompts("vtab/flowers")[0]) == 102
    classes, _ = paper_prompts("fer2013")
    assert all(isinstance(c, tuple) for c in classes) and ("happy" in classes[3])
    with pytest.raises(ValueError, match="no paper prompts"):
        paper_prompts("no-such-set")


def test_templates_need_a_placeholder(tmp_path, cls_set):
    assert fill_template("a {c} or a {}", "cat") == "a cat or a cat"
    with pytest.raises(ValueError, match="no class placeholder"):
        check_templates(["a photo of a {c}.", "a photo."])
    write_lines(cls_set / "templates.txt", ["a photo of a {label}."])
    with pytest.raises(ValueError, match="template 1 .* no class placeholder"):
        load_eval_set(cls_set)


def test_missing_classnames_without_dataset_name(tmp_path):
    root = tmp_path / "anon"
    write_tar(root / "test" / "0.tar", cls_members([("a", 0)]))
    with pytest.raises(ValueError, match="no classnames.txt; pass a dataset name"):
        load_eval_set(root)


def test_empty_and_missing_splits(tmp_path, cls_set):
    root = tmp_path / "empty"
    write_tar(root / "test" / "0.tar", [])
    with pytest.raises(ValueError, match="is empty"):
        load_eval_set(root)
    with pytest.raises(InputError, match="no split 'val'.*test, train"):
        load_eval_set(cls_set, split="val")
    with pytest.raises(InputError, match="nowhere: no eval set folder"):
        load_eval_set(tmp_path / "nowhere")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile: is a file, not an eval set folder"):
        load_eval_set(tmp_path / "afile")


def test_bad_samples(tmp_path):
    write_tar(tmp_path / "a" / "test" / "0.tar", [("k.cls", b"1")])
    with pytest.raises(ValueError, match="'k' has no image"):
        list(iter_samples(tmp_path / "a", "test"))
    write_tar(tmp_path / "b" / "test" / "0.tar", [("k.jpg", png(0)), ("k.cls", b"dog")])
    with pytest.raises(ValueError, match="non-integer cls"):
        list(iter_samples(tmp_path / "b", "test"))
    write_tar(tmp_path / "c" / "test" / "0.tar", [("k.jpg", b"not a jpeg"), ("k.cls", b"0")])
    with pytest.raises(ImageDecodeError, match="k.jpg"):
        read_image(next(iter_samples(tmp_path / "c", "test")))


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_an_empty_templates_file_is_an_error_not_the_default(cls_set, text):
    """Issue 14: an empty templates.txt fell back to "a photo of a {c}." without a word."""
    (cls_set / "templates.txt").write_text(text)
    with pytest.raises(InputError, match=r"shapes/templates.txt: has no entries .*\{c\} for the class name"):
        load_eval_set(cls_set)
    (cls_set / "templates.txt").unlink()  # no file at all: the documented default
    assert load_eval_set(cls_set).templates == ("a photo of a {c}.",)


def test_an_empty_classnames_file_is_an_error(cls_set):
    (cls_set / "classnames.txt").write_text("\n\n")
    with pytest.raises(InputError, match="shapes/classnames.txt: has no entries .*one class name a line"):
        load_eval_set(cls_set)


def test_a_truncated_eval_shard_is_an_error_naming_it(cls_set):
    """An eval number measured on part of a set would not compare: the cut shard is refused, by name."""
    shard = cls_set / "test" / "000001.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        second = tar.getmembers()[2].offset  # d.png's header: a cut tarfile alone reads as a whole shard
    shard.write_bytes(data[:second])
    with pytest.raises(DamagedShardError, match="000001.tar: shard is truncated after 0 complete samples"):
        list(iter_samples(cls_set, "test"))
