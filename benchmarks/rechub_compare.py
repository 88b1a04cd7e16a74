"""Training throughput against torch-rechub: its DSSM with its own negative sampling, and our
two-tower with the same number of per-row uniform negatives, on the shipped MovieLens
latest-small data; prints JSON.

rechub: ``generate_seq_feature_match`` (random sampling, ``neg_ratio=N``) is timed, then
``gen_model_input`` (padding histories, reported apart), then DSSM (64-d embeddings; user tower
user id + mean of the history, item tower movie id + first genre; MLPs [128, 64]) trains through
its ``MatchTrainer`` over a plain DataLoader (batch 1024, Adam lr 0.005). DSSM scores one
(user, item) row and has no list-wise path (mode=2 needs a model with a negative-item feature,
e.g. YoutubeDNN), so it is point-wise (mode=0): each positive comes with N label-0 rows, N + 1
rows per positive. recsys_hnm: ``pipelines/quickstart.yaml`` with uniform negatives only, N per
row (no in-batch, no shared draws), history length as rechub's; ``trainer.train_step`` is timed
over an epoch's worth of batches of 1024, as ``train_scale.py`` does. Both skip 2 warm-up
batches and run on one thread.
Usage: python benchmarks/rechub_compare.py [--negatives 3] [--epochs 1] [--steps S] [--max-users U]
       [--history-len 50] [--rechub-path /tmp/rechub]
Output: {"dataset", "negatives", "threads": 1, "rechub": {"mode", "sampling_s", "inputs_s", "rows",
         "train_s", "train_rows_per_s", "rows_per_s_with_sampling", "positives_per_s"},
         "recsys_hnm": {"steps", "examples_per_s"}, "ratio", "ratio_per_positive"}
(ratio: our examples/s over rechub's training rows/s, as asked; one example of ours is one of
rechub's positives with its N negatives, hence ratio_per_positive over rechub's positives/s.)
"""

import argparse
import contextlib
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from train_scale import examples_per_s  # the same timed loop

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets" / "ml-latest-small"
BATCH, LR, DIM = 1024, 0.005, 64


def import_rechub(path: str) -> None:
    import importlib

    try:
        importlib.import_module("torch_rechub")
    except ImportError:
        sys.path.insert(0, path)
        try:
            importlib.import_module("torch_rechub")
        except ImportError as e:
            sys.exit(f"error: cannot import torch_rechub (not installed, nor under --rechub-path {path}): {e}")


def rechub(ratings: pd.DataFrame, movies: pd.DataFrame, n: int, epochs: int, steps: int | None, history_len: int) -> dict:
    from torch.utils.data import DataLoader
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.matching import DSSM
    from torch_rechub.trainers import MatchTrainer
    from torch_rechub.utils.data import TorchDataset
    from torch_rechub.utils.match import gen_model_input, generate_seq_feature_match

    data = ratings.merge(movies, on="movieId").rename(columns={"userId": "user_id", "movieId": "movie_id"})
    data["cate_id"] = data["genres"].str.split("|").str[0]
    vocab = {}
    for col in ("user_id", "movie_id", "cate_id"):  # ids 1..n, 0 is padding (LabelEncoder + 1 in rechub's examples)
        data[col] = data[col].astype("category").cat.codes.astype(np.int64) + 1
        vocab[col] = int(data[col].max()) + 1
    random.seed(0)
    np.random.seed(0)
    with contextlib.redirect_stdout(sys.stderr):  # rechub prints its progress; stdout is the JSON
        start = time.perf_counter()
        train, _ = generate_seq_feature_match(data[["user_id", "movie_id", "timestamp"]].copy(), "user_id", "movie_id", "timestamp",
                                              sample_method=0, mode=0, neg_ratio=n)
        sampling_s = time.perf_counter() - start
        start = time.perf_counter()
        x = gen_model_input(train, data[["user_id"]].drop_duplicates(), "user_id", data[["movie_id", "cate_id"]].drop_duplicates("movie_id"),
                            "movie_id", seq_max_len=history_len)
        inputs_s = time.perf_counter() - start

        torch.manual_seed(0)
        user_features = [SparseFeature("user_id", vocab["user_id"], DIM),
                         SequenceFeature("hist_movie_id", vocab["movie_id"], DIM, pooling="mean", shared_with="movie_id")]
        item_features = [SparseFeature("movie_id", vocab["movie_id"], DIM), SparseFeature("cate_id", vocab["cate_id"], DIM)]
        model = DSSM(user_features, item_features, user_params={"dims": [128, DIM]}, item_params={"dims": [128, DIM]})
        with tempfile.TemporaryDirectory() as tmp:
            trainer = MatchTrainer(model, mode=0, optimizer_params={"lr": LR}, n_epoch=epochs, model_path=tmp)
            loader = DataLoader(TorchDataset(x, x["label"]), batch_size=BATCH, shuffle=True, num_workers=0)
            trainer.train_one_epoch(itertools.islice(loader, 2))  # warm-up
            start = time.perf_counter()
            for _ in range(epochs):
                trainer.train_one_epoch(loader if steps is None else itertools.islice(loader, steps))
            train_s = time.perf_counter() - start
    rows = len(train)
    trained = epochs * (rows if steps is None else min(steps * BATCH, rows))
    return {"mode": "point-wise (mode=0; DSSM has no list-wise path)", "sampling_s": round(sampling_s, 2), "inputs_s": round(inputs_s, 2),
            "rows": rows, "train_s": round(train_s, 2), "train_rows_per_s": round(trained / train_s),
            "rows_per_s_with_sampling": round(epochs * rows / (sampling_s + epochs * rows / (trained / train_s))),
            "positives_per_s": round(trained / train_s / (n + 1))}


