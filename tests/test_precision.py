"""`--precision auto`: bf16 on native-bf16 devices (CUDA with bf16, CPUs with AMX/AVX512-BF16), fp32 elsewhere."""
import pytest
import torch
from torch import nn

import clip_core.train.precision as precision_mod
from clip_core.train import TrainConfig
from clip_core.train.config import PRECISIONS
from clip_core.train.loop import Trainer
from clip_core.train.precision import precision_note, read_cpu_flags, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_the_default_and_a_choice():
    assert TrainConfig().precision == "auto" and "auto" in PRECISIONS


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve_precision("auto", CUDA) == expected
    assert resolve_precision("auto", "cuda:0") == expected


@pytest.mark.parametrize("flags, expected", [
    ({"fpu", "avx2", "amx_bf16", "amx_tile"}, "bf16"),
    ({"fpu", "avx512f", "avx512_bf16"}, "bf16"),
    ({"fpu", "avx2", "avx512f", "avx512bw"}, "fp32"),  # AVX-512 without its bf16 extension
    (set(), "fp32"),
])
def test_auto_on_cpu_follows_the_flags(flags, expected):
    assert resolve_precision("auto", CPU, cpu_flags=flags) == expected


@pytest.mark.parametrize("given", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("device", [CPU, CUDA])
def test_explicit_choices_are_kept(given, device):
    assert resolve_precision(given, device, cpu_flags=set()) == given
    assert resolve_precision(given, device, cpu_flags={"amx_bf16"}) == given


def test_cpu_flags_come_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert read_cpu_flags(str(info)) == {"fpu", "sse2", "avx512_bf16"}
    assert read_cpu_flags(str(tmp_path / "missing")) == set()


def test_the_note_says_what_and_why():
    assert precision_note("auto", "fp32", CPU) == "precision auto -> fp32 (cpu without AMX/AVX512-BF16)"
    assert precision_note("auto", "bf16", CUDA) == "precision auto -> bf16 (cuda with bf16)"
    assert precision_note("fp16", "fp16", CUDA) == "precision fp16 (as given)"


def _trainer(monkeypatch, flags: set[str]) -> Trainer:
    monkeypatch.setattr(precision_mod, "read_cpu_flags", lambda: flags)
    model = nn.Linear(4, 3)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda out: out.float().pow(2).mean(),
                   precision="auto", device="cpu")


def test_auto_trainer_on_a_cpu_without_native_bf16_runs_fp32(monkeypatch):
    trainer = _trainer(monkeypatch, {"fpu", "avx2"})
    assert (trainer.requested_precision, trainer.precision, trainer.scaler) == ("auto", "fp32", None)
    with trainer.autocast():
        out = trainer.model(torch.ones(2, 4))
    assert out.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    metrics = trainer.train_step((torch.ones(2, 4),))
    assert trainer.model.weight.dtype == torch.float32 and metrics["loss"] > 0


def test_auto_trainer_on_a_bf16_cpu_autocasts(monkeypatch):
    trainer = _trainer(monkeypatch, {"amx_bf16"})
    assert trainer.precision == "bf16" and trainer.scaler is None
    with trainer.autocast():
        assert trainer.model(torch.ones(2, 4)).dtype == torch.bfloat16
