"""`clip-pipeline` commands call the library and print what it returns."""
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from clip_core.tokenizer import tokenize


def test_models_lists_every_preset_with_parameter_counts(capsys):
    assert main(["models", "--params", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16",
            "ViT-L-14", "ViT-L-14-336", "tiny", "tiny-rn"} <= set(rows)
    assert rows["ViT-B-32"]["params_M"] == 151.28  # 151,277,313 parameters, as OpenAI's
    assert rows["RN50"]["embed_dim"] == 1024 and rows["RN50"]["vision"] == "ModifiedResNet"


def test_tokenize_prints_openai_ids(capsys):
    assert main(["tokenize", "a photo of a dog.", "--context-length", "12", "--pad"]) == 0
    printed = [list(map(int, line.split())) for line in capsys.readouterr().out.splitlines()]
    assert printed == tokenize(["a photo of a dog."], context_length=12).tolist()


def test_too_long_text_is_a_clear_error_not_a_traceback(capsys):
    assert main(["tokenize", "word " * 100]) == 2
    err = capsys.readouterr().err
    assert "context_length=77" in err and "Traceback" not in err


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "models" in out and "tokenize" in out


def test_web_generate_then_serve_on_loopback(tmp_path):
    import socket
    import urllib.request

    from synthweb.server import serve_web

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "web"
    assert main(["web", "generate", str(out), "--pairs", "200", "--eval-size", "4",
                 "--base-url", f"http://127.0.0.1:{port}"]) == 0
    import pyarrow.parquet as pq

    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    assert len(pairs) == 200 and all(p["url"].startswith(f"http://127.0.0.1:{port}/") for p in pairs)
    assert (out / "eval" / "shapes" / "classnames.txt").exists()
    with serve_web(str(out), port=port) as server:
        with urllib.request.urlopen(f"{server.url}/robots.txt", timeout=5) as response:
            assert response.status == 200


def _console(*args, cwd) -> subprocess.CompletedProcess:
    code = "from flows.cli import console_main; console_main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.slow
def test_failed_commands_exit_with_their_code_never_an_abort(tmp_path):
    # Once a Parquet file was opened (Arrow's thread pool alive), about one failed exit in seven
    # used to end in SIGABRT from native teardown: exit 134 instead of the command's code.
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg"] * 8, "caption": list(range(8))}),
                   tmp_path / "pairs.parquet")
    pq.write_table(pa.table({"query": ["dog"], "kind": ["unigram"]}), tmp_path / "queries.parquet")
    codes = []
    for _ in range(12):
        run = _console("curate", "pairs.parquet", "queries.parquet", "curated", cwd=tmp_path)
        assert "terminate called" not in run.stderr
        codes.append(run.returncode)
    assert codes == [2] * 12  # an int caption column is bad input
    assert "caption" in run.stderr and "Traceback" not in run.stderr

