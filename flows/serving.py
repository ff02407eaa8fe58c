"""The trained model as an MLflow pyfunc: texts or images in, normalised CLIP embeddings out.

`save_pyfunc(model_dir, dest)` wraps an exported model folder (model.safetensors +
config.json) with a signature: a DataFrame with a `text` column (strings) or an `image` column
(encoded image bytes; base64 in a JSON request, as MLflow's binary columns are), one of the two
per row; the output is a (rows, embed_dim) float32 array of unit vectors, each row in the space
of its input's tower. `mlflow models serve -m models:/clip-PRESET/N --env-manager local` then
answers /invocations with embeddings. The training run registers this folder (`flows/train.py`).
"""
from __future__ import annotations

import io
from pathlib import Path

import mlflow.pyfunc
import numpy as np

PYFUNC_ARTIFACT = "pyfunc"  # the run's artifact folder that the registered version points at


class ClipEmbeddings(mlflow.pyfunc.PythonModel):
    """CLIP's two towers behind one predict: text rows through the text tower, image rows through the image one."""

    def load_context(self, context) -> None:
        from clip_core.weights import load_checkpoint

        self.model = load_checkpoint(context.artifacts["clip"]).eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import pandas as pd
        from PIL import Image

        from clip_core.eval.features import encode_images, encode_texts

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        texts = _column(frame, "text")
        images = _column(frame, "image")
        both = [i for i in range(len(frame)) if texts[i] is not None and images[i] is not None]
        empty = [i for i in range(len(frame)) if texts[i] is None and images[i] is None]
        if both or empty:
            raise ValueError(f"each row needs exactly one of `text` or `image`; rows {(both + empty)[:5]} have "
                             f"{'both' if both else 'neither'}")
        out = np.zeros((len(frame), self.model.config.embed_dim), np.float32)
        rows = [i for i, t in enumerate(texts) if t is not None]
        if rows:
            out[rows] = encode_texts(self.model, [str(texts[i]) for i in rows]).numpy()
        rows = [i for i, b in enumerate(images) if b is not None]
        if rows:
            decoded = [Image.open(io.BytesIO(_bytes(images[i]))).convert("RGB") for i in rows]
            out[rows] = encode_images(self.model, decoded).numpy()
        return out


def _column(frame, name: str) -> list:
    if name not in frame.columns:
        return [None] * len(frame)
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in frame[name].tolist()]


def _bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"`image` must hold encoded image bytes, got {type(value).__name__}")


def signature(embed_dim: int):
    """text (string) or image (binary) in, (rows, embed_dim) float32 out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    inputs = Schema([ColSpec(DataType.string, "text", required=False),
                     ColSpec(DataType.binary, "image", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]))


def save_pyfunc(model_dir: str | Path, dest: str | Path) -> Path:
    """An MLflow pyfunc model folder at `dest` around the exported model in `model_dir`."""
    from clip_core.weights import read_config

    config = read_config(Path(model_dir) / "config.json")
    mlflow.pyfunc.save_model(
        str(dest), python_model=ClipEmbeddings(), artifacts={"clip": str(model_dir)},
        signature=signature(config.embed_dim),
        pip_requirements=["torch", "numpy", "pandas", "pillow", "safetensors", "clip-pipeline"])
    return Path(dest)
