"""The live MLflow run of a training stage keeps its step metrics and writes them in batches."""

from __future__ import annotations

import pytest

from tasks.core import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty sqlite MLflow store in a folder of its own; its client."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return MlflowClient(tracking_uri=tracking.DEFAULT_TRACKING_URI)


def steps_of(client, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_steps_wait_for_the_interval_then_all_arrive_in_order(store, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "STEP_FLUSH_INTERVAL_S", 3600.0)
    with tracking.stage_run("syntax", "stagewise", tmp_path / "ckpt", system_metrics=False) as run:
        for step in (1, 5, 10):
            run.log_step({"step": step, "loss": 1.0 / step, "grad_norm": 0.5})
        assert steps_of(store, run.run_id) == []  # kept, not yet written
        run.finish({"train_loss": 0.4}, _adapter_file(tmp_path))
        assert steps_of(store, run.run_id) == [(1, 1.0), (5, 0.2), (10, 0.1)]
    assert store.get_run(run.run_id).data.metrics["final_train_loss"] == 0.4


def test_a_step_past_the_interval_writes_what_was_kept(store, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "STEP_FLUSH_INTERVAL_S", 0.0)
    with tracking.stage_run("syntax", "stagewise", tmp_path / "ckpt", system_metrics=False) as run:
        run.log_step({"step": 1, "loss": 2.0})
        assert steps_of(store, run.run_id) == [(1, 2.0)]
        assert run.pending == []


def test_a_failed_stage_keeps_the_steps_it_logged(store, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "STEP_FLUSH_INTERVAL_S", 3600.0)
    with pytest.raises(RuntimeError, match="out of memory"):
        with tracking.stage_run("thinking", "stagewise", tmp_path / "ckpt", system_metrics=False) as run:
            run.log_step({"step": 7, "loss": 3.0})
            raise RuntimeError("out of memory")
    assert steps_of(store, run.run_id) == [(7, 3.0)]
    assert store.get_run(run.run_id).info.status == "FAILED"


def test_more_values_than_one_batch_holds_are_split(store, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "STEP_FLUSH_INTERVAL_S", 3600.0)
    monkeypatch.setattr(tracking, "MAX_METRICS_PER_BATCH", 4)
    with tracking.stage_run("syntax", "stagewise", tmp_path / "ckpt", system_metrics=False) as run:
        for step in range(1, 6):  # 10 values: batches of 4, 4 and 2
            run.log_step({"step": step, "loss": float(step), "lr": 0.1})
        sizes, log_batch = [], run.client.log_batch
        monkeypatch.setattr(run.client, "log_batch",
                            lambda run_id, metrics: sizes.append(len(metrics)) or log_batch(run_id, metrics=metrics))
        run.flush()
        assert sizes == [4, 4, 2]
        assert [s for s, _ in steps_of(store, run.run_id)] == [1, 2, 3, 4, 5]
        assert len(store.get_metric_history(run.run_id, "lr")) == 5


def test_a_store_that_fails_costs_the_steps_not_the_stage(store, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "STEP_FLUSH_INTERVAL_S", 3600.0)
    with tracking.stage_run("syntax", "stagewise", tmp_path / "ckpt", system_metrics=False) as run:
        run.log_step({"step": 3, "loss": 1.0})
        monkeypatch.setattr(run.client, "log_batch", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("store down")))
        run.flush()
    assert "not logged (1 values up to step 3): store down" in caplog.text
    assert run.pending == []


def _adapter_file(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(b"adapter")
    return path
