"""Training's guards: bounded data streams, counted truncation, checks at the door, closed MLflow runs."""
import argparse
import json
import os
import signal
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_core.data.webdataset import DamagedShardError
from clip_core.errors import InputError
from clip_core.train import TrainConfig, build_training
from clip_core.train.checkpoint import save_train_state
from clip_core.train.data import DataConfig, ShardLoader, check_corpus, iter_samples, load_excluded_keys
from flows.commands.train import add_train_arguments, run_train_command
from test_train_data import make_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def _loader(folder, **kw):
    cfg = dict(corpus=str(folder), batch_size=4, image_size=32, shuffle_buffer=1, num_workers=0)
    return ShardLoader(DataConfig(**{**cfg, **kw}))


def _take(loader, n_samples: int) -> list[str]:
    """Keys of the next n_samples samples (batch size 1)."""
    it, keys = iter(loader), []
    for _ in range(n_samples):
        next(it)
        keys += loader.last_keys
    return keys


def _whole_samples(shard) -> int:
    """How many samples a damaged shard yields before its damage."""
    n = 0
    try:
        for _ in iter_samples(str(shard)):
            n += 1
    except DamagedShardError:
        pass
    return n


# ----- the stream makes progress or stops (issue 14, item 2) -----

@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_whose_every_sample_is_excluded_stops_naming_the_file(tmp_path, workers):
    folder, keys = make_shards(tmp_path / "c", 2, 6)
    loader = _loader(folder, exclude=frozenset(keys), exclude_source="/x/kept.txt", num_workers=workers,
                     shuffle_buffer=4)
    error = InputError if workers == 0 else Exception  # a DataLoader worker's error comes back re-typed
    with pytest.raises(error, match=r"/x/kept.txt: excluded every sample.*12 excluded"):
        next(iter(loader))


@pytest.mark.timeout(120)
def test_a_stream_of_unusable_samples_stops_after_a_pass(tmp_path):
    folder, keys = make_shards(tmp_path / "c", 2, 4)
    half = frozenset(keys[:4])  # shard 0 excluded, shard 1 rewritten without images or captions: nothing usable
    with tarfile.open(folder / "00001.tar", "w") as tar:
        for key in keys[4:]:
            tar.addfile(tarfile.TarInfo(f"{key}.json"))
    with pytest.raises(InputError, match=r"excluded every sample.*4 excluded, 4 unusable"):
        next(iter(_loader(folder, exclude=half, exclude_source="m.parquet")))


def test_a_partly_excluded_corpus_trains_on_the_rest(tmp_path):
    folder, keys = make_shards(tmp_path / "c", 2, 6)
    got = _take(_loader(folder, exclude=frozenset(keys[:6]), batch_size=1, shuffle_buffer=3), 12)
    assert sorted(got) == sorted(keys[6:] * 2)  # two epochs of the second shard


# ----- the exclusion is checked at the door -----

def test_kept_keys_parquet_is_refused_as_an_exclusion(tmp_path):
    folder, keys = make_shards(tmp_path / "c", 1, 4)
    pq.write_table(pa.table({"key": keys, "shard": ["00000.tar"] * 4}), tmp_path / "kept_keys.parquet")
    with pytest.raises(InputError, match=r"kept_keys.parquet: is dedup's list of the samples to KEEP.*matches.parquet"):
        load_excluded_keys(str(tmp_path / "kept_keys.parquet"))
    os.rename(tmp_path / "kept_keys.parquet", tmp_path / "renamed.parquet")
    with pytest.raises(InputError, match=r"renamed.parquet: has the columns of dedup's kept_keys.parquet"):
        load_excluded_keys(str(tmp_path / "renamed.parquet"))
    with pytest.raises(InputError, match=r"nothere.parquet: --exclude file does not exist"):
        load_excluded_keys(str(tmp_path / "nothere.parquet"))


def test_an_exclusion_of_every_image_is_refused_before_training(tmp_path):
    folder, keys = make_shards(tmp_path / "c", 3, 4)
    with pytest.raises(InputError, match=r"keys.txt: excludes every one of the 12 images in the first 3 of 3 shards"):
        check_corpus(str(folder), exclude=frozenset(keys), exclude_source="keys.txt")
    assert len(check_corpus(str(folder), exclude=frozenset(keys[:-1]))) == 3  # one image left is enough


