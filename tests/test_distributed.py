"""Two processes under torchrun (gloo on CPU): the embedding tables sharded by TorchRec's
DistributedModelParallel, one MLflow run, an unsharded final model, and a resume."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
import yaml

from recsys_hnm.experiment import recommend, train
from recsys_hnm.sampling import Context, InBatchSampler, MixtureSampler
from recsys_hnm.training import load_checkpoint

from conftest import small_config

# rowwise Adagrad: fbgemm's CPU kernels have no fused Adam; both runs use the same optimizer
SETTINGS = {"train": {"epochs": 3, "embedding_optimizer": "rowwise_adagrad", "embedding_lr": 0.05}}


def _torchrun(config, tmp_path, *args):
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    out = subprocess.run([sys.executable, "-m", "recsys_hnm.cli", "train", "--config", str(path), "--nproc", "2", *args],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "is_fx_tracing" not in out.stderr  # torch's notice to torchrec, muted at the CLI
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("run_id=") and sum(line.startswith("run_id=") for line in lines) == 1  # rank 0 reports
    return lines[-1].split("=", 1)[1], json.loads(lines[-2])


def _runs(config):
    client = mlflow.MlflowClient(config.tracking.uri)
    return client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])


def _plan(config, run_id, tmp_path):
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="sharding_plan.json", dst_path=str(tmp_path),
                                               tracking_uri=config.tracking.uri)
    return json.loads(open(path).read())


def _history(config, run_id):
    client = mlflow.MlflowClient(config.tracking.uri)
    return [m.value for m in sorted(client.get_metric_history(run_id, "valid.ndcg_at_10"), key=lambda m: m.step)]


def test_two_processes_row_wise_match_one_process(synthetic_files, tmp_path):
    single = train(small_config(synthetic_files, tmp_path / "single", **SETTINGS))
    config = small_config(synthetic_files, tmp_path, distributed={"sharding": "row_wise"}, **SETTINGS)
    run_id, summary = _torchrun(config, tmp_path)

    runs = _runs(config)
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    plan = _plan(config, run_id, tmp_path)
    assert plan["world_size"] == 2
    assert all(kind == "row_wise" and ranks == [0, 1] for kind, ranks in plan["tables"].values()), plan

    # each rank holds half of each table's rows, and the same replicated dense layers (DDP kept them in sync)
    ckpt = tmp_path / "ckpt" / "test" / run_id
    ranks = [load_checkpoint(ckpt / "last.pt")["trainer"]["model"], load_checkpoint(ckpt / "last.rank1.pt")["trainer"]["model"]]
    items = [r["ebc.embedding_bags.item_table.weight"] for r in ranks]
    whole = load_checkpoint(tmp_path / "single" / "ckpt" / "test" / single.run_id / "last.pt")["trainer"]["model"]
    n_items = whole["ebc.embedding_bags.item_table.weight"].shape[0]
    assert [len(s) for s in items] == [1, 1] and items[0][0].shape[0] + items[1][0].shape[0] == n_items
    assert not torch.equal(items[0][0][:5], items[1][0][:5])
    dense = [k for k in ranks[0] if not k.startswith("ebc.")]
    assert dense and all(torch.equal(ranks[0][k], ranks[1][k]) for k in dense)

    # the same seed and global batch: the test NDCG@10 of one process, within sampling noise
    ndcg, ndcg_single = summary["test"]["ndcg@10"], single.test["ndcg@10"]
    assert ndcg > 2 * summary["mostpop"]["ndcg@10"]
    assert abs(ndcg - ndcg_single) <= 0.1 * ndcg_single, (ndcg, ndcg_single)

    recs = recommend(run_id, 5, uri=config.tracking.uri)  # the logged model is unsharded: one process serves it
    assert len(recs) == 5 * recs["user_id"].nunique() and recs["user_id"].nunique() > 250


def test_two_processes_table_wise_resume_where_they_stopped(synthetic_files, tmp_path):
    # with in-batch negatives from the global batch (every rank's positives)
    config = small_config(synthetic_files, tmp_path, distributed={"sharding": "table_wise", "gather_in_batch": True}, **SETTINGS)
    straight, _ = _torchrun(config, tmp_path)
    tables = _plan(config, straight, tmp_path)["tables"]
    assert all(kind == "table_wise" and len(ranks) == 1 for kind, ranks in tables.values())
    assert {r for _, ranks in tables.values() for r in ranks} == {0, 1}  # the planner spread the tables over both ranks

    stopped, _ = _torchrun(config, tmp_path, "--set", "train.epochs=2")
    resumed, _ = _torchrun(config, tmp_path, "--resume", stopped)
    assert resumed == stopped
    assert _history(config, resumed) == pytest.approx(_history(config, straight), abs=1e-6)


@pytest.mark.parametrize("dataset,code", [("ml-latest-small", 0), ("no-such-dataset", 2)])
def test_a_torchrun_worker_exits_with_its_output_and_code(dataset, code):
    # a worker skips C++ static destructors at exit (os._exit): what it printed and its code stay
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "exit-test"}
    out = subprocess.run([sys.executable, "-m", "recsys_hnm.cli", "datasets", "describe", dataset],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == code, out.stderr[-2000:]
    if code == 0:
        assert json.loads(out.stdout)["interactions"] == 100836
    else:
        assert "unknown dataset 'no-such-dataset'" in out.stderr


FAILING_RANK = """
import sys
from recsys_hnm.cli import main
from recsys_hnm.training.trainer import Trainer

