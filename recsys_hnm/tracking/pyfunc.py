"""The trained two-tower model as an MLflow pyfunc: user ids in, top-K items out.

``log_recommender`` (called inside an active run) precomputes what serving needs as plain numpy
files: every known user's embedding, every item's embedding times the model's scale (1 /
temperature), the item bias if the model has one, the raw user / item ids and the known items
of each user (masked). It logs them with this file as a "model from code": MLflow copies the
file into the model and runs it at load time, where it defines ``TopKRecommender`` and hands it
to ``mlflow.models.set_model``. Nothing is pickled, and the loaded model needs only numpy,
pandas and mlflow: neither torch, torchrec nor recsys_hnm.

Scores and ranking are those of ``recommend``: user . item * scale (+ item bias), or, when the
run chose an item-item head (baselines/item_item.py), that blended per user with the known items'
rows of the head's sparse weights (a MostPop head: its one row of counts, the same for every
user), each side standardised over the catalog; known items masked,
the best ``k`` first, ties to the lower item index (``ops.ranking.top_k``'s rule, computed here
in numpy with the same packed keys).

Keep the module's top-level imports to the standard library, numpy, pandas and mlflow: they are
what the serving side imports when it loads the model (scipy, a dependency of mlflow, is imported
only for an item-item head).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

# a fixed name: loaded from the model's copy of this file the module is named code_model_<uuid>
log = logging.getLogger("recsys_hnm.tracking.pyfunc")

FORMAT_VERSION = 1
ARTIFACT_NAME = "recommender_data"  # key of the artifacts directory in the model
META_FILE = "meta.json"
USER_IDS, ITEM_IDS = "user_ids.npy", "item_ids.npy"
USER_EMB, ITEM_VECS, ITEM_BIAS = "user_embeddings.npy", "item_vectors.npy", "item_bias.npy"
KNOWN = "known.npz"
ITEM_ITEM = "item_item.npz"  # the head's weights (items x items CSR; 1 x items for MostPop), when the run has one
EPS = 1e-6  # as baselines/item_item.py: a constant row standardises to zeros
MAX_CELLS = 1 << 22  # scores held at once per request chunk (users x items)


class TopKRecommender(PythonModel):
    """``predict(model_input, params={"k": K})``: for each distinct known ``user_id`` of the
    input (first occurrence order), its top-``k`` unmasked items as rows ``user_id, item_id,
    rank, score`` (raw ids, rank 1 best). Unknown user ids are skipped and logged (and listed in
    the result's ``attrs["unknown_users"]``), a request of unknown ids alone is refused (HTTP
    400 when served); a user with fewer than ``k`` unmasked items gets fewer rows; ``k`` above
    the catalog's size is refused."""

    def load_context(self, context):
        root = Path(context.artifacts[ARTIFACT_NAME])
        self.meta = json.loads((root / META_FILE).read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise MlflowException(f"recommender data format {self.meta.get('format')!r} is not {FORMAT_VERSION}")
        self.user_ids = np.load(root / USER_IDS, allow_pickle=False)
        self.item_ids = np.load(root / ITEM_IDS, allow_pickle=False)
        self.user_emb = np.load(root / USER_EMB, mmap_mode="r", allow_pickle=False)  # rows read as requested
        self.item_t = np.ascontiguousarray(np.load(root / ITEM_VECS, allow_pickle=False).T)
        self.item_bias = np.load(root / ITEM_BIAS, allow_pickle=False) if self.meta["item_bias"] else None
        with np.load(root / KNOWN, allow_pickle=False) as known:
            self.known_indptr = known["indptr"].astype(np.int64)
            self.known_indices = known["indices"].astype(np.int64)
        self.user_index = pd.Index(self.user_ids)
        self.default_k = int(self.meta["default_k"])
        self.head_weight = float(self.meta.get("item_item_weight", 0.0))
        if self.head_weight:
            import scipy.sparse as sp  # a dependency of mlflow; needed only with an item-item head

            n_users, n_items = len(self.user_ids), len(self.item_ids)
            rows = int(self.meta.get("item_item_rows", n_items))
            with np.load(root / ITEM_ITEM, allow_pickle=False) as head:
                self.head = sp.csr_matrix((head["data"], head["indices"], head["indptr"]), shape=(rows, n_items))
            # MostPop: the same row of counts for every user, made dense once
            self.head_row = self.head.toarray().astype(np.float32) if rows == 1 else None
            ones = np.ones(len(self.known_indices), dtype=np.float32)
            self.known = sp.csr_matrix((ones, self.known_indices, self.known_indptr), shape=(n_users, n_items))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        k = (params or {}).get("k")
        k = self.default_k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise MlflowException.invalid_parameter_value(f"k must be a positive integer, not {k!r}")
        if k > len(self.item_ids):
            raise MlflowException.invalid_parameter_value(f"k must be at most the catalog's {len(self.item_ids):,} items, not {k!r}")
        users = _user_column(model_input)
        wanted = users.drop_duplicates()
        found = lookup_ids(self.user_index, wanted)
        unknown = wanted[found < 0].tolist()
        if unknown and len(unknown) == len(wanted):  # a request that can get nothing is a bad request
            raise MlflowException.invalid_parameter_value(
                f"user_id: none of the {len(wanted)} requested user ids is known to this model, e.g. {unknown[:5]}")
        if unknown:
            log.warning("recommender: %d of %d requested user id(s) unknown, skipped, e.g. %s",
                        len(unknown), len(wanted), unknown[:5])
        idx = found[found >= 0]
        out = self.top_items(idx, int(k))
        out.attrs["unknown_users"] = unknown
        return out

    def scores(self, idx: np.ndarray) -> np.ndarray:
        """[len(idx), n_items] float32 scores with each user's known items at -inf."""
        s = np.asarray(self.user_emb[idx], dtype=np.float32) @ self.item_t
        if self.item_bias is not None:
            s += self.item_bias
        if self.head_weight:  # the towers blended with the item-item head over the known items
            a = np.float32(self.head_weight)
            if self.head_row is not None:
                side = np.broadcast_to(self.head_row, s.shape)
            else:
                side = (self.known[idx] @ self.head).toarray().astype(np.float32)
            s = (1 - a) * _standardize(s) + a * _standardize(side)
        starts, ends = self.known_indptr[idx], self.known_indptr[idx + 1]
        lengths = ends - starts
        rows = np.repeat(np.arange(len(idx)), lengths)
        cols = self.known_indices[np.repeat(ends - lengths.cumsum(), lengths) + np.arange(lengths.sum())]
        s[rows, cols] = -np.inf
        return s

    def top_items(self, idx: np.ndarray, k: int) -> pd.DataFrame:
        n_items = len(self.item_ids)
        chunk = max(1, MAX_CELLS // max(n_items, 1))
        parts = []
        for start in range(0, len(idx), chunk):
            users = idx[start:start + chunk]
            items, scores = top_k(self.scores(users), k)
            valid = np.isfinite(scores)  # masked items are never returned
            rows, cols = np.nonzero(valid)
            parts.append(pd.DataFrame({
                "user_id": self.user_ids[users[rows]], "item_id": self.item_ids[items[valid]],
                "rank": (cols + 1).astype(np.int64), "score": scores[valid],
            }))
        if not parts:
            return pd.DataFrame({
                "user_id": self.user_ids[:0], "item_id": self.item_ids[:0],
                "rank": np.zeros(0, np.int64), "score": np.zeros(0, np.float32),
            })
        return pd.concat(parts, ignore_index=True)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of ``ops.ranking.top_k``: (indices, values) of each row's ``min(k, n)``
    highest scores, best first, ties to the lower index. The float32 scores become
    order-preserving int32 keys packed with the reversed index into distinct int64 keys."""
    n = scores.shape[1]
    k = min(k, n)
    bits = (scores.astype(np.float32) + np.float32(0.0)).view(np.int32)  # + 0.0: -0.0 -> +0.0
    key = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64) << 32
    key |= np.int64(0xFFFFFFFF) - np.arange(n, dtype=np.int64)
    if k < n:
        part = np.argpartition(key, n - k, axis=1)[:, n - k:]
    else:
        part = np.broadcast_to(np.arange(n), key.shape)
    order = np.argsort(-np.take_along_axis(key, part, 1), axis=1)  # keys are distinct: no ties
    indices = np.take_along_axis(part, order, 1)
    return indices, np.take_along_axis(scores, indices, 1)


def _standardize(s: np.ndarray) -> np.ndarray:
    """Each row to mean 0 and standard deviation 1 (baselines/item_item.py's ``standardize``)."""
    return (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + np.float32(EPS))


def _user_column(model_input) -> pd.Series:
    if isinstance(model_input, pd.DataFrame):
        if "user_id" not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the input needs a 'user_id' column; columns present: {list(model_input.columns)}")
        return model_input["user_id"].reset_index(drop=True)
    if isinstance(model_input, dict) and "user_id" in model_input:
        return pd.Series(np.atleast_1d(np.asarray(model_input["user_id"])))
    return pd.Series(np.atleast_1d(np.asarray(model_input)))


def lookup_ids(index: pd.Index, wanted: pd.Series) -> np.ndarray:
    """Positions of ``wanted`` in ``index``, -1 where unknown; numeric ids given as text (a file
    with a stray non-numeric value is read as text) are compared as numbers (the stray one is
    unknown). Shared with ``experiment.recommend``."""
    if pd.api.types.is_numeric_dtype(index) and not pd.api.types.is_numeric_dtype(wanted):
        wanted = pd.to_numeric(wanted, errors="coerce")
    elif not pd.api.types.is_numeric_dtype(index) and pd.api.types.is_numeric_dtype(wanted):
        wanted = wanted.astype(str)
    return np.asarray(index.get_indexer(wanted.to_numpy()), dtype=np.int64)


# -- logging (training side: imports torch and recsys_hnm lazily) --------------------------------

def _id_array(raw: np.ndarray) -> np.ndarray:
    """Raw ids as a pickle-free array: numbers as they are, text as a fixed-width unicode array."""
    raw = np.asarray(raw)
    if raw.dtype.kind in "iufb":
        return raw
    return raw.astype(str)


def _id_type(ids: np.ndarray) -> str:
    return {"i": "long", "u": "long", "f": "double", "b": "boolean"}.get(ids.dtype.kind, "string")


def _signature(user_type: str, item_type: str, k: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(user_type, "user_id")]),
        outputs=Schema([ColSpec(user_type, "user_id"), ColSpec(item_type, "item_id"),
                        ColSpec("long", "rank"), ColSpec("float", "score")]),
        params=ParamSchema([ParamSpec("k", "long", int(k))]),
    )


def write_recommender_data(model, features, data, known, k: int, root: Path, head=None) -> dict:
    """The arrays ``TopKRecommender`` loads, written under ``root``; returns the meta dict.
    ``head``: the run's ``ItemItemHead`` (blended over ``known``), or None."""
    import scipy.sparse as sp
    import torch

    from ..models import item_embeddings, user_embeddings

    n_users, n_items = model.sizes.n_users, model.sizes.n_items
    if len(data.users) != n_users or len(data.items) != n_items:
        raise ValueError(f"the data has {len(data.users)} users x {len(data.items)} items, the model {n_users} x {n_items}")
    known = sp.csr_matrix(known)
    if known.shape != (n_users, n_items):
        raise ValueError(f"known must be users x items {(n_users, n_items)}, not {known.shape}")
    known.sum_duplicates()
    known.sort_indices()
    if getattr(model, "repeat_term", None) is not None:
        log.warning("the served recommender scores with the two towers only: it masks the user's items and carries no "
                    "repeat term (use `recsys-hnm recommend --exclude none` for repeat-aware lists)")
    scale = float(model.scale.detach())
    with torch.no_grad():
        users = user_embeddings(model, features)
        items = item_embeddings(model, features) * scale  # as embedding_scorer scales them
    user_ids, item_ids = _id_array(data.users.raw), _id_array(data.items.raw)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / USER_IDS, user_ids, allow_pickle=False)
    np.save(root / ITEM_IDS, item_ids, allow_pickle=False)
    np.save(root / USER_EMB, users.numpy().astype(np.float32, copy=False), allow_pickle=False)
    np.save(root / ITEM_VECS, items.numpy().astype(np.float32, copy=False), allow_pickle=False)
    has_bias = model.item_bias is not None
    if has_bias:
        np.save(root / ITEM_BIAS, model.item_bias.detach().numpy().astype(np.float32), allow_pickle=False)
    np.savez(root / KNOWN, indptr=known.indptr.astype(np.int64), indices=known.indices.astype(np.int64))
    if head is not None:
        w = sp.csr_matrix(head.weights)
        if w.shape != head.shape(n_items):
            raise ValueError(f"the item-item head's weights are {w.shape}, the model has {n_items} items")
        np.savez(root / ITEM_ITEM, indptr=w.indptr.astype(np.int64), indices=w.indices.astype(np.int64), data=w.data.astype(np.float32))
    meta = {
        "format": FORMAT_VERSION, "n_users": n_users, "n_items": n_items, "dim": int(users.shape[1]),
        "default_k": int(k), "scale": scale, "temperature": 1.0 / scale, "item_bias": has_bias,
        "known_nnz": int(known.nnz), "user_id_type": _id_type(user_ids), "item_id_type": _id_type(item_ids),
        "item_item_weight": float(head.weight) if head is not None else 0.0,
        "item_item_kind": head.kind if head is not None else None,
        "item_item_rows": int(head.weights.shape[0]) if head is not None else 0,
    }
    (root / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def log_recommender(model, features, data, known, k: int = 100, artifact_path: str = "recommender",
                    registered_name: str | None = None, head=None):
    """Log ``model`` as a pyfunc top-``k`` recommender in the active MLflow run; returns MLflow's
    ``ModelInfo`` (``model_uri`` loads it with ``mlflow.pyfunc.load_model``).

    ``features``: the FeatureBuilder whose histories the user tower reads at serving time (every
    known event); ``data``: the Interactions (raw ids); ``known``: users x items, nonzero where
    the item is masked for the user (every known event). ``k``: the default of the ``k`` param.
    ``registered_name``: also register the model under that name in the model registry.
    ``head``: the run's item-item head (``baselines.item_item.ItemItemHead``), blended over ``known``.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, not {k}")
    if mlflow.active_run() is None:
        raise RuntimeError("log_recommender needs an active MLflow run")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / ARTIFACT_NAME
        meta = write_recommender_data(model, features, data, known, k, root, head)
        user_ids = np.load(root / USER_IDS, allow_pickle=False)
        example = pd.DataFrame({"user_id": user_ids[:2]})
        info = mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=str(Path(__file__).resolve()),  # this file, run by MLflow at load time
            artifacts={ARTIFACT_NAME: str(root)},
            signature=_signature(meta["user_id_type"], meta["item_id_type"], k),
            input_example=example,
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}", f"pandas=={pd.__version__}"],
            metadata={"recommender": {key: meta[key] for key in ("n_users", "n_items", "dim", "default_k", "item_bias")}},
            registered_model_name=registered_name,
        )
    log.info("logged recommender %s (%d users x %d items)%s", info.model_uri, meta["n_users"], meta["n_items"],
             f", registered as {registered_name!r} version {info.registered_model_version}" if registered_name else "")
    return info


if __name__ != "recsys_hnm.tracking.pyfunc":  # run by MLflow from the model's copy of this file
    mlflow.models.set_model(TopKRecommender())
