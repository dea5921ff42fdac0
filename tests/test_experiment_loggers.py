"""TensorBoard and MLflow logging, read back for real: event files with TensorBoard's own reader, and
MLflow runs with MlflowClient on local stores (SQLite, and the opt-in file store) in a temporary folder."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.config import TrackingConfig
from imgcls.errors import ImgclsError
from imgcls.tracking import ExperimentLoggers, append_metrics, flatten_params, scalar_tag

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

# SQLAlchemy warns about MLflow's own use of a deprecated loader; nothing imgcls can change
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PARAMS = {"seed": 42, "model": {"name": "resnet18", "pretrained": False},
          "train": {"epochs": 2, "batch_size": 32}, "data": {"mean": [0.5, 0.5, 0.5], "cache": None}}


def metrics_row(epoch: int, offset: float = 0.0) -> dict:
    """A metrics.csv row as _fit writes it; the values differ per epoch (and per `offset`)."""
    return {"epoch": epoch, "train_loss": 2.0 / epoch + offset, "train_acc1": 0.3 * epoch, "val_loss": 1.5 / epoch,
            "val_acc1": 0.25 * epoch, "val_acc5": 0.9, "val_balanced_acc": 0.2 * epoch, "val_macro_f1": 0.1 * epoch,
            "val_ema_acc1": 0.26 * epoch, "lr": 0.01 / epoch, "epoch_seconds": 3.5, "train_images_per_s": 250.0,
            "data_wait": 0.05, "train_gflops_per_s": 12.0}


@pytest.fixture(autouse=True)
def offline_mlflow(tmp_path, monkeypatch):
    """No telemetry, no tracking URI from the person running the tests, and a temporary working directory
    (MLflow puts the artifacts of a new experiment in ./mlruns of the working directory)."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its tables takes seconds, each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def imgcls_log(caplog, monkeypatch):
    """caplog for the imgcls logger, which does not propagate to the root logger after setup_logging."""
    monkeypatch.setattr(logging.getLogger("imgcls"), "propagate", True)
    caplog.set_level(logging.INFO, logger="imgcls")
    return caplog


def make_run_dir(root: Path) -> Path:
    """A run folder with the files a finished training leaves."""
    run_dir = root / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 42\n")
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished"}))
    (run_dir / "log.txt").write_text("epoch 1/2 ...\n")
    for epoch in (1, 2):
        append_metrics(run_dir / "metrics.csv", metrics_row(epoch))
    pixels = np.zeros((24, 32, 3), dtype=np.uint8)
    pixels[:, :16, 0] = 255  # left half red, so the image read back can be checked
    Image.fromarray(pixels).save(run_dir / "confusion_test.png")
    torch.save({"optimizer": torch.zeros(10)}, run_dir / "checkpoints" / "last.ckpt")
    from safetensors.torch import save_file

    save_file({"weight": torch.arange(6.0)}, str(run_dir / "checkpoints" / "model.safetensors"))
    return run_dir


def read_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {metric.step: metric.value for metric in client.get_metric_history(run_id, key)}


def artifact_paths(client, run_id: str, folder: str | None = None) -> set[str]:
    paths = set()
    for entry in client.list_artifacts(run_id, folder):
        paths |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return paths


# ----------------------------------------------------------------------------------------------------
# names


def test_scalar_tags_group_splits_of_one_quantity():
    assert [scalar_tag(k) for k in ("train_loss", "val_loss", "val_ema_acc1", "test_acc1", "lr",
                                    "train_images_per_s", "custom")] == [
        "loss/train", "loss/val", "acc1/val_ema", "acc1/test", "lr", "throughput/images_per_s", "custom"]


def test_params_are_flattened_to_dotted_keys():
    assert flatten_params(PARAMS) == {"seed": "42", "model.name": "resnet18", "model.pretrained": "False",
                                      "train.epochs": "2", "train.batch_size": "32",
                                      "data.mean": "[0.5, 0.5, 0.5]", "data.cache": "None"}


