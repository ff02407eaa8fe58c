"""flows.tracking.Tracker and flows.lineage: model-training experiments, datasets as run inputs (issue 20)."""
import functools
import json

import numpy as np
from mlflow import MlflowClient
from test_near_dup import _eval_set

from dedup.augment import procedural_image
from flows.lineage import eval_dataset, files_digest
from flows.tracking import KIND_TAG, Tracker


def test_new_and_old_experiments_open_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, output=str(tmp_path))
    run_id = tracker.start("fresh", "run", {"a": 1}, {})
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).tags[KIND_TAG] == "custom_model_development"
    old = client.create_experiment("made-by-hand", artifact_location=(tmp_path / "art").as_uri())
    Tracker(uri, output=str(tmp_path)).start("made-by-hand", "run", {}, {})
    assert client.get_experiment(old).tags[KIND_TAG] == "custom_model_development"
    other = client.create_experiment("chosen", artifact_location=(tmp_path / "art2").as_uri(),
                                     tags={KIND_TAG: "genai_development"})
    Tracker(uri, output=str(tmp_path)).start("chosen", "run", {}, {})
    assert client.get_experiment(other).tags[KIND_TAG] == "genai_development"  # a kind someone chose stays


def test_a_dataset_input_names_its_source_digest_rows_and_schema(tmp_path):
    rng = np.random.default_rng(0)
    root = _eval_set(tmp_path / "shapes", [procedural_image(rng, 96) for _ in range(5)])
    ds = eval_dataset(root)
    entity = ds._to_mlflow_entity()
    assert entity.name == "eval/shapes" and json.loads(entity.profile) == {"num_rows": 5}
    assert json.loads(entity.source)["uri"] == (tmp_path / "shapes").as_uri()
    assert [c["name"] for c in json.loads(entity.schema)["mlflow_colspec"]] == ["image", "label"]
    before = files_digest(root)
    assert entity.digest == before[0][:12] and before[1] == 1
    with open(tmp_path / "shapes" / "test" / "000000.tar", "ab") as f:  # the data changed: a new digest
        f.write(b"\0" * 512)
    assert files_digest(root)[0] != before[0]


def test_a_run_logs_its_dataset_inputs(tmp_path):
    root = _eval_set(tmp_path / "ev", [procedural_image(np.random.default_rng(1), 96) for _ in range(3)])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, output=str(tmp_path))
    run_id = tracker.start("lineage", "run", {}, {})
    tracker.log_inputs([(functools.partial(eval_dataset, root), "evaluation")])
    (logged,) = MlflowClient(tracking_uri=uri).get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == "eval/ev" and {t.key: t.value for t in logged.tags} == {
        "mlflow.data.context": "evaluation"}
