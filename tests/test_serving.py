"""The pyfunc recommender: logged from a trained run, loaded back with mlflow.pyfunc, served."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from mlflow.tracking import MlflowClient

from conftest import small_config
from recsys_hnm.data import synthetic
from recsys_hnm.data.interactions import IdMap
from recsys_hnm.ops.ranking import mask_known, top_k
from recsys_hnm.experiment import load_run, recommend, train
from recsys_hnm.models import FeatureBuilder, TowerSizes, TwoTower, model_scorer
from recsys_hnm.tracking.pyfunc import ARTIFACT_NAME, log_recommender
from recsys_hnm.tracking.pyfunc import top_k as np_top_k

REGISTERED = "hnm-two-tower"


def serving_view(run):
    """What train() hands log_recommender: histories and masks from every known event."""
    split = run.split
    events = pd.concat([split.history("test"), split.test]).sort_values(["user", "timestamp"], kind="stable")
    known = (split.known("test") + split.matrix("test")).tocsr()
    known.data[:] = 1.0
    return run.features.with_history(events), known


@pytest.fixture(scope="module")
def served(synthetic_files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    config = small_config(synthetic_files, tmp, train={"epochs": 1})
    uri = config.tracking.uri
    result = train(config)
    run = load_run(result.run_id, uri)
    features, known = serving_view(run)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as logging_run:
        info = log_recommender(run.model, features, run.data, known, k=20, registered_name=REGISTERED)
    model = mlflow.pyfunc.load_model(info.model_uri)
    return SimpleNamespace(uri=uri, run_id=result.run_id, run=run, features=features, known=known, info=info,
                           model=model, logging_run_id=logging_run.info.run_id)


def reference(run, features, known, users, k):
    """Top-k straight from the torch model: model_scorer, mask_known, top_k."""
    scores = model_scorer(run.model, features)(torch.as_tensor(users))
    mask_known(scores, known, torch.as_tensor(users))
    return top_k(scores, k)


def test_predict_serves_top_k_unmasked_items_as_the_model_ranks_them(served):
    data = served.run.data
    users = data.users.raw
    out = served.model.predict(pd.DataFrame({"user_id": users}), params={"k": 10})
    assert list(out.columns) == ["user_id", "item_id", "rank", "score"]
    assert len(out) == 10 * len(users)
    assert (out["user_id"].to_numpy() == np.repeat(users, 10)).all()  # request order, k rows each
    assert (out["rank"].to_numpy() == np.tile(np.arange(1, 11), len(users))).all()
    u = data.users.to_index(out["user_id"].to_numpy())
    i = data.items.to_index(out["item_id"].to_numpy())
    assert served.known[u, i].sum() == 0  # never an item the user has
    items, scores = reference(served.run, served.features, served.known, np.arange(len(users)), 10)
    assert (i.reshape(-1, 10) == items.numpy()).all()
    np.testing.assert_allclose(out["score"].to_numpy().reshape(-1, 10), scores.numpy(), rtol=1e-5, atol=1e-5)
    # without params: the default k given at logging time
    assert len(served.model.predict(pd.DataFrame({"user_id": users[:3]}))) == 3 * 20


def test_predict_equals_recommend_with_the_serving_view(served):
    users = served.run.data.users.raw[[5, 0, 42, 7]]
    ours = served.model.predict(pd.DataFrame({"user_id": users}), params={"k": 15})
    theirs = recommend(served.run_id, 15, users=users, uri=served.uri, history="all")
    pd.testing.assert_frame_equal(ours.drop(columns="score"), theirs.drop(columns="score"), check_dtype=False)
    np.testing.assert_allclose(ours["score"], theirs["score"], rtol=1e-5, atol=1e-5)


def test_unknown_users_are_skipped_and_logged_duplicates_served_once(served, caplog):
    raw = served.run.data.users.raw
    unknown = int(raw.max()) + 1000
    request = pd.DataFrame({"user_id": [raw[3], unknown, raw[1], raw[3], raw[1]]})
    with caplog.at_level(logging.WARNING, logger="recsys_hnm.tracking.pyfunc"):
        out = served.model.predict(request, params={"k": 5})
    assert out["user_id"].tolist() == [raw[3]] * 5 + [raw[1]] * 5
    assert out.attrs["unknown_users"] == [unknown]
    assert any("1 of 3 requested user id(s) unknown" in r.getMessage() and str(unknown) in r.getMessage() for r in caplog.records)
    # nobody known: a bad request (HTTP 400 when served), naming the field and the ids
    with pytest.raises(mlflow.exceptions.MlflowException, match=rf"user_id: none of the 2 requested user ids is known.*{unknown}"):
        served.model.predict(pd.DataFrame({"user_id": [unknown, unknown + 1]}), params={"k": 5})
    with pytest.raises(mlflow.exceptions.MlflowException, match="k must be a positive integer"):
        served.model.predict(pd.DataFrame({"user_id": raw[:1]}), params={"k": 0})


def test_k_beyond_the_unmasked_items_returns_what_is_left(served):
    user = served.run.data.users.raw[:1]
    n_items = served.run.data.n_items
    out = served.model.predict(pd.DataFrame({"user_id": user}), params={"k": n_items})
    n_known = served.known[0].nnz
    assert len(out) == n_items - n_known and out["rank"].tolist() == list(range(1, n_items - n_known + 1))
    with pytest.raises(mlflow.exceptions.MlflowException, match=f"k must be at most the catalog's {n_items:,} items"):
        served.model.predict(pd.DataFrame({"user_id": user}), params={"k": n_items + 1})


def test_signature_artifacts_and_registration(served):
    info = served.info
    sig = info.signature
    assert sig.inputs.input_names() == ["user_id"] and sig.inputs.input_types()[0].name == "long"
    assert sig.outputs.input_names() == ["user_id", "item_id", "rank", "score"]
    (k,) = sig.params.params
    assert k.name == "k" and k.default == 20
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    files = {p.name for p in (local / "artifacts" / ARTIFACT_NAME).iterdir()}
    assert files == {"meta.json", "user_ids.npy", "item_ids.npy", "user_embeddings.npy", "item_vectors.npy", "known.npz"}
    meta = json.loads((local / "artifacts" / ARTIFACT_NAME / "meta.json").read_text())
    assert meta["n_users"] == served.run.data.n_users and meta["known_nnz"] == served.known.nnz and not meta["item_bias"]
    assert (local / "pyfunc.py").is_file() and not list(local.rglob("*.pkl"))  # model from code, no pickle
    assert info.run_id == served.logging_run_id
    # the registry holds it
    client = MlflowClient(served.uri)
    (version,) = client.search_model_versions(f"name='{REGISTERED}'")
    assert int(version.version) == 1 and int(info.registered_model_version) == 1
    again = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1")
    request = pd.DataFrame({"user_id": served.run.data.users.raw[:4]})
    pd.testing.assert_frame_equal(again.predict(request), served.model.predict(request))


def test_the_loaded_model_needs_neither_torch_nor_recsys_hnm(served, tmp_path):
    local = mlflow.artifacts.download_artifacts(served.info.model_uri, dst_path=str(tmp_path / "model"))
    users = served.run.data.users.raw[:6]
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "torchrec", "recsys_hnm", "scipy"):
            sys.modules[name] = None  # any import of them fails
        import mlflow.pyfunc, pandas as pd
        model = mlflow.pyfunc.load_model({local!r})
        out = model.predict(pd.DataFrame({{"user_id": {users.tolist()!r}}}), params={{"k": 7}})
        out.to_csv(sys.argv[1], index=False)
    """)
    target = tmp_path / "out.csv"
    subprocess.run([sys.executable, "-c", script, str(target)], check=True, capture_output=True, timeout=300)
    expected = served.model.predict(pd.DataFrame({"user_id": users}), params={"k": 7})
    got = pd.read_csv(target)
    assert got[["user_id", "item_id", "rank"]].to_numpy().tolist() == expected[["user_id", "item_id", "rank"]].to_numpy().tolist()
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-6)


