"""torch.distributed on loopback for a local run: nothing a training opens listens beyond 127.0.0.1.

Ray's torch backend rendezvouses through env:// (a TCPStore on rank 0); `LoopbackTorchConfig`
swaps it for a file store and pins gloo/NCCL to the loopback interface when every Ray node is
this machine (`local_cluster`). It subclasses Ray 2.60's private `_TorchBackend`: check it on
a Ray upgrade (tests/test_train_ray.py lists the listening sockets of a real run).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import socket
import tempfile
from pathlib import Path

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend


def _loopback_interface() -> str:
    """The loopback network interface's name: "lo" on Linux, "lo0" on macOS."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


def _use_loopback() -> None:
    """On a worker: gloo and NCCL open their sockets on the loopback interface only."""
    lo = _loopback_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = lo
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # for any library that reads it; the store below is a file


class _LoopbackTorchBackend(_TorchBackend):
    """Ray's torch backend with a file rendezvous instead of its env:// TCPStore.

    torch's TCPStore server, which Ray's env:// rendezvous starts on rank 0, listens on every
    interface whatever MASTER_ADDR says (the address only tells clients where to connect),
    and has no authentication. On one machine a FileStore does the same job with no socket.
    """

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        self.folder = tempfile.mkdtemp(prefix="clip-rendezvous-")  # fresh per start: a restart never reuses it
        store = Path(self.folder, "store").as_uri()
        worker_group.execute(_use_loopback)
        worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=n, init_method=store,
                                                   timeout_s=backend_config.timeout_s) for i in range(n)])

    def on_shutdown(self, worker_group, backend_config: TorchConfig) -> None:
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)


@dataclasses.dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig for a cluster whose every node is this machine: nothing listens beyond 127.0.0.1."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def local_cluster() -> bool:
    """Whether every node of the connected Ray cluster is on a loopback address (one machine)."""
    addresses = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
    try:
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:  # a host name, not an address: not provably this machine
        return False
