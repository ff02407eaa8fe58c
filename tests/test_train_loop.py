"""The training loop: optimizer groups, schedule, clamp, accumulation, DDP gradients, NaN stop."""
import math
import multiprocessing as mp
import os

import pytest
import torch

from flows.common import free_port
from clip_core.loss import ClipLoss
from clip_core.model import create_model
from clip_core.train import TrainConfig, build_training
from clip_core.train.accum import forward_backward
from clip_core.train.checkpoint import CheckpointCallback, latest_checkpoint, read_train_state
from clip_core.train.loop import NonFiniteLossError, Trainer
from clip_core.train.optim import MAX_LOGIT_SCALE, WarmupCosine, build_optimizer, clamp_logit_scale, param_groups
from test_train_data import make_shards


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    torch.manual_seed(0)
    return create_model("tiny", vision_cfg={"image_size": 32})


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 49000, (n, 12), generator=g)
    tokens[:, -1] = 49407  # end of text: the largest id
    return images, tokens


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def worst_relative_error(got: dict, expected: dict) -> float:
    """max over tensors of |got - expected| / |expected| (Frobenius norms)."""
    return max(((got[k] - expected[k]).norm() / expected[k].norm()).item() for k in expected)


def test_no_weight_decay_on_gains_biases_embeddings_and_logit_scale():
    model = tiny()
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): k for k, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    for name in ("logit_scale", "positional_embedding", "token_embedding.weight", "visual.class_embedding",
                 "visual.positional_embedding", "ln_final.weight", "visual.ln_pre.bias",
                 "transformer.resblocks.0.attn.in_proj_bias"):
        assert name not in decayed
    for name in ("visual.conv1.weight", "visual.proj", "text_projection", "transformer.resblocks.0.attn.in_proj_weight",
                 "transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.3.attn.out_proj.weight"):
        assert name in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_warmup_then_cosine():
    s = WarmupCosine(1.0, warmup=10, total=110)
    assert s(0) == pytest.approx(0.1) and s(4) == pytest.approx(0.5) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.5) and s(110) == pytest.approx(0.0)
    assert s(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(500) == 0.0


def test_logit_scale_is_clamped_after_each_step():
    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    trainer = Trainer(model, build_optimizer(model, 1e-3), ClipLoss(), post_step=clamp_logit_scale)
    trainer.train_step(batch())
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == 0.0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_accumulation_equals_one_big_batch(precision):
    from clip_core.train.loop import make_autocast

    autocast = make_autocast(precision, torch.device("cpu"))
    inputs = batch(8)
    big, acc = tiny(), tiny()
    loss_big = forward_backward(big, ClipLoss(), inputs, 1, autocast)
    loss_acc = forward_backward(acc, ClipLoss(), inputs, 4, autocast)
    assert loss_acc.item() == pytest.approx(loss_big.item(), rel=1e-5)
    # bf16 rounds differently in micro-batches; dropping negatives would be off by ~100%
    assert worst_relative_error(grads(acc), grads(big)) < (1e-4 if precision == "fp32" else 5e-2)


def _ddp_grads(rank, world, port, inputs, accum, path):
    """One DDP rank: local loss with gradients through the gather, on its half of the batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny()
    n = inputs[0].shape[0] // world
    local = tuple(x[rank * n:(rank + 1) * n] for x in inputs)
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    forward_backward(DDP(model), loss, local, accum)
    if rank == 0:
        torch.save(grads(model), path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_local_loss_and_accumulation_equal_one_process(tmp_path):
    inputs, path, port = batch(8), tmp_path / "grads.pt", free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_grads, args=(r, 2, port, inputs, 2, path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    single = tiny()
    forward_backward(single, ClipLoss(), inputs, 1)
    assert worst_relative_error(torch.load(path), grads(single)) < 1e-4


def _config(tmp_path, **kw):
    folder, _ = make_shards(tmp_path / "corpus", 2, 48)
    base = dict(corpus=str(folder), preset="tiny", image_size=32, steps=40,
                batch_size=16, lr=1e-3, warmup=4, precision="fp32", data_workers=1, shuffle_buffer=32)
    return TrainConfig(**{**base, **kw})


class Recorder:
    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer):
        self.rows.append(dict(trainer.metrics, step=trainer.step))


@pytest.mark.slow
def test_loss_falls_on_coloured_shapes(tmp_path):
    rec = Recorder()
    trainer, loader = build_training(_config(tmp_path), callbacks=[rec])
    trainer.fit(loader, 40)
    losses = [r["loss"] for r in rec.rows]
    assert len(losses) == 40 and trainer.step == 40
    assert sum(losses[-8:]) / 8 < sum(losses[:4]) / 4 - 0.4, losses
    assert {"lr", "grad_norm", "step_time", "data_wait", "samples_per_s"} <= set(rec.rows[-1])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    class Poison:
        def on_step_end(self, trainer):
            if trainer.step == 3:
                with torch.no_grad():
                    trainer.model.ln_final.weight.fill_(float("nan"))

    cfg = _config(tmp_path, steps=6, batch_size=8)
    ckpt = CheckpointCallback(tmp_path / "ckpt", every=2)
    trainer, loader = build_training(cfg, callbacks=[ckpt, Poison()])
    with pytest.raises(NonFiniteLossError, match="step 3"):
        trainer.fit(loader, 6)
    last = latest_checkpoint(tmp_path / "ckpt")
    assert last.name == "step_00000002" and read_train_state(last)["step"] == 2
    assert trainer.step == 3


def test_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    """Ray workers run elsewhere: `clip-pipeline train runs/x/shards runs/x/train` must still find them."""
    from flows.train import RunSettings

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(corpus="runs/shards", exclude="runs/dedup/matches.parquet", eval=["runs/web/eval/shapes"])
    run = RunSettings(output="runs/train", storage_path="s3://bucket/ray", resume="runs/train/ray/step_00000002")
    assert cfg.corpus == str(tmp_path / "runs" / "shards") and run.output == str(tmp_path / "runs" / "train")
    assert cfg.exclude == str(tmp_path / "runs" / "dedup" / "matches.parquet")
    assert cfg.eval == (str(tmp_path / "runs" / "web" / "eval" / "shapes"),)
    assert run.storage_path == "s3://bucket/ray" and run.resume_from == str(tmp_path / "runs/train/ray/step_00000002")
    assert RunSettings(resume="never").resume_from is None and RunSettings().resume_from is None


def test_the_recipe_is_frozen_and_crosses_as_plain_values():
    import dataclasses
    import json

    cfg = TrainConfig(preset="tiny", steps=3, eval=["/e/shapes"], betas=[0.9, 0.95])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # as it reaches a Ray worker
    assert cfg.replace(steps=5).steps == 5 and cfg.steps == 3
    with pytest.raises(ValueError, match="unknown training options: \\['workers'\\]"):
        TrainConfig.from_dict({"workers": 2})  # where the run executes is not part of the recipe
    with pytest.raises(ValueError, match="not divisible by workers x accum_steps = 3 x 2"):
        TrainConfig(batch_size=10, accum_steps=2).check_workers(3)


def test_deferred_checks_name_the_bad_step_and_write_no_checkpoint_after_it(tmp_path):
    """check_every > 1 (a GPU run: no host sync per step): the loss stays on the device until it is read."""
    class Poison:
        def on_step_end(self, trainer):
            if trainer.step == 3:
                with torch.no_grad():
                    trainer.model.ln_final.weight.fill_(float("nan"))

    rec = Recorder()
    cfg = _config(tmp_path, steps=8, batch_size=8)
    ckpt = CheckpointCallback(tmp_path / "ckpt", every=2)
    trainer, loader = build_training(cfg, callbacks=[rec, ckpt, Poison()], check_every=3)
    with pytest.raises(NonFiniteLossError, match="at step 3, found at step 4"):
        trainer.fit(loader, 8)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step_00000002"  # step 4's was refused
    assert torch.is_tensor(rec.rows[0]["loss"]) and rec.rows[0]["loss"].dim() == 0  # no sync in the step
    assert math.isfinite(rec.rows[2]["loss"].item()) and math.isnan(rec.rows[3]["loss"].item())


def test_the_loader_sends_uint8_and_the_trainer_normalises_as_the_loader_did(tmp_path):
    from clip_core.train.loop import NormalizeImages
    from clip_core.transforms import image_transform
    from PIL import Image

    trainer, loader = build_training(_config(tmp_path))
    images, _ = next(iter(loader))
    assert images.dtype == torch.uint8 and isinstance(trainer.prepare, NormalizeImages)
    img = Image.effect_mandelbrot((40, 30), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    as_float = image_transform(32, generator=0)(img)
    as_uint8 = image_transform(32, generator=0, normalize=False)(img)
    assert torch.equal(trainer.prepare((as_uint8[None],))[0][0], as_float)  # the same values, bit for bit
    assert not hasattr(trainer.model, "_orig_mod")  # compile: None means CUDA only


def test_a_gpu_style_run_writes_every_step_to_metrics_jsonl_at_log_steps(tmp_path):
    import json

    from flows.tracking import MetricsCallback, Tracker

    class Lines:
        def __init__(self, path):
            self.path, self.seen = path, []

        def on_step_end(self, trainer):
            self.seen.append(len(self.path.read_text().splitlines()) if self.path.exists() else 0)

    log = tmp_path / "metrics.jsonl"
    metrics, lines = MetricsCallback(Tracker(None), log, log_every=4, world_size=1), Lines(log)
    trainer, loader = build_training(_config(tmp_path, steps=10, batch_size=8), callbacks=[metrics, lines],
                                     check_every=4)
    trainer.fit(loader, 10)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11)) and all(isinstance(r["loss"], float) for r in rows)
    assert lines.seen == [1, 1, 1, 4, 4, 4, 4, 8, 8, 8]  # step 1, then at log steps; the rest at the end