# ----- a truncated shard's loss is counted (issue 14, item 6) -----

def _truncate(shard, keep_bytes: int) -> None:
    shard.write_bytes(shard.read_bytes()[:keep_bytes])


def test_a_truncated_shards_lost_samples_are_counted_as_skipped(tmp_path):
    folder, keys = make_shards(tmp_path / "c", 1, 8)
    shard = folder / "00000.tar"
    pq.write_table(pa.table({"key": keys + ["000000099"], "status": ["success"] * 8 + ["failed_to_download"]}),
                   folder / "00000.parquet")  # img2dataset's listing beside the shard
    _truncate(shard, shard.stat().st_size // 2)
    whole = _whole_samples(shard)
    assert 0 < whole < 8
    loader = _loader(folder, batch_size=1)
    with pytest.warns(UserWarning, match=f"{8 - whole} samples of it lost"):
        _take(loader, whole + 1)  # one epoch and the first sample of the next
    stats = loader.stats()
    assert stats.skip_reasons["truncated"] == 8 - whole and stats.skipped == 8 - whole
    assert stats.good == whole + 1


def test_a_shard_cut_at_a_member_boundary_is_truncated_too(tmp_path):
    folder, keys = make_shards(tmp_path / "c", 1, 4)
    shard = folder / "00000.tar"
    with tarfile.open(shard) as tar:
        third = [m.offset for m in tar.getmembers()][6]  # the first member of the third sample
    _truncate(shard, third)
    with pytest.raises(DamagedShardError, match="shard is truncated after 1 complete samples"):
        list(iter_samples(str(shard)))
    loader = _loader(folder, batch_size=1)
    with pytest.warns(UserWarning, match="1 samples of it lost"):
        got = _take(loader, 2)  # one epoch and the first sample of the next
    # no listing beside it: the loss counted is the sample being read when the tar ended
    assert got == keys[:1] * 2 and loader.stats().skip_reasons["truncated"] == 1


# ----- every input is checked before Ray starts (issue 14, items 10 and 12) -----

@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if training gets as far as connecting to Ray."""
    import flows.train

    def refuse(run):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(flows.train, "connect_ray", refuse)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder, _ = make_shards(tmp_path_factory.mktemp("corpus"), 2, 8)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
    """A whole training checkpoint of the tiny preset at 32 px."""
    cfg = TrainConfig(corpus=corpus, preset="tiny", image_size=32, steps=1, batch_size=4, precision="fp32",
                      data_workers=0)
    trainer, _ = build_training(cfg)
    return save_train_state(tmp_path_factory.mktemp("ckpt") / "step_00000001", trainer)


def _train(tmp_path, capsys, corpus, *argv) -> tuple[int, str]:
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args([corpus, str(tmp_path / "out"), "--steps", "2", "--preset", "tiny", "--image-size", "32",
                              "--batch-size", "4", *argv])
    code = run_train_command(args)
    return code, capsys.readouterr().err


def test_a_missing_corpus_is_bad_input(tmp_path, capsys, no_ray):
    code, err = _train(tmp_path, capsys, str(tmp_path / "nocorpus"))
    assert code == 2 and "nocorpus: corpus does not exist" in err


def test_a_missing_resume_folder_is_bad_input(tmp_path, capsys, corpus, no_ray):
    code, err = _train(tmp_path, capsys, corpus, "--resume", str(tmp_path / "gone"))
    assert code == 2 and "--resume: " in err and "gone does not exist" in err and "--resume never" in err


def test_a_missing_exclude_file_is_bad_input(tmp_path, capsys, corpus, no_ray):
    code, err = _train(tmp_path, capsys, corpus, "--exclude", str(tmp_path / "matches.parquet"))
    assert code == 2 and "matches.parquet: --exclude file does not exist" in err


def test_an_exclusion_of_everything_is_bad_input(tmp_path, capsys, corpus, no_ray):
    keys = [k for url in check_corpus(corpus) for k, _ in iter_samples(url)]
    (tmp_path / "all.txt").write_text("\n".join(keys))
    code, err = _train(tmp_path, capsys, corpus, "--exclude", str(tmp_path / "all.txt"))
    assert code == 2 and "all.txt: excludes every one of the 16 images" in err


def test_a_truncated_checkpoint_is_bad_input(tmp_path, capsys, corpus, checkpoint, no_ray):
    damaged = tmp_path / "step_00000001"
    damaged.mkdir()
    for name in ("config.json", "model.safetensors", "train_state.pt"):
        data = (checkpoint / name).read_bytes()
        (damaged / name).write_bytes(data[: len(data) // 2] if name == "model.safetensors" else data)
    code, err = _train(tmp_path, capsys, corpus, "--resume", str(damaged))
    assert code == 2 and "model.safetensors: truncated or not a safetensors file" in err and "--resume never" in err


def test_a_checkpoint_of_another_preset_is_bad_input(tmp_path, capsys, corpus, checkpoint, no_ray):
    code, err = _train(tmp_path, capsys, corpus, "--resume", str(checkpoint), "--image-size", "64")
    assert code == 2 and "config.json: this checkpoint is of another model than --preset tiny --image-size 64" in err
    assert "vision_cfg.image_size: checkpoint 32 vs configured 64" in err and "--resume never" in err


def test_a_checkpoint_of_another_context_length_is_bad_input(tmp_path, capsys, corpus, checkpoint, no_ray):
    code, err = _train(tmp_path, capsys, corpus, "--resume", str(checkpoint), "--context-length", "16")
    assert code == 2 and "another model than --preset tiny --image-size 32 --context-length 16" in err
    assert "text_cfg.context_length: checkpoint 77 vs configured 16" in err


@pytest.mark.parametrize("flags, message", [(["--context-length", "0"], "context_length must be >= 1, got 0"),
                                            (["--preset", "tiny-rn", "--image-size", "48"],
                                             "a ResNet needs image_size divisible by 32, got 48")])
def test_a_model_the_options_cannot_make_is_bad_input(tmp_path, capsys, corpus, flags, message, no_ray):
    code, err = _train(tmp_path, capsys, corpus, *flags)
    assert code == 2 and message in err and "Traceback" not in err


def test_context_length_sets_the_models_text_context_and_the_loaders_tokens(corpus):
    """--context-length overrides the preset's context: the model's positions and the batches' token width."""
    cfg = TrainConfig(corpus=corpus, preset="tiny", image_size=32, context_length=16, steps=1, batch_size=4,
                      precision="fp32", data_workers=0)
    trainer, loader = build_training(cfg)
    assert trainer.model.config.text.context_length == 16
    assert trainer.model.positional_embedding.shape[0] == 16
    images, tokens = next(iter(loader))
    assert tokens.shape == (4, 16) and images.shape[-1] == 32
    assert TrainConfig(preset="tiny").model_overrides() == {}


def test_the_checkpoint_ray_would_resume_is_checked_too(tmp_path, capsys, corpus, checkpoint, no_ray):
    run = tmp_path / "out" / "ray" / "clip-train"
    run.mkdir(parents=True)
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "step_00000004", "metrics": {}}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    code, err = _train(tmp_path, capsys, corpus)
    assert code == 2 and "step_00000004: Ray's record of run 'clip-train' names this checkpoint" in err
    os.symlink(checkpoint, run / "step_00000004")
    code, err = _train(tmp_path, capsys, corpus, "--preset", "tiny-rn")
    assert code == 2 and "another model than --preset tiny-rn" in err
    with pytest.raises(AssertionError, match="Ray was started"):  # --resume never: Ray's record is not read
        _train(tmp_path, capsys, corpus, "--preset", "tiny-rn", "--resume", "never")