step = Trainer.train_step
calls = []

def failing_on_rank_1(self, *args, **kwargs):
    if self.cluster.rank == 1:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure on rank 1")
    return step(self, *args, **kwargs)

Trainer.train_step = failing_on_rank_1
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def test_a_failing_rank_ends_the_run_failed_with_its_error(synthetic_files, tmp_path):
    # torchrun stops rank 0 with SIGTERM when rank 1 fails: the run must not look stopped by a user
    config = small_config(synthetic_files, tmp_path, **SETTINGS)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0
    (run,) = _runs(config)
    assert run.info.status == "FAILED"
    assert "rank 1: RuntimeError: injected failure on rank 1" in run.data.tags["error"]


def test_sharded_adam_on_cpu_and_bad_nproc_are_refused(tmp_path):
    from recsys_hnm.cli import main
    from recsys_hnm.config import ConfigError
    from recsys_hnm.training.distributed import Cluster, ShardedTwoTower
    from recsys_hnm.models import TowerSizes, TwoTower

    with pytest.raises(ConfigError, match="adam has no fused CPU kernel"):
        ShardedTwoTower(TwoTower(TowerSizes(5, 10, 2), dim=8), Cluster(0, 2, torch.device("cpu")), table_optimizer="adam")
    with pytest.raises(ConfigError, match="sparse_adam is the single-process lazy Adam"):
        ShardedTwoTower(TwoTower(TowerSizes(5, 10, 2), dim=8), Cluster(0, 2, torch.device("cpu")), table_optimizer="sparse_adam")
    assert main(["train", "--nproc", "0"]) == 2


def test_a_launch_is_refused_once_before_torchrun_and_auto_picks_a_fused_optimizer(tmp_path, capsys, monkeypatch):
    from recsys_hnm.cli import main
    from recsys_hnm.training.distributed import embedding_optimizer_for
    import recsys_hnm.cli as cli

    launched = []
    monkeypatch.setattr(cli, "_torchrun", lambda nproc, argv: launched.append(argv) or 0)
    store = tmp_path / "m.db"
    assert main(["train", "--nproc", "2", "--set", "train.embedding_optimizer=adam", "--tracking-uri", f"sqlite:///{store}"]) == 2
    err = capsys.readouterr().err
    assert err.count("adam has no fused CPU kernel") == 1 and "Traceback" not in err
    assert not launched and not store.exists()  # refused before any process or run
    assert main(["train", "--nproc", "2", "--set", "model.history_encoder=sasrec", "--set", "model.train_history=per_position",
                 "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert "drop --nproc" in capsys.readouterr().err and not launched
    assert main(["train", "--nproc", "2", "--tracking-uri", f"sqlite:///{store}"]) == 0  # the default (auto) launches
    assert len(launched) == 1
    assert embedding_optimizer_for("auto", "cpu") == "rowwise_adagrad" and embedding_optimizer_for("auto", None) == "adam"
    assert embedding_optimizer_for("adagrad", "cpu") == "adagrad"


def test_in_batch_negatives_of_the_global_batch_take_its_log_q():
    counts = np.array([5.0, 3.0, 2.0, 1.0, 1.0, 4.0])
    mix = MixtureSampler({"in_batch": InBatchSampler(counts)}, {"in_batch": 1.0}, 0)
    users, positives = torch.tensor([0, 1]), torch.tensor([0, 2])
    everyone = torch.tensor([0, 2, 5, 1])  # this rank's share and the other rank's
    (block,) = mix.sample(Context(users, positives, everyone), torch.Generator())
    assert torch.equal(block.items, everyone)
    p = counts / counts.sum()
    expected = torch.log(torch.tensor(3 * p[everyone.numpy()])).float()  # the other G - 1 = 3 positives of the global batch
    assert torch.allclose(block.log_q, expected.expand(2, -1))
    assert block.invalid.tolist() == [[True, False, False, False], [False, True, False, False]]