def test_numpy_top_k_has_the_evaluator_tie_rule():
    rng = np.random.default_rng(0)
    scores = rng.integers(-3, 4, size=(50, 40)).astype(np.float32)  # many ties
    scores[rng.random(scores.shape) < 0.2] = -np.inf
    scores[scores == 0] = np.float32(-0.0) * (rng.random((scores == 0).sum()) < 0.5)
    for k in (1, 5, 39, 40, 60):
        ours_i, ours_s = np_top_k(scores, k)
        ref_i, ref_s = top_k(torch.from_numpy(scores.copy()), k)
        assert (ours_i == ref_i.numpy()).all(), k
        assert np.array_equal(ours_s, ref_s.numpy())


def test_string_ids_and_item_bias(served):
    data = synthetic(30, 50, 400, n_categories=3, seed=1)
    users = IdMap(np.array([f"u{i:03d}" for i in range(data.n_users)], dtype=object))
    items = IdMap(np.array([f"article-{i}" for i in range(data.n_items)], dtype=object))
    torch.manual_seed(0)
    model = TwoTower(TowerSizes(data.n_users, data.n_items, data.n_categories), dim=8, hidden=[8], item_bias=True,
                     learn_temperature=True, temperature=0.2)
    with torch.no_grad():
        model.item_bias.copy_(torch.randn(data.n_items))
    features = FeatureBuilder(data.events, data.n_users, data.item_categories, history_len=10)
    known = sp.csr_matrix(data.matrix)
    mlflow.set_tracking_uri(served.uri)  # the store exists: no second schema migration
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_recommender(model, features, SimpleNamespace(users=users, items=items), known)
    with mlflow.start_run():
        with pytest.raises(ValueError, match="known must be users x items"):
            log_recommender(model, features, SimpleNamespace(users=users, items=items), known[:, :10])
        info = log_recommender(model, features, SimpleNamespace(users=users, items=items), known, k=4)
    assert [t.name for t in info.signature.inputs.input_types()] == ["string"]
    assert [t.name for t in info.signature.outputs.input_types()] == ["string", "string", "long", "float"]
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    out = loaded.predict(pd.DataFrame({"user_id": ["u007", "nobody", "u002"]}))
    assert out["user_id"].tolist() == ["u007"] * 4 + ["u002"] * 4 and out.attrs["unknown_users"] == ["nobody"]
    ref_items, ref_scores = reference(SimpleNamespace(model=model), features, known, np.array([7, 2]), 4)
    assert out["item_id"].tolist() == items.to_raw(ref_items.numpy().ravel()).tolist()
    np.testing.assert_allclose(out["score"], ref_scores.numpy().ravel(), rtol=1e-5, atol=1e-5)