def test_out_that_is_a_file_is_bad_input(tmp_path, capsys, corpus, no_ray):
    (tmp_path / "out").write_text("a file")
    code, err = _train(tmp_path, capsys, corpus)
    assert code == 2 and "OUT is a file" in err


def test_the_pipelines_train_flow_passes_a_missing_exclude_file_on(tmp_path, corpus, no_ray):
    """Before: the flow dropped an --exclude file that did not exist and trained on every sample."""
    from flows.pipeline import train_model

    with pytest.raises(InputError, match=r"matches.parquet: --exclude file does not exist"):
        train_model.fn(corpus, str(tmp_path / "out"), steps=2, batch_size=4, workers=1,
                       exclude=str(tmp_path / "dedup" / "matches.parquet"))
    assert not (tmp_path / "out").exists()  # refused before OUT was made


def test_a_batch_that_does_not_split_over_the_workers_is_refused_by_train_too(tmp_path, corpus, no_ray):
    from flows.train import RunSettings, train

    with pytest.raises(InputError, match=r"--batch-size: batch_size 10 is not divisible by workers x accum_steps"):
        train(TrainConfig(corpus=corpus, steps=2, batch_size=10), RunSettings(output=str(tmp_path / "out"), workers=3))


# ----- the MLflow run and metrics.jsonl after a kill (issue 14, item 12) -----

