"""CLIP and SigLIP losses: hand-written references, known values, and two gloo ranks vs one.

The distributed tests spawn two CPU processes (gloo, 127.0.0.1 only) once per module (about
7 s, half of it the one-off torch._dynamo import behind torch's functional collectives); each
rank computes the loss on its half of the batch and backpropagates. DDP averages parameter
gradients over ranks, so the averaged gradient must equal the single-process gradient on the
whole batch (see clip_core/loss.py for why, and for what gather_with_grad=False gives).
"""
import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flows.common import free_port
from clip_core.loss import ClipLoss, SigLipLoss, clip_loss, siglip_loss

N, D_IN, D, WORLD = 8, 6, 4, 2
CASES = [  # (name, local_loss, gather_with_grad)
    ("clip", False, True),
    ("clip", True, True),
    ("clip", False, False),
    ("clip", True, False),
    ("siglip", True, True),
]
TOL = dict(rtol=1e-5, atol=1e-5)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Cross-entropy via an explicit, stabilised log-softmax."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(labels)), labels].mean())


def _ref_clip(img, txt, scale) -> float:
    logits = scale * img @ txt.T
    labels = np.arange(len(img))
    return (_ref_ce(logits, labels) + _ref_ce(logits.T, labels)) / 2


def _ref_siglip(img, txt, scale, bias) -> float:
    logits = scale * img @ txt.T + bias
    labels = 2 * np.eye(len(img)) - 1
    # -logsigmoid(z) = log(1 + e^-z)
    return float(np.logaddexp(0, -labels * logits).sum() / len(img))


def test_clip_loss_matches_reference():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.normal(size=(16, 32))), _unit(rng.normal(size=(16, 32)))
    scale = torch.tensor(14.3, dtype=torch.float64)
    got = clip_loss(torch.from_numpy(img), torch.from_numpy(txt), scale)
    assert got.item() == pytest.approx(_ref_clip(img, txt, 14.3), rel=1e-10)


def test_clip_loss_is_log_n_when_all_logits_are_equal():
    feats = F.normalize(torch.ones(10, 4), dim=-1)
    log_n = pytest.approx(math.log(10), rel=1e-6)
    assert clip_loss(feats, feats, torch.tensor(100.0)).item() == log_n
    rand = F.normalize(torch.randn(10, 4), dim=-1)
    assert clip_loss(rand, rand.flip(0), torch.tensor(0.0)).item() == log_n


def test_clip_loss_is_near_zero_for_aligned_separated_features():
    feats = torch.eye(8, 16)  # orthonormal: diagonal logits 100, the rest 0
    assert clip_loss(feats, feats, torch.tensor(100.0)).item() < 1e-6


def test_siglip_loss_matches_reference_and_known_value():
    rng = np.random.default_rng(1)
    img, txt = _unit(rng.normal(size=(12, 8))), _unit(rng.normal(size=(12, 8)))
    t_img, t_txt = torch.from_numpy(img), torch.from_numpy(txt)
    got = siglip_loss(t_img, t_txt, torch.tensor(10.0), torch.tensor(-10.0))
    assert got.item() == pytest.approx(_ref_siglip(img, txt, 10.0, -10.0), rel=1e-10)
    zero = siglip_loss(t_img, t_txt, torch.tensor(0.0), torch.tensor(0.0))
    assert zero.item() == pytest.approx(12 * math.log(2), rel=1e-10)  # N^2 terms of log 2 / N


def test_single_process_modules_equal_the_functions():
    img, txt = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    scale, bias = torch.tensor(20.0), torch.tensor(-3.0)
    for local_loss in (False, True):
        got = ClipLoss(local_loss=local_loss)(img, txt, scale)
        assert torch.equal(got, clip_loss(img, txt, scale))
    assert torch.equal(SigLipLoss()(img, txt, scale, bias), siglip_loss(img, txt, scale, bias))


