"""The registered model as an MLflow pyfunc (issue 20 item 4): text or image bytes in, the
normalised embeddings clip_core computes out; `mlflow models serve` answers on 127.0.0.1."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from conftest import wait_until_answering
import torch
from PIL import Image

from clip_core.eval.features import encode_images, encode_texts
from clip_core.model import create_model
from clip_core.weights import save_checkpoint
from flows.common import free_port
from flows.serving import save_pyfunc

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("serving")
    model = create_model("tiny").eval()
    save_checkpoint(model, base / "model")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    blobs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        blobs.append(buf.getvalue())
    return {"model": model, "pyfunc": save_pyfunc(base / "model", base / "pyfunc"), "blobs": blobs, "images": images}


def test_pyfunc_gives_clip_core_embeddings_for_text_and_image_rows(exported):
    loaded = mlflow.pyfunc.load_model(str(exported["pyfunc"]))
    texts = ["a photo of a red circle.", "two blue squares"]
    got = loaded.predict(pd.DataFrame({"text": texts}))
    want = encode_texts(exported["model"], texts).numpy()
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    mixed = loaded.predict(pd.DataFrame({"text": [texts[0], None], "image": [None, exported["blobs"][1]]}))
    assert np.allclose(mixed[0], want[0], atol=1e-5)
    assert np.allclose(mixed[1], encode_images(exported["model"], [exported["images"][1].convert("RGB")])[0].numpy(),
                       atol=1e-5)
    with pytest.raises(Exception, match="exactly one of"):
        loaded.predict(pd.DataFrame({"text": [texts[0]], "image": [exported["blobs"][0]]}))
    signature = loaded.metadata.signature
    assert [c.name for c in signature.inputs.inputs] == ["text", "image"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_embeddings(exported):
    port = free_port()
    # the scoring server runs `uvicorn` from PATH: the virtualenv's bin first, as an activated venv has it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([MLFLOW, "models", "serve", "-m", str(exported["pyfunc"]), "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/ping", server)
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(b).decode()] for b in exported["blobs"]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.asarray(json.loads(response.read())["predictions"], np.float32)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    want = encode_images(exported["model"], [im.convert("RGB") for im in exported["images"]]).numpy()
    assert served.shape == want.shape and np.allclose(served, want, atol=1e-4)