class FakeTracker:
    def __init__(self):
        self.ended = []

    def end(self, status):
        self.ended.append(status)


def test_sigterm_in_the_driver_marks_the_run_killed(monkeypatch):
    from flows.train_run import closing as _closing

    tracker = FakeTracker()
    with pytest.raises(SystemExit) as exit_info:
        with _closing(tracker):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert exit_info.value.code == 128 + signal.SIGTERM and tracker.ended == ["KILLED"]
    with pytest.raises(KeyboardInterrupt):
        with _closing(tracker):
            raise KeyboardInterrupt
    with pytest.raises(ZeroDivisionError):
        with _closing(tracker):
            1 / 0
    assert tracker.ended == ["KILLED", "KILLED", "FAILED"]


def test_the_sigterm_handler_is_restored(monkeypatch):
    from flows.train_run import closing as _closing

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with _closing(FakeTracker()):
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_a_resumed_run_ends_the_run_its_killed_predecessor_left_running(tmp_path, corpus):
    from mlflow import MlflowClient

    from flows.tracking import Tracker
    from flows.train import RunSettings, _checked, _prepare_output
    from flows.train_run import open_run as _open_run

    cfg = TrainConfig(corpus=corpus, steps=2)
    run, urls = _checked(cfg, RunSettings(output=str(tmp_path / "out")))
    _prepare_output(run)
    killed_tracker, killed = _open_run(cfg, run, urls)  # a driver that then died by SIGKILL: its run stays RUNNING
    other = Tracker(killed_tracker.uri).start("clip", "clip-train", {}, {"output": "/another/out"})
    with pytest.warns(UserWarning, match="left RUNNING by a killed training; marked KILLED"):
        tracker, run_id = _open_run(cfg, run, urls)
    client = MlflowClient(tracker.uri)
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"  # another output's run is not ours to end
    assert client.get_run(run_id).data.tags["continues_runs"] == killed


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    from flows.tracking import MetricsCallback, Tracker

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)) + '{"step": 9, "lo')
    callback = MetricsCallback(Tracker(None), log, log_every=1, world_size=1)

    class Resumed:
        step = 5

    callback.on_train_start(Resumed())
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_auto_resume_without_rays_record_takes_the_newest_whole_checkpoint(tmp_path):
    """A driver killed right after a checkpoint, before Ray recorded it: --resume auto still continues."""
    from clip_core.model import create_model
    from clip_core.weights import write_checkpoint
    from flows.train import RunSettings, _auto_resume

    run_dir = tmp_path / "ray" / "clip-train"
    model = create_model("tiny")
    for step in (2, 4):
        write_checkpoint(model, run_dir / f"step_{step:08d}", {"step": step})
    (run_dir / "step_00000006").mkdir()  # one being written when the kill came: not whole
    run = RunSettings(output=str(tmp_path), storage_path=str(tmp_path / "ray"), name="clip-train")
    assert _auto_resume(run).resume == str(run_dir / "step_00000004")
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's record: Ray decides
    assert _auto_resume(run).resume == "auto"
    assert _auto_resume(RunSettings(output=str(tmp_path), storage_path=str(tmp_path / "ray"), name="clip-train",
                                    resume="never")).resume == "never"
