"""Tracking against a real `mlflow server` on loopback, as a team's shared server would be used."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import small_config
from recsys_hnm.experiment import evaluate_run, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_training_tracks_to_a_real_mlflow_server(synthetic_files, tmp_path, mlflow_server):
    config = small_config(synthetic_files, tmp_path, train={"epochs": 1}, tracking={"uri": mlflow_server, "experiment": "server"})
    result = train(config)
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "test.ndcg_at_10" in run.data.metrics
    assert {"config.yaml", "model.pt", "metrics.png"} <= {a.path for a in client.list_artifacts(result.run_id)}
    assert (tmp_path / "artifacts").exists()  # artifacts went through the server
    assert evaluate_run(result.run_id, mlflow_server)["ndcg@10"] == pytest.approx(result.test["ndcg@10"], abs=1e-6)


def test_pipeline_with_two_workers_against_a_real_server(synthetic_files, tmp_path, mlflow_server):
    import yaml

    from recsys_hnm.studies.compare import ComparisonSpec
    from recsys_hnm.studies.pipeline import run_pipeline

    base = small_config(synthetic_files, tmp_path, train={"epochs": 1}).to_dict()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = tmp_path / "pipe.yaml"
    spec.write_text(yaml.safe_dump({"name": "pipe", "base": str(tmp_path / "base.yaml"), "seeds": [0, 1],
                                    "variants": {"a": [], "b": ["train.lr=0.01"]}}))
    summary = run_pipeline(ComparisonSpec.load(spec), mlflow_server, workers=2)
    assert sorted(summary["ran"]) == ["a/s0", "a/s1", "b/s0", "b/s1"] and summary["failed"] == []
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("pipe").experiment_id])
    children = [r for r in runs if r.data.tags.get("role") != "parent"]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