def test_the_served_model_over_http_refuses_bad_requests_and_answers_concurrently_as_sequentially(served):
    """`mlflow models serve` of the run's recommender on loopback (benchmarks/serve_load.py's
    server): bad requests get a 4xx naming the field, concurrent answers equal sequential ones."""
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from serve_load import free_port, post, serve, users_body

    port = free_port()
    url = f"http://127.0.0.1:{port}/invocations"
    proc = serve(served.run_id, served.uri, port)
    try:
        users = served.run.data.users.raw[:20].tolist()
        sequential = [post(url, users_body([u], 5))[:2] for u in users]
        assert all(status == 200 for status, _ in sequential)
        assert json.loads(sequential[0][1])["predictions"][0]["user_id"] == users[0]
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(lambda u: post(url, users_body([u], 5))[:2], users * 3))
        assert concurrent == sequential * 3
        n_items = served.run.data.n_items
        for body, says in [("", "JSON"), (json.dumps({"dataframe_split": {"columns": ["customer"], "data": [[1]]}}), "user_id"),
                           (users_body([10**9]), "user_id: none of the 1 requested user ids is known"),
                           (users_body(users[:1], 0), "k must be a positive integer"),
                           (users_body(users[:1], n_items + 1), "k must be at most"),
                           (users_body(["nobody"]), "user_id")]:
            status, text, _ = post(url, body)
            assert 400 <= status < 500 and says in text, (body, status, text[:200])
        assert post(url, users_body(users[:1], 5))[:2] == sequential[0]  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)
