"""`make prefect-up`, `prefect deployment run build-corpus/default`, `make prefect-down`, for real."""
import json
import os
import re
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest
from conftest import find_browser

from flows.common import free_port

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _artifacts(port: int, key: str) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/artifacts/filter", method="POST",
                                     data=json.dumps({"artifacts": {"key": {"any_": [key]}}}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_build_corpus_deployment_runs_to_completed(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_PORT": str(port), "PREFECT_STATE": str(tmp_path / "state"),
           "CLIP_PIPELINE_DEMO_DIR": str(tmp_path / "demo"), "PY": sys.executable}
    up = subprocess.run(["bash", "scripts/prefect_up.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=400)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api" in up.stdout
        run_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                   "PREFECT_HOME": str(tmp_path / "state" / "home")}
        params = json.dumps({"cfg": {"storage": str(tmp_path / "demo"), "web_pairs": 300, "eval_size": 10}})
        run = subprocess.run([PREFECT, "deployment", "run", "build-corpus/default", "--params", params,
                              "--watch", "--watch-timeout", "500"],
                             cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=560)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
        for marker in ("curated/curation_stats.json", "shards/crawl_stats.json", "dedup/dedup_stats.json",
                       "shards/data_card.html"):
            assert (tmp_path / "demo" / marker).is_file(), marker
        card = _artifacts(port, "data-card")  # the data card as a Prefect artifact: its pictures inside it
        images = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", card[0]["data"])
        assert len(card) == 1 and images and all(i.startswith("data:image/") for i in images)
        # and drawn by Prefect's own UI, in a real browser: every picture from the artifact itself
        browser = find_browser()
        if browser is None:
            warnings.warn("no Chromium: the data-card artifact was not looked at in Prefect's UI (`make browser`)")
        else:
            page = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                                   f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000",
                                   "--dump-dom", f"http://127.0.0.1:{port}/artifacts/artifact/{card[0]['id']}"],
                                  capture_output=True, text=True, timeout=180).stdout
            assert len(re.findall(r'<img[^>]+src="data:image/', page)) == len(images) and "downloaded" in page
    finally:
        down = subprocess.run(["bash", "scripts/prefect_down.sh"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
    assert "stopped serve" in down.stdout and "stopped server" in down.stdout
    assert not (tmp_path / "state" / "server.pid").exists()


def test_one_setting_sends_the_deployments_to_a_cluster():
    """`python -m flows.deployments --ray-address ADDR`: build-corpus, train and clip-pipeline run there."""
    from flows.deployments import deployments

    by_flow = {d.flow_name: d.parameters for d in deployments(ray_address="auto")}
    assert by_flow["build-corpus"]["cfg"]["ray_address"] == "auto"
    assert by_flow["train"]["ray_address"] == "auto" and by_flow["clip-pipeline"]["ray_address"] == "auto"
    assert by_flow["compare"]["ray_address"] == "auto"
    local = {d.flow_name: d.parameters for d in deployments()}
    assert local["build-corpus"]["cfg"]["ray_address"] is None and local["clip-pipeline"]["ray_address"] is None
