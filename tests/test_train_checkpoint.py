"""Training checkpoints: round trip, exact resume, atomic writes, retention."""
import pytest
import torch

import clip_core.weights as weights_module
from clip_core.train import TrainConfig, build_training, restore_training
from clip_core.train.checkpoint import CheckpointCallback, latest_checkpoint, save_train_state, step_folders
from clip_core.weights import load_checkpoint
from test_train_data import make_shards


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder, _ = make_shards(tmp_path_factory.mktemp("corpus"), 2, 24)
    return str(folder)


def config(corpus, **kw):
    base = dict(corpus=corpus, preset="tiny", image_size=32, steps=8, batch_size=8, lr=1e-3,
                warmup=2, precision="fp32", data_workers=0, shuffle_buffer=8)
    return TrainConfig(**{**base, **kw})


class Losses:
    def __init__(self):
        self.values = []

    def on_step_end(self, trainer):
        self.values.append(trainer.metrics["loss"])


def train(cfg, steps, callbacks=(), folder=None):
    trainer, loader = build_training(cfg, callbacks=callbacks)
    if folder is not None:
        loader = restore_training(folder, trainer, loader)
    for cb in callbacks:
        if isinstance(cb, CheckpointCallback):
            cb.data_state = lambda: {"ranks": [loader.state_dict()]}
    trainer.fit(loader, steps)
    return trainer, loader


def _equal_nested(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_round_trip_restores_everything(tmp_path, corpus, precision):
    cfg = config(corpus, precision=precision)
    saver = CheckpointCallback(tmp_path, every=3)
    trainer, loader = train(cfg, 3, [saver])
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "step_00000003"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "train_state.pt"}
    fresh, fresh_loader = build_training(cfg)
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.add_(1.0)
    fresh_loader = restore_training(folder, fresh, fresh_loader)
    assert fresh.step == 3
    assert _equal_nested(fresh.model.state_dict(), trainer.model.state_dict())
    assert _equal_nested(fresh.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert fresh.schedule.state_dict() == trainer.schedule.state_dict()
    if precision == "fp16":
        assert fresh.scaler.state_dict() == trainer.scaler.state_dict()
    assert fresh_loader.state_dict() == loader.state_dict()
    released = load_checkpoint(folder)  # the model as released: OpenAI names + config.json
    assert _equal_nested(released.state_dict(), trainer.model.state_dict())


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, corpus):
    cfg = config(corpus)
    whole = Losses()
    train(cfg, 8, [whole])
    head, tail = Losses(), Losses()
    train(cfg, 4, [head, CheckpointCallback(tmp_path, every=4)])
    train(cfg, 8, [tail], folder=latest_checkpoint(tmp_path))
    assert head.values == whole.values[:4]
    assert tail.values == pytest.approx(whole.values[4:], rel=1e-6, abs=1e-7)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    trainer, _ = build_training(config(corpus))
    folder = save_train_state(tmp_path / "step_00000001", trainer)
    before = (folder / "model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(weights_module.torch, "save", broken_save)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_train_state(folder, trainer)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no temporary left behind


def test_only_the_newest_checkpoints_are_kept(tmp_path, corpus):
    trainer, _ = build_training(config(corpus))
    saver = CheckpointCallback(tmp_path, every=1, num_to_keep=2)
    for step in range(1, 5):
        trainer.step = step
        saver.on_step_end(trainer)
    assert [p.name for p in step_folders(tmp_path)] == ["step_00000003", "step_00000004"]


def test_a_changed_layout_or_schedule_warns_and_goes_on(tmp_path, corpus):
    train(config(corpus), 2, [CheckpointCallback(tmp_path, every=2)])
    trainer, loader = build_training(config(corpus, steps=20, data_workers=2))
    with pytest.warns(UserWarning) as record:
        loader = restore_training(latest_checkpoint(tmp_path), trainer, loader)
    messages = " ".join(str(w.message) for w in record)
    assert "continuing with the configured" in messages and "restarting the stream" in messages
    assert trainer.step == 2 and trainer.schedule.total == 20 and loader.cfg.seed == 2