# ----------------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_scalars_and_image_read_back(tmp_path):
    run_dir = make_run_dir(tmp_path)
    with ExperimentLoggers(TrackingConfig(tensorboard=True, mlflow=False), run_dir, PARAMS, "run") as loggers:
        for epoch in (1, 2):
            loggers.log_epoch(epoch, metrics_row(epoch))
        loggers.log_image("confusion/test", run_dir / "confusion_test.png", step=2)
        loggers.log_final({"test_acc1": 0.75, "test_loss": 0.6}, step=2)
    events = read_events(run_dir)
    scalars = events.Tags()["scalars"]
    for tag in ("loss/train", "loss/val", "acc1/train", "acc1/val", "acc1/val_ema", "lr",
                "throughput/images_per_s", "time/epoch_seconds", "acc1/test"):
        assert tag in scalars
    assert "epoch" not in scalars
    loss = [(event.step, event.value) for event in events.Scalars("loss/train")]
    assert loss == [(1, pytest.approx(2.0)), (2, pytest.approx(1.0))]
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(1, pytest.approx(0.01)), (2, pytest.approx(0.005))]
    assert [(e.step, e.value) for e in events.Scalars("acc1/test")] == [(2, pytest.approx(0.75))]
    [image] = events.Images("confusion/test")
    assert (image.step, image.width, image.height) == (2, 32, 24)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert decoded[0, 0].tolist() == [255, 0, 0] and decoded[0, -1].tolist() == [0, 0, 0]


def test_tensorboard_after_resume_has_each_epoch_once(tmp_path):
    run_dir = make_run_dir(tmp_path)
    config = TrackingConfig(tensorboard=True, mlflow=False)
    with ExperimentLoggers(config, run_dir, PARAMS, "run") as first:
        for epoch in (1, 2, 3):  # epoch 3 is logged, then the run is killed before its checkpoint
            first.log_epoch(epoch, metrics_row(epoch, offset=10.0))
    time.sleep(1.1)  # a new event file name (it holds the time in seconds)
    with ExperimentLoggers(config, run_dir, PARAMS, "run", resume_epoch=2) as resumed:
        for epoch in (3, 4):
            resumed.log_epoch(epoch, metrics_row(epoch))
    loss = [(event.step, event.value) for event in read_events(run_dir).Scalars("loss/train")]
    assert [step for step, _ in loss] == [1, 2, 3, 4]
    assert loss[2][1] == pytest.approx(2.0 / 3)  # the resumed run's epoch 3, not the killed run's


def test_missing_tensorboard_is_one_info_line(tmp_path, monkeypatch, imgcls_log):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now raises ImportError
    with ExperimentLoggers(TrackingConfig(tensorboard=True), tmp_path, PARAMS, "run") as loggers:
        loggers.log_epoch(1, metrics_row(1))
    assert [r.levelno for r in imgcls_log.records if "pip install tensorboard" in r.getMessage()] == [logging.INFO]
    assert not (tmp_path / "tensorboard").exists()


# ----------------------------------------------------------------------------------------------------
# MLflow


def test_mlflow_params_metrics_artifacts_and_status(tmp_path, sqlite_uri):
    from mlflow import MlflowClient

    run_dir = make_run_dir(tmp_path)
    config = TrackingConfig(tensorboard=True, mlflow=True, mlflow_uri=sqlite_uri, mlflow_experiment="complete")
    started = time.perf_counter()
    with ExperimentLoggers(config, run_dir, PARAMS, "shapes-resnet18") as loggers:
        for epoch in (1, 2):
            loggers.log_epoch(epoch, {**metrics_row(epoch), "weights": "ema"})  # text is skipped, not an error
        loggers.log_image("confusion/test", run_dir / "confusion_test.png", step=2)
        loggers.log_final({"test_acc1": 0.75}, step=2)
        loggers.finish("FINISHED", run_dir / "checkpoints" / "model.safetensors")
    print(f"MLflow start to finish: {time.perf_counter() - started:.2f}s")
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    assert run_id == loggers.mlflow_run_id

    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "shapes-resnet18"
    assert client.get_experiment(run.info.experiment_id).name == "complete"
    assert run.data.params == flatten_params(PARAMS)
    assert run.data.tags["imgcls.run_dir"] == str(run_dir.resolve())
    assert history(client, run_id, "val_acc1") == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}
    assert history(client, run_id, "lr") == {1: pytest.approx(0.01), 2: pytest.approx(0.005)}
    assert history(client, run_id, "test_acc1") == {2: pytest.approx(0.75)}
    assert "weights" not in run.data.metrics and "epoch" not in run.data.metrics

    artifacts = artifact_paths(client, run_id)
    assert {"config.yaml", "metrics.csv", "summary.json", "log.txt", "confusion_test.png", "tracking.json",
            "model/model.safetensors"} <= artifacts
    assert not any(path.endswith(".ckpt") or path.startswith(("checkpoints", "tensorboard")) for path in artifacts)
    downloaded = client.download_artifacts(run_id, "model/model.safetensors", str(tmp_path / "download"))
    assert Path(downloaded).read_bytes() == (run_dir / "checkpoints" / "model.safetensors").read_bytes()


