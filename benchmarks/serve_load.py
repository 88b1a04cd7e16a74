"""The served recommender under load: `mlflow models serve` of a trained run's pyfunc on loopback.

Trains a small model on synthetic data (or takes --run-id with --tracking-uri), starts the real
MLflow scoring server (uvicorn, --env-manager local), then:
  - load: --requests requests of one user each from --clients concurrent clients; requests/s,
    p50/p99 latency, errors, and whether every answer equals the sequential one for that user;
  - bad requests: each kind sent once, its HTTP status and the first words of the answer, then
    whether the server still answers.
Prints one JSON object.

    python benchmarks/serve_load.py [--requests 2000] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes | str, content_type: str = "application/json") -> tuple[int, str, float]:
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode(), time.perf_counter() - start
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), time.perf_counter() - start


def users_body(users, k=None) -> str:
    body = {"dataframe_split": {"columns": ["user_id"], "data": [[u] for u in users]}}
    if k is not None:
        body["params"] = {"k": k}
    return json.dumps(body)


def train_small(tmp: Path) -> tuple[str, str, list]:
    """A 1-epoch model on the synthetic data the tests use; (run id, tracking URI, user ids)."""
    from conftest import small_config, write_split  # noqa: E402  (tests/ on the path)
    from recsys_hnm.data import leave_last_out, synthetic
    from recsys_hnm.experiment import train

    data = synthetic(2000, 5000, 60_000, n_categories=20, seed=3)
    files = write_split(data, leave_last_out(data), tmp)
    config = small_config(files, tmp, train={"epochs": 1})
    result = train(config)
    return result.run_id, config.tracking.uri, data.users.to_raw(np.arange(data.n_users)).tolist()


def serve(run_id: str, uri: str, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    # mlflow runs `uvicorn` by name: the environment's bin first on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{mlflow.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(mlflow), "models", "serve", "-m", f"runs:/{run_id}/recommender", "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(os.environ.get("SERVE_LOG", os.devnull), "w"))
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    proc.terminate()
    raise RuntimeError("the scoring server did not start within 120 s")


BAD_REQUESTS = {
    "empty body": "",
    "not json": "{user_id: 1",
    "missing user_id column": json.dumps({"dataframe_split": {"columns": ["customer"], "data": [[1]]}}),
    "only unknown users": users_body([10**9]),
    "user_id of the wrong type": users_body(["no-such-user"]),
    "k = 0": None,  # built with a known user below
    "k < 0": None,
    "k huge": None,
    "k not an integer": None,
    "user_id a list in a cell": json.dumps({"dataframe_split": {"columns": ["user_id"], "data": [[[1, 2]]]}}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_id, uri, users = train_small(Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}/invocations"
        proc = serve(run_id, uri, port)
        try:
            rng = np.random.default_rng(0)
            wanted = [users[i] for i in rng.integers(0, len(users), args.requests)]
            expected = {}
            for u in sorted(set(wanted[:200])):  # the sequential answers, one request at a time
                status, text, _ = post(url, users_body([u], args.k))
                expected[u] = text if status == 200 else None
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                answers = list(pool.map(lambda u: (u, *post(url, users_body([u], args.k))), wanted))
            elapsed = time.perf_counter() - start
            latency = np.array([a[3] for a in answers]) * 1000
            errors = sum(a[1] != 200 for a in answers)
            mismatched = sum(1 for u, status, text, _ in answers if u in expected and text != expected[u])
            known = users[0]
            bodies = {**BAD_REQUESTS, "k = 0": users_body([known], 0), "k < 0": users_body([known], -3),
                      "k huge": users_body([known], 10**12), "k not an integer": users_body([known], "ten")}
            bad = {}
            for kind, body in bodies.items():
                status, text, _ = post(url, body)
                message = text
                try:
                    message = json.loads(text).get("message", text)
                except (ValueError, AttributeError):
                    pass
                bad[kind] = {"status": status, "message": str(message)[:160]}
            alive = post(url, users_body([known], args.k))[0] == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps({
        "requests": args.requests, "clients": args.clients, "k": args.k,
        "requests_per_s": round(args.requests / elapsed, 1),
        "latency_ms": {"p50": round(float(np.percentile(latency, 50)), 2), "p99": round(float(np.percentile(latency, 99)), 2)},
        "errors": int(errors), "answers_checked_against_sequential": sum(u in expected for u, *_ in answers),
        "answers_differing_from_sequential": int(mismatched),
        "bad_requests": bad, "bad_requests_all_4xx": all(400 <= b["status"] < 500 for b in bad.values()),
        "server_alive_after_bad_requests": alive,
    }, indent=2))


if __name__ == "__main__":
    main()
