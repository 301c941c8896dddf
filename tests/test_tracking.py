"""``adaptune train --report-to``: each tracker writes its local files under the output folder
(TensorBoard event files, a W&B offline run, an MLflow file store), the environment is given back
as it was; ``--push-to-hub`` uploads after saving and gives one line when it cannot."""

from __future__ import annotations

import json
import os

import pytest

from adaptune.cli import main
from adaptune.errors import ConfigError, EnvironmentProblem
from adaptune.training.job import TrainJob
from adaptune.training.tracking import check_trackers, parse_report_to, tracking_env
from tests.tiny import write_words_file

TRACKER_VARS = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE")


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return write_words_file(tmp_path_factory.mktemp("words") / "words.txt", 120)


def _train(model_dir, words, out, *extra) -> int:
    return main(["train", "--model", str(model_dir), "--data", str(words), "--output", str(out), "--max-steps", "4",
                 "--save-every", "4", "--max-length", "32", "--batch-size", "4", "--eval-every", "2",
                 "--logging-steps", "1", *extra])


@pytest.fixture
def clean_env(monkeypatch):
    for name in TRACKER_VARS:
        monkeypatch.delenv(name, raising=False)


def test_tensorboard_event_files_hold_the_loss(model_dir, words, tmp_path, clean_env):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    assert _train(model_dir, words, out, "--report-to", "tensorboard") == 0
    (events,) = out.glob("runs/*/events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert {"train/loss", "eval/loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    # adaptune's own records are still written
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()


def test_wandb_writes_an_offline_run_under_the_output(model_dir, words, tmp_path, clean_env):
    pytest.importorskip("wandb")
    out = tmp_path / "out"
    assert _train(model_dir, words, out, "--report-to", "wandb", "--run-name", "king-run") == 0
    (run,) = out.glob("wandb/offline-run-*")
    (log,) = run.glob("run-*.wandb")
    content = log.read_bytes()
    assert b"train/loss" in content and b"king-run" in content
    assert all(name not in os.environ for name in TRACKER_VARS)  # given back after the run


def test_mlflow_file_store_run_with_metrics_and_name(model_dir, words, tmp_path, clean_env):
    mlflow = pytest.importorskip("mlflow")
    before = mlflow.get_tracking_uri()
    out = tmp_path / "out"
    assert _train(model_dir, words, out, "--report-to", "mlflow", "--run-name", "king-run") == 0
    (run,) = [p for p in out.glob("mlruns/*/*") if (p / "metrics").is_dir()]
    loss = (run / "metrics" / "loss").read_text().split("\n")
    assert len([line for line in loss if line.strip()]) >= 1
    assert (run / "metrics" / "eval_loss").is_file()
    assert (run / "tags" / "mlflow.runName").read_text() == "king-run"
    assert all(name not in os.environ for name in TRACKER_VARS)
    assert mlflow.get_tracking_uri() == before  # the process-wide URI is given back too


def test_variables_the_user_set_win_and_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    with tracking_env(["wandb"], tmp_path / "out") as set_here:
        assert os.environ["WANDB_MODE"] == "disabled" and os.environ["WANDB_DIR"] == str((tmp_path / "out").resolve())
        assert "WANDB_MODE" not in set_here
    assert os.environ["WANDB_MODE"] == "disabled" and "WANDB_DIR" not in os.environ


def test_report_to_values_and_missing_packages(monkeypatch):
    assert parse_report_to("none") == [] and parse_report_to("TensorBoard, mlflow") == ["tensorboard", "mlflow"]
    assert TrainJob(report_to="wandb,tensorboard").report_to == "wandb,tensorboard"
    with pytest.raises(ConfigError, match="--report-to takes tensorboard, wandb, mlflow or none"):
        TrainJob(report_to="comet")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(EnvironmentProblem, match=r"pip install 'adaptune\[tracking\]'"):
        check_trackers(["tensorboard", "wandb"])


# ---- push to hub ----------------------------------------------------------------------------------


def test_push_to_hub_offline_is_one_line_and_the_adapter_is_saved(model_dir, words, tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    out = tmp_path / "out"
    code = _train(model_dir, words, out, "--push-to-hub", "someone/king-adapter")
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("adaptune:")]
    assert code == 2 and len(err) == 1 and "Traceback" not in captured.err
    assert "HF_HUB_OFFLINE" in err[0] and "someone/king-adapter" in err[0]
    assert "will be saved but not pushed" in captured.out
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_push_uploads_the_adapter_folder_without_checkpoints(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from adaptune.training import push

    calls = {}

    class FakeApi:
        def create_repo(self, repo, exist_ok):
            calls["create"] = (repo, exist_ok)
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, **kw):
            calls["upload"] = kw

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    said = []
    assert push.push_adapter(tmp_path, "me/adapter", said.append) == "https://huggingface.co/me/adapter"
    assert calls["create"] == ("me/adapter", True) and calls["upload"]["folder_path"] == str(tmp_path)
    ignored = set(calls["upload"]["ignore_patterns"])
    assert {"checkpoint-*", "checkpoint-*/**", "runs/**", "wandb/**", "mlruns/**"} <= ignored
    assert said == [f"pushed {tmp_path} to https://huggingface.co/me/adapter"]

    class Refusing(FakeApi):
        def upload_folder(self, **kw):
            raise PermissionError("401 Unauthorized\nmore text")

    monkeypatch.setattr(huggingface_hub, "HfApi", Refusing)
    with pytest.raises(EnvironmentProblem, match=r"failed \(PermissionError: 401 Unauthorized\); the adapter is"):
        push.push_adapter(tmp_path, "me/adapter", said.append)
