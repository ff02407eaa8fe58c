"""Zero-shot classification against a fake CLIP whose answers are known by construction."""
import io
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_core.eval.datasets import load_eval_set
from clip_core.eval.features import extract_split
from clip_core.eval.zeroshot import (
    class_prompts, classification_metrics, evaluate_zeroshot, mean_per_class_recall, zeroshot_classifier,
    zeroshot_logits,
)
from clip_core.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

RED_STEP = 20  # image k is a solid image with red = 20 * k


class FakeCLIP:
    """encode_image: row `k` of image_table for an image of red 20k; encode_text: row `id` of text_table."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor):
        self.image_table, self.text_table = image_table, text_table
        self.config = SimpleNamespace(vision=SimpleNamespace(image_size=8))

    def encode_image(self, images):
        red = (images[:, 0, 0, 0] * OPENAI_DATASET_STD[0] + OPENAI_DATASET_MEAN[0]) * 255
        return self.image_table[torch.round(red / RED_STEP).long()]

    def encode_text(self, ids):
        return self.text_table[ids[:, 0]]


def vocab_tokenizer(vocab: list[str]):
    return lambda texts: torch.tensor([[vocab.index(t)] for t in texts])


def solid(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (RED_STEP * k, 50, 50)).save(buf, "PNG")
    return buf.getvalue()


def write_set(root, labels, classnames, templates, shard_size=4):
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "templates.txt").write_text("\n".join(templates) + "\n")
    for s in range(0, len(labels), shard_size):
        with tarfile.open(root / "test" / f"{s // shard_size:06d}.tar", "w") as tar:
            for k in range(s, min(s + shard_size, len(labels))):
                for name, data in ((f"{k:04d}.png", solid(k)), (f"{k:04d}.cls", str(labels[k]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


CLASSES = [f"class{j}" for j in range(10)]
TEMPLATES = ["a photo of a {c}.", "a {c} drawing."]
E = torch.eye(11)  # 10 class directions + one template direction


def prompt_table() -> tuple[list[str], torch.Tensor]:
    """Template 0 adds +0.5 e10, template 1 adds -0.5 e10: the ensemble cancels it exactly."""
    vocab, rows = [], []
    for j, c in enumerate(CLASSES):
        for t, template in enumerate(TEMPLATES):
            vocab.append(template.replace("{c}", c))
            rows.append(E[j] + (0.5 if t == 0 else -0.5) * E[10])
    return vocab, torch.stack(rows)


def image_table() -> torch.Tensor:
    """Images 0-6 right; 7 and 8 wrong with the label second; 9 wrong with the label outside the top 5."""
    rows = [E[k] for k in range(7)]
    rows += [E[8] + 0.5 * E[7], E[9] + 0.5 * E[8]]
    rows += [E[0] + 0.4 * E[1] + 0.3 * E[2] + 0.2 * E[3] + 0.1 * E[4]]
    return torch.stack(rows)


def test_classifier_averages_normalised_prompts():
    vocab, text = prompt_table()
    model = FakeCLIP(image_table(), text)
    clf = zeroshot_classifier(model, CLASSES, TEMPLATES, tokenizer=vocab_tokenizer(vocab))
    assert clf.shape == (11, 10)
    torch.testing.assert_close(clf, E[:, :10])  # the template direction cancels


def test_classifier_matches_a_loop_reference():
    vocab = [t.replace("{c}", c) for c in CLASSES[:4] for t in TEMPLATES]
    text = torch.randn(len(vocab), 6)
    model = FakeCLIP(torch.zeros(1, 6), text)
    clf = zeroshot_classifier(model, CLASSES[:4], TEMPLATES, tokenizer=vocab_tokenizer(vocab), batch_size=3)
    for j in range(4):
        emb = F.normalize(text[2 * j:2 * j + 2], dim=-1).mean(0)
        torch.testing.assert_close(clf[:, j], emb / emb.norm())


def test_synonyms_are_ensembled_together():
    prompts = class_prompts(("happy", "smiling"), ["a {c} face", "{c}"])
    assert prompts == ["a happy face", "happy", "a smiling face", "smiling"]


def test_logits_use_normalised_images_and_scale_100():
    logits = zeroshot_logits(torch.tensor([[3.0, 4.0]]), torch.eye(2))
    torch.testing.assert_close(logits, torch.tensor([[60.0, 80.0]]))


def test_evaluate_zeroshot_known_answer(tmp_path):
    vocab, text = prompt_table()
    root = write_set(tmp_path / "ten", list(range(10)), CLASSES, TEMPLATES)
    result = evaluate_zeroshot(FakeCLIP(image_table(), text), load_eval_set(root), batch_size=3,
                               tokenizer=vocab_tokenizer(vocab), progress=False)
    assert result.metrics == pytest.approx({"acc1": 0.7, "acc5": 0.9, "mean_per_class_recall": 0.7})
    assert result.correct.tolist() == [True] * 7 + [False] * 3
    assert result.predictions.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 0]
    assert result.keys == [f"{k:04d}" for k in range(10)]


def test_decoding_threads_give_the_same_features(tmp_path):
    root = write_set(tmp_path / "ten", list(range(10)), CLASSES, TEMPLATES)
    model = FakeCLIP(torch.randn(10, 4), torch.zeros(1, 4))
    inline = extract_split(model, str(root), batch_size=3, progress=False)
    threaded = extract_split(model, str(root), batch_size=3, progress=False, num_workers=2)
    torch.testing.assert_close(inline.image_features, threaded.image_features)
    assert threaded.labels.tolist() == list(range(10)) and threaded.keys == inline.keys


def test_empty_split_is_reported(tmp_path):
    root = write_set(tmp_path / "none", [], CLASSES, TEMPLATES)
    with pytest.raises(ValueError, match="split 'test' is empty"):
        extract_split(FakeCLIP(torch.eye(2), torch.eye(2)), str(root), progress=False)


def test_metrics_imbalanced_classes():
    labels = np.array([0] * 8 + [1] * 2)
    logits = torch.zeros(10, 2)
    logits[:, 0] = 1.0  # always predicts class 0
    result = classification_metrics(logits, labels)
    assert result.metrics == {"acc1": 0.8, "acc5": None, "mean_per_class_recall": 0.5}
    assert mean_per_class_recall(np.array([0, 1, 1]), np.array([0, 1, 0])) == pytest.approx(0.75)


def test_label_outside_the_class_list(tmp_path):
    root = write_set(tmp_path / "bad", [0, 1, 5], ["a", "b", "c"], ["a {c}"])
    model = FakeCLIP(torch.eye(3), torch.eye(3))
    with pytest.raises(ValueError, match=r"label 5 is outside 0\.\.2.*3 names"):
        evaluate_zeroshot(model, str(root), tokenizer=vocab_tokenizer(["a a", "a b", "a c"]), progress=False)


def test_retrieval_set_is_refused(tmp_path):
    es = SimpleNamespace(kind="retrieval", name="flickr")
    with pytest.raises(ValueError, match="not classification"):
        evaluate_zeroshot(FakeCLIP(torch.eye(2), torch.eye(2)), es)
