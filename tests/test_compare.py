"""`clip-pipeline compare`'s checks at the door and the compare view's address (the runs: test_demo.py)."""
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from clip_core.errors import InputError
from flows.compare import compare_url, parse_vary, summary_table

CLI = str(Path(sys.executable).parent / "clip-pipeline")


def test_vary_parses_one_setting_and_its_typed_values():
    assert parse_vary("batch_size=64,256") == ("batch_size", [64, 256])
    assert parse_vary("lr = 1e-3, 2e-3,4e-3") == ("lr", [1e-3, 2e-3, 4e-3])
    assert parse_vary("context-length=16,32") == ("context_length", [16, 32])
    assert parse_vary("preset=tiny,tiny-rn") == ("preset", ["tiny", "tiny-rn"])


@pytest.mark.parametrize("text, message", [("momentum=1,2", "cannot vary 'momentum'"),
                                           ("batch_size=64", "fewer than two"),
                                           ("batch_size=64,64", "fewer than two"),
                                           ("batch_size=64,big", "takes int values"),
                                           ("batch_size", "fewer than two")])
def test_a_bad_vary_is_bad_input(text, message):
    with pytest.raises(InputError, match=message):
        parse_vary(text)


def test_the_command_refuses_a_bad_vary_before_any_work(tmp_path):
    out = subprocess.run([CLI, "compare", "--storage", str(tmp_path / "runs"), "--vary", "momentum=1,2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot vary 'momentum'" in out.stderr
    assert not (tmp_path / "runs").exists()  # no corpus built, no MLflow store made


def test_the_compare_address_names_the_runs_in_the_model_training_view():
    url = compare_url("http://127.0.0.1:5000/", "3", ["a1", "b2"])
    base, query = url.split("/#/compare-runs?")
    fields = urllib.parse.parse_qs(query)
    assert base == "http://127.0.0.1:5000" and json.loads(fields["runs"][0]) == ["a1", "b2"]
    assert json.loads(fields["experiments"][0]) == ["3"] and fields["workflowType"] == ["machine_learning"]


def test_the_table_shows_accuracy_or_recall_per_eval_set():
    result = {"variants": [{"variant": "batch_size=64", "final_loss": 2.5,
                            "metrics": {"shapes": {"acc1": 0.2}, "retrieval": {"image_retrieval_recall@1": 0.25}}},
                           {"variant": "batch_size=256", "final_loss": None, "metrics": {"shapes": {"acc1": 0.26}}}]}
    lines = summary_table(result).splitlines()
    assert lines[0].split() == ["variant", "final", "loss", "retrieval", "shapes"]
    assert lines[1].split() == ["batch_size=64", "2.500", "R@1", "25.0%", "20.0%"]
    assert lines[2].split() == ["batch_size=256", "-", "-", "26.0%"]