def recsys_hnm(ratings: pd.DataFrame, movies: pd.DataFrame, n: int, epochs: int, steps: int | None, history_len: int) -> dict:
    from recsys_hnm.config import load_config
    from recsys_hnm.data import Interactions, leave_last_out
    from recsys_hnm.experiment import build_sampler, build_trainer, choose_settings

    config = load_config(ROOT / "pipelines" / "quickstart.yaml", [
        "sampler.mixture={uniform: 1.0}", f"sampler.num_negatives={n}", "sampler.uniform.shared=false",
        "train.progress=false", f"train.batch_size={BATCH}", f"train.lr={LR}", f"model.history_len={history_len}"])
    events = ratings.rename(columns={"userId": "user_id", "movieId": "item_id"})[["user_id", "item_id", "timestamp"]]
    items = movies.rename(columns={"movieId": "item_id", "genres": "category"})[["item_id", "category"]]
    data = Interactions.from_frames(events.reset_index(drop=True), items)  # as load_dataset("ml-latest-small")
    split = leave_last_out(data)
    config, _ = choose_settings(config, data, split, probe=False)  # "auto" settings: the rules' pick
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], Path(tmp) / "items.index", validate=False)
        trainer.diagnostics = None  # the training cost, not the diagnostics'
        total = steps or epochs * -(-len(trainer.users) // BATCH)
        return {"steps": total, "examples_per_s": examples_per_s(trainer, BATCH, total)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--negatives", type=int, default=3, help="negatives per positive (rechub neg_ratio, our sampler.num_negatives)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, help="time this many batches per epoch instead of a full epoch (smoke tests)")
    parser.add_argument("--max-users", type=int, help="only the first U users' ratings (smoke tests)")
    parser.add_argument("--history-len", type=int, default=50, help="history length of both (rechub seq_max_len, our model.history_len)")
    parser.add_argument("--rechub-path", default="/tmp/rechub", help="where torch_rechub is unpacked, if it is not installed")
    args = parser.parse_args()
    import_rechub(args.rechub_path)
    torch.set_num_threads(1)
    ratings, movies = pd.read_csv(DATA / "ratings.csv"), pd.read_csv(DATA / "movies.csv")
    if args.max_users:
        ratings = ratings[ratings["userId"].isin(ratings["userId"].unique()[:args.max_users])]
    common = (args.negatives, args.epochs, args.steps, args.history_len)
    theirs = rechub(ratings, movies[["movieId", "genres"]], *common)
    ours = recsys_hnm(ratings, movies, *common)
    print(json.dumps({"dataset": "ml-latest-small", "ratings": len(ratings), "negatives": args.negatives, "threads": 1,
                      "epochs": args.epochs, "history_len": args.history_len, "rechub": theirs, "recsys_hnm": ours,
                      "ratio": round(ours["examples_per_s"] / theirs["train_rows_per_s"], 2),
                      "ratio_per_positive": round(ours["examples_per_s"] / theirs["positives_per_s"], 2)}))


if __name__ == "__main__":
    main()