def _fake_gather(img_all: torch.Tensor, txt_all: torch.Tensor):
    """A stand-in for the all-gather on one process: returns whichever full batch x is from."""
    def gather(x):
        return img_all if any(torch.equal(x, r) for r in img_all.split(len(x))) else txt_all
    return gather


@pytest.mark.parametrize("gather_with_grad", [True, False])
def test_local_loss_scores_own_rows_against_all_columns(gather_with_grad):
    rng, world, n, scale = np.random.default_rng(2), 3, 4, 7.0
    img, txt = _unit(rng.normal(size=(world * n, 8))), _unit(rng.normal(size=(world * n, 8)))
    t_img, t_txt = torch.from_numpy(img), torch.from_numpy(txt)
    losses = []
    for rank in range(world):
        rows, labels = slice(rank * n, (rank + 1) * n), np.arange(n) + rank * n
        image_ce = _ref_ce(scale * img[rows] @ txt.T, labels)
        want = (image_ce + _ref_ce(scale * txt[rows] @ img.T, labels)) / 2
        fn = ClipLoss(True, gather_with_grad, rank, world, gather=_fake_gather(t_img, t_txt))
        losses.append(fn(t_img[rows], t_txt[rows], scale).item())
        assert losses[-1] == pytest.approx(want, rel=1e-10)
    assert np.mean(losses) == pytest.approx(_ref_clip(img, txt, scale), rel=1e-10)


def _problem(seed: int = 0) -> dict:
    """Inputs and the parameters of two linear projections, a temperature and a bias."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x_img": torch.randn(N, D_IN, generator=g),
        "x_txt": torch.randn(N, D_IN, generator=g),
        "w_img": torch.randn(D, D_IN, generator=g),
        "w_txt": torch.randn(D, D_IN, generator=g),
        "log_scale": torch.tensor(math.log(10.0)),
        "bias": torch.tensor(-2.0),
    }


def _loss_and_grads(name: str, loss_fn, x_img, x_txt, params: dict) -> dict:
    """Forward through the projections and the loss; gradients of inputs and parameters."""
    leaves = {k: v.clone().requires_grad_() for k, v in params.items() if not k.startswith("x_")}
    leaves |= {"x_img": x_img.clone().requires_grad_(), "x_txt": x_txt.clone().requires_grad_()}
    img = F.normalize(leaves["x_img"] @ leaves["w_img"].T, dim=-1)  # (n, D)
    txt = F.normalize(leaves["x_txt"] @ leaves["w_txt"].T, dim=-1)
    scale = leaves["log_scale"].exp()
    extra = [leaves["bias"]] if name == "siglip" else []
    loss = loss_fn(img, txt, scale, *extra)
    loss.backward()
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
    return {"loss": loss.detach(), **grads}


def _single(name: str) -> dict:
    p = _problem()
    loss_fn = siglip_loss if name == "siglip" else clip_loss
    return _loss_and_grads(name, loss_fn, p["x_img"], p["x_txt"], p)


def _rank_main(rank: int, port: int, ifname, out: list) -> None:
    """One gloo rank: every case on this rank's half of the batch."""
    import os

    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    p, n = _problem(), N // WORLD
    rows = slice(rank * n, (rank + 1) * n)
    results = {}
    for name, local_loss, gwg in CASES:
        if name == "siglip":
            loss_fn = SigLipLoss(rank=rank, world_size=WORLD)
        else:
            loss_fn = ClipLoss(local_loss, gwg, rank=rank, world_size=WORLD)
        x_img, x_txt = p["x_img"][rows], p["x_txt"][rows]
        results[(name, local_loss, gwg)] = _loss_and_grads(name, loss_fn, x_img, x_txt, p)
    dist.destroy_process_group()
    torch.save(results, out[rank])