def test_an_exception_ends_the_mlflow_run_as_failed(tmp_path, sqlite_uri):
    from mlflow import MlflowClient

    run_dir = make_run_dir(tmp_path)
    config = TrackingConfig(tensorboard=False, mlflow=True, mlflow_uri=sqlite_uri, mlflow_experiment="failing")
    with pytest.raises(RuntimeError, match="out of memory"):
        with ExperimentLoggers(config, run_dir, PARAMS, "run") as loggers:
            loggers.log_epoch(1, metrics_row(1))
            raise RuntimeError("CUDA out of memory")
    client = MlflowClient(sqlite_uri)
    assert client.get_run(loggers.mlflow_run_id).info.status == "FAILED"
    assert "log.txt" in artifact_paths(client, loggers.mlflow_run_id)  # what went wrong travels along
    assert not (run_dir / "tensorboard").exists()


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt, "KILLED"), ("pruned", "KILLED")])
def test_an_interrupted_or_pruned_run_ends_as_killed(tmp_path, sqlite_uri, stop, status):
    """Ctrl-C, and training's RunStopped (a tune trial pruned), end the MLflow run as KILLED, not FAILED."""
    from mlflow import MlflowClient

    from imgcls.training import RunStopped

    error = RunStopped(stop) if isinstance(stop, str) else stop()
    run_dir = make_run_dir(tmp_path)
    config = TrackingConfig(tensorboard=False, mlflow=True, mlflow_uri=sqlite_uri, mlflow_experiment=f"stopped-{status}")
    with pytest.raises(type(error)):
        with ExperimentLoggers(config, run_dir, PARAMS, "run") as loggers:
            raise error
    assert MlflowClient(sqlite_uri).get_run(loggers.mlflow_run_id).info.status == status


def test_resume_continues_the_same_mlflow_run(tmp_path, sqlite_uri):
    from mlflow import MlflowClient

    run_dir = make_run_dir(tmp_path)
    config = TrackingConfig(tensorboard=False, mlflow=True, mlflow_uri=sqlite_uri, mlflow_experiment="resumed")
    first = ExperimentLoggers(config, run_dir, PARAMS, "run")
    for epoch in (1, 2):
        first.log_epoch(epoch, metrics_row(epoch))
    first.finish("KILLED")
    client = MlflowClient(sqlite_uri)
    assert client.get_run(first.mlflow_run_id).info.status == "KILLED"

    longer = {**PARAMS, "train": {**PARAMS["train"], "epochs": 4}}  # imgcls train --resume RUN train.epochs=4
    with ExperimentLoggers(config, run_dir, longer, "run", resume_epoch=2) as resumed:
        assert client.get_run(first.mlflow_run_id).info.status == "RUNNING"
        for epoch in (3, 4):
            resumed.log_epoch(epoch, metrics_row(epoch))
    assert resumed.mlflow_run_id == first.mlflow_run_id
    [run] = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert run.info.run_id == first.mlflow_run_id and run.info.status == "FINISHED"
    assert sorted(history(client, run.info.run_id, "train_loss")) == [1, 2, 3, 4]
    assert run.data.params["train.epochs"] == "2"  # MLflow parameters are immutable: the change is a tag
    assert run.data.tags["resumed.train.epochs"] == "4"


def test_default_store_is_the_one_mlflow_ui_shows(tmp_path):
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _get_default_tracking_uri

    work = Path.cwd()  # the temporary working directory from the autouse fixture
    run_dir = make_run_dir(tmp_path)
    with ExperimentLoggers(TrackingConfig(tensorboard=False, mlflow=True), run_dir, PARAMS, "run") as loggers:
        loggers.log_epoch(1, metrics_row(1))
        loggers.finish("FINISHED", run_dir / "checkpoints" / "model.safetensors")
    assert (work / "mlflow.db").exists()
    assert any((work / "mlruns").rglob("model.safetensors"))  # artifacts next to it, not in the run folder
    # `mlflow ui` (= `mlflow server`) without --backend-store-uri opens exactly this store
    ui_store = _get_default_tracking_uri()
    assert ui_store == "sqlite:///mlflow.db"
    experiment = MlflowClient(ui_store).get_experiment_by_name("imgcls")
    [run] = MlflowClient(ui_store).search_runs([experiment.experiment_id])
    assert run.info.run_id == loggers.mlflow_run_id and run.info.status == "FINISHED"
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow_uri"] == f"sqlite:///{work / 'mlflow.db'}"


