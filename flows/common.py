"""Helpers shared by the flows: stage markers, URIs, loopback ports, Prefect artifacts.

A stage is done when its marker file (the stats JSON it writes last) exists, so a re-run
of a flow skips finished stages and redoes only what is missing.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket

import fsspec

from clip_core.errors import BAD_INPUT_ERRORS, InputError


def join(uri: str, *parts: str) -> str:
    """posixpath.join for URIs (local paths and s3://)."""
    return posixpath.join(uri.rstrip("/"), *parts)


def exists(uri: str) -> bool:
    """Whether a file or folder exists at the fsspec URI."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def read_json(uri: str) -> dict:
    """A JSON file at the fsspec URI."""
    with fsspec.open(uri, "r") as f:
        return json.load(f)


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect retry condition: retry I/O failures, never bad input (a retry cannot fix it)."""
    return not isinstance(state.data, BAD_INPUT_ERRORS)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on a loopback host right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_ray_address(where: str, address: str) -> None:
    """A Ray address is "auto", HOST:PORT or ray://HOST:PORT, and a HOST:PORT answers (before any work)."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    fix = 'give "auto" (the cluster this machine belongs to), HOST:PORT or ray://HOST:PORT; null runs locally'
    if address.split("://", 1)[0] not in ("ray", address) or not host or not port.isdigit():
        raise InputError(where, f"{address!r} is not a Ray address", fix)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise InputError(where, f"nothing answers at {address} ({e})", "start the cluster, or fix the address") from e


# Ray's switch for single-machine clusters: read when `ray` is imported, by every Ray process
SINGLE_MACHINE_RAY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_ray():
    """Inside: a Ray cluster started here listens and talks on 127.0.0.1 only.

    Ray swaps 127.0.0.1 for the host's outward address (so other nodes could join); a local
    cluster has no other node, and its GCS, raylet and agents should not be reachable from the
    network. Ray's single-machine mode keeps them on loopback. The raylet and the processes it
    starts inherit the variable; this process gets its old setting back afterwards, so a later
    ray.init(address=...) to a real cluster advertises a reachable address again.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_MACHINE_RAY), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_RAY], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_RAY, None)
        else:
            os.environ[SINGLE_MACHINE_RAY] = saved_env


def table_artifact(key: str, rows: list[dict], description: str) -> None:
    """A Prefect table artifact; outside a flow run it does nothing."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        create_table_artifact(key=key, table=rows, description=description)


def markdown_artifact(key: str, markdown: str, description: str) -> None:
    """A Prefect Markdown artifact; outside a flow run it does nothing."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        create_markdown_artifact(key=key, markdown=markdown, description=description)