def _loopback_name():
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """Per-case list of the two ranks' losses and gradients."""
    out = [str(tmp_path_factory.mktemp("ranks") / f"rank{r}.pt") for r in range(WORLD)]
    mp.spawn(_rank_main, args=(free_port(), _loopback_name(), out), nprocs=WORLD, join=True)
    per_rank = [torch.load(path) for path in out]
    return {case: [per_rank[r][case] for r in range(WORLD)] for case in CASES}


def _ddp_mean(results: list, key: str) -> torch.Tensor:
    return sum(r[key] for r in results) / WORLD


def _rank_rows(results: list, key: str) -> torch.Tensor:
    return torch.cat([r[key] for r in results])


PARAMS = ["w_img", "w_txt", "log_scale"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c[2]], ids=str)
def test_distributed_with_gather_grad_equals_one_process(ranks, case):
    name, local_loss, _ = case
    single, results = _single(name), ranks[case]
    if local_loss:  # each rank's mean over its own rows; the whole batch's mean is their mean
        torch.testing.assert_close(_ddp_mean(results, "loss"), single["loss"], **TOL)
    else:  # every rank computes the full N x N loss
        for r in results:
            torch.testing.assert_close(r["loss"], single["loss"], **TOL)
    for key in ("x_img", "x_txt"):  # the gather's backward sums all W ranks' contributions
        torch.testing.assert_close(_rank_rows(results, key) / WORLD, single[key], **TOL)
    for key in PARAMS + (["bias"] if name == "siglip" else []):
        torch.testing.assert_close(_ddp_mean(results, key), single[key], **TOL)


@pytest.mark.slow
def test_full_matrix_without_gather_grad_scales_encoder_grads_by_one_over_w(ranks):
    single, results = _single("clip"), ranks[("clip", False, False)]
    for r in results:
        torch.testing.assert_close(r["loss"], single["loss"], **TOL)
    for key in ("x_img", "x_txt"):
        torch.testing.assert_close(_rank_rows(results, key), single[key], **TOL)
    for key in ("w_img", "w_txt"):
        torch.testing.assert_close(_ddp_mean(results, key), single[key] / WORLD, **TOL)
    torch.testing.assert_close(_ddp_mean(results, "log_scale"), single["log_scale"], **TOL)


def _own_block_grads(rank: int) -> dict:
    """Gradient of rank `rank`'s n x N block alone, other ranks' features held constant."""
    p, n = _problem(), N // WORLD
    x_img, x_txt = p["x_img"].clone().requires_grad_(), p["x_txt"].clone().requires_grad_()
    own = torch.zeros(N, 1, dtype=torch.bool)
    own[rank * n : (rank + 1) * n] = True
    img = F.normalize(x_img @ p["w_img"].T, dim=-1)
    txt = F.normalize(x_txt @ p["w_txt"].T, dim=-1)
    img, txt = torch.where(own, img, img.detach()), torch.where(own, txt, txt.detach())
    scale, rows = math.exp(p["log_scale"].item()), slice(rank * n, (rank + 1) * n)
    labels = torch.arange(n) + rank * n
    image_loss = F.cross_entropy(scale * img[rows] @ txt.T, labels)
    text_loss = F.cross_entropy(scale * txt[rows] @ img.T, labels)
    loss = (image_loss + text_loss) / 2
    loss.backward()
    return {"loss": loss.detach(), "x_img": x_img.grad[rows], "x_txt": x_txt.grad[rows]}


@pytest.mark.slow
def test_local_loss_without_gather_grad_sees_only_its_own_block(ranks):
    single, results = _single("clip"), ranks[("clip", True, False)]
    torch.testing.assert_close(_ddp_mean(results, "loss"), single["loss"], **TOL)
    for rank, r in enumerate(results):
        want = _own_block_grads(rank)
        torch.testing.assert_close(r["loss"], want["loss"], **TOL)
        torch.testing.assert_close(r["x_img"], want["x_img"], **TOL)
        torch.testing.assert_close(r["x_txt"], want["x_txt"], **TOL)
    assert not torch.allclose(_rank_rows(results, "x_img") / WORLD, single["x_img"], **TOL)
