"""`make train-cluster` with RAY_ADDRESS: the training goes to a real Ray head as a Ray Job.

The head is started with `ray start --head --block` in its own process group, so the test
can stop exactly this cluster (`ray stop` would kill every Ray process on the machine).
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flows.common import SINGLE_MACHINE_RAY, free_port
from test_train_data import make_shards

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_for_job_agent(address: str, head: subprocess.Popen, timeout: float = 180) -> None:
    """Until a trivial job runs: the dashboard answers before the node's job agent is ready."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.time() + timeout
    while True:
        try:
            client = JobSubmissionClient(address)
            job = client.submit_job(entrypoint="true")
            while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                time.sleep(0.5)
            return
        except (ConnectionError, RuntimeError) as e:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head's job server is not ready (exit {head.poll()}): {e}") from e
            time.sleep(1)


@pytest.fixture
def ray_head():
    """A Ray head with its dashboard (the job server) on 127.0.0.1; yields the job address."""
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled", SINGLE_MACHINE_RAY: "0"}
    env.pop("RAY_ADDRESS", None)  # single-machine mode: the head advertises 127.0.0.1, not the host's address
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--num-cpus=3", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}",
         f"--temp-dir={tempfile.mkdtemp(prefix='rayhead', dir='/tmp')}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_job_agent(address, head)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(10)  # a graceful stop takes about 30 s on 2 cores; the test is over, so kill after 10
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@pytest.mark.slow
def test_make_train_cluster_submits_a_ray_job(tmp_path, ray_head):
    corpus, _ = make_shards(tmp_path / "corpus", 2, 16)
    out = tmp_path / "out"
    args = ("--preset tiny --image-size 32 --steps 4 --batch-size 8 --workers 2 --cpus-per-worker 0.5 "
            "--precision fp32 --data-workers 0 --checkpoint-every 2 --log-every 1")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": ray_head, "RAY_AUTH_MODE": "disabled",
           SINGLE_MACHINE_RAY: "0"}
    done = subprocess.run(["make", "-s", "train-cluster", f"PY={sys.executable}", f"CORPUS={corpus}", f"OUT={out}",
                           f"TRAIN_ARGS={args}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert f"submitting to the Ray cluster at {ray_head}" in log and "succeeded" in log, log[-4000:]
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_loopback_ray_sets_single_machine_mode_and_restores_it(monkeypatch):
    from ray._private import ray_constants

    from flows.common import loopback_ray

    monkeypatch.setenv(SINGLE_MACHINE_RAY, "1")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    with loopback_ray():
        assert os.environ[SINGLE_MACHINE_RAY] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
        from ray._private.services import get_node_ip_address
        assert get_node_ip_address() == "127.0.0.1"  # what a cluster started here advertises
    assert os.environ[SINGLE_MACHINE_RAY] == "1" and ray_constants.ENABLE_RAY_CLUSTER is True