def test_file_store_works_when_mlflow_allows_it(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    config = TrackingConfig(tensorboard=False, mlflow=True, mlflow_uri=store)
    with pytest.raises(ImgclsError, match="tracking.mlflow_uri.*MLFLOW_ALLOW_FILE_STORE"):
        ExperimentLoggers(config, make_run_dir(tmp_path), PARAMS, "run")  # MLflow 3 refuses it by default
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "second"
    run_dir.mkdir()
    with ExperimentLoggers(config, run_dir, PARAMS, "run") as loggers:
        loggers.log_epoch(1, metrics_row(1))
    assert history(MlflowClient(store), loggers.mlflow_run_id, "val_acc1") == {1: pytest.approx(0.25)}


def closed_port() -> int:
    """A local port that nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "nosuch://store", "http://127.0.0.1:notaport"])
def test_bad_tracking_uri_is_one_clear_error(tmp_path, uri):
    uri = uri.format(port=closed_port())
    started = time.perf_counter()
    with pytest.raises(ImgclsError) as raised:
        ExperimentLoggers(TrackingConfig(mlflow=True, mlflow_uri=uri), tmp_path, PARAMS, "run")
    message = str(raised.value)
    assert f"tracking.mlflow_uri={uri}" in message and "\n" not in message
    assert time.perf_counter() - started < 15  # not MLflow's minutes of connection retries
    assert not (tmp_path / "tracking.json").exists()


def test_a_logging_failure_warns_once_and_training_goes_on(tmp_path, sqlite_uri, imgcls_log):
    from mlflow import MlflowClient

    run_dir = make_run_dir(tmp_path)
    config = TrackingConfig(tensorboard=True, mlflow=True, mlflow_uri=sqlite_uri, mlflow_experiment="broken")
    with ExperimentLoggers(config, run_dir, PARAMS, "run") as loggers:
        loggers.log_epoch(1, metrics_row(1))
        for epoch in (2, 3):  # MLflow rejects the metric name 'bad name!' for real; nothing reaches here
            loggers.log_epoch(epoch, {**metrics_row(epoch), "bad name!": 1.0})
    warnings = [r.getMessage() for r in imgcls_log.records if r.name == "imgcls" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MLflow logging failed" in warnings[0]
    client = MlflowClient(sqlite_uri)
    run = client.get_run(loggers.mlflow_run_id)
    assert sorted(history(client, run.info.run_id, "train_loss")) == [1]  # off after the failure
    assert run.info.status == "FINISHED" and "bad name!" in run.data.tags["imgcls.logging_error"]
    assert [event.step for event in read_events(run_dir).Scalars("loss/train")] == [1, 2, 3]  # unaffected


# ----------------------------------------------------------------------------------------------------
# through `imgcls train`


def test_a_real_training_run_logs_to_tensorboard_and_mlflow(tmp_path, sqlite_uri, shapes_folder):
    import mlflow

    from imgcls.cli import main

    runs = tmp_path / "runs"
    assert main(["train", str(shapes_folder), "model.name=small_resnet", "data.image_size=32", "train.epochs=2",
                 "train.batch_size=16", "seed=0", f"run.dir={runs}", "run.name=tracked", "tracking.mlflow=true",
                 f"tracking.mlflow_uri={sqlite_uri}", "tracking.mlflow_experiment=imgcls-e2e"]) == 0
    run_dir = runs / "tracked"
    events = read_events(run_dir)
    assert [event.step for event in events.Scalars("acc1/val")] == [1, 2]
    assert "confusion/test" in events.Tags()["images"]
    client = mlflow.tracking.MlflowClient(sqlite_uri)
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    assert sorted(history(client, run_id, "val_acc1")) == [1, 2]
    assert "test_acc1" in run.data.metrics
    assert {"metrics.csv", "config.yaml", "model/model.safetensors"} <= artifact_paths(client, run_id)
