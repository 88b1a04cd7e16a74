"""MLflow integration: the default SQLite store under mlruns/, run lifecycle, per-epoch logging."""

from __future__ import annotations

import contextlib
import sqlite3
import fcntl
import logging
import os
import signal
import subprocess
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..training.callbacks import Callback

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("mlruns")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class TrackingError(RuntimeError):
    """A run that cannot be found or read."""


SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def _given_or_default(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def tracking_uri(uri: str | None = None, create: bool | None = True) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else SQLite in ./mlruns (MLflow 3.17+ refuses the
    plain file store), checked before MLflow sees it: a known scheme, and for SQLite a file that
    is an MLflow database. ``create=False`` (commands that only read runs): the store must exist;
    None (a dry run): it may be missing, and nothing is written."""
    uri = _given_or_default(uri)
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else uri if uri == "databricks" else ""  # MLflow's bare "databricks"
    if scheme not in SCHEMES:
        raise TrackingError(f"tracking URI {uri!r}: unsupported scheme {scheme or '(none)'!r}; use sqlite:///path/mlflow.db, "
                            f"or a server ({', '.join(SCHEMES[1:])})")
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.is_file() and path.stat().st_size:
            _check_mlflow_database(path)
        elif create is False and (not path.exists() or path.is_file()):  # missing, or an empty file
            raise TrackingError(f"tracking store {path} {'is empty' if path.exists() else 'does not exist'}: no run was tracked there")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
    return uri


def store_exists(uri: str | None = None) -> bool:
    """Whether the store holds anything yet: False for an SQLite file that is missing or empty
    (a server is taken to exist)."""
    uri = _given_or_default(uri)
    if not uri.startswith("sqlite:///"):
        return True
    path = Path(uri[len("sqlite:///"):])
    return path.is_file() and path.stat().st_size > 0


def _check_mlflow_database(path: Path) -> None:
    """An SQLite file that MLflow may open: one that holds another application's tables would
    get MLflow's ~60 tables written beside them."""
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise TrackingError(f"tracking store {path} is not an SQLite database")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        raise TrackingError(f"tracking store {path} cannot be read as an SQLite database: {e}") from e
    if tables and not {"experiments", "runs"} <= tables:
        raise TrackingError(f"tracking store {path} is an SQLite database but not an MLflow store "
                            f"(its tables: {', '.join(sorted(tables)[:5])}); give another path")


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialises first use of a SQLite store across processes: two runs starting together on a
    fresh store would otherwise race on MLflow's schema migration and one would fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):]).with_suffix(".lock")
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def experiment_id(name: str, uri: str) -> str:
    with _store_lock(uri):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        if uri.startswith("sqlite:///"):  # artifacts beside the database file, not in ./mlartifacts
            artifact_location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
        return client.create_experiment(name, artifact_location=artifact_location)


class Terminated(BaseException):
    """SIGTERM received: the run ends KILLED, like Ctrl-C, instead of staying RUNNING."""


@contextlib.contextmanager
def sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def tracked_run(uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None, tags: dict | None = None,
                peer_failure: Callable[[], str | None] | None = None):
    """An active MLflow run (new, or ``run_id`` reopened to resume). An exception ends it as
    FAILED with the error in the tag ``error`` and the traceback as ``error.txt``; Ctrl-C or
    SIGTERM ends it KILLED, unless ``peer_failure`` names another process's error that stopped
    this one (a failed torchrun rank): then it is FAILED with that error."""
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    exp_id = experiment_id(experiment, uri)
    # the handler is in place before the run exists: a SIGTERM right after start_run (a pipeline
    # stopped while its workers start) must not leave the run RUNNING
    with sigterm_raises():
        try:
            run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=run_name, tags=tags)
            if run_id and "error" in run.data.tags:  # a resumed run: the old failure no longer describes it
                MlflowClient(uri).delete_tag(run_id, "error")
            yield run
        except BaseException as e:
            if mlflow.active_run() is None:  # stopped before the run existed
                raise
            peer = peer_failure() if peer_failure is not None else None
            error = f"{type(e).__name__}: {e}" if peer is None else f"{peer} (and here: {type(e).__name__}: {e})"
            with contextlib.suppress(Exception):
                mlflow.set_tag("error", error[:5000])
                mlflow.log_text(traceback.format_exc(), "error.txt")
            killed = isinstance(e, (KeyboardInterrupt, Terminated)) and peer is None
            mlflow.end_run(status=RunStatus.to_string(RunStatus.KILLED if killed else RunStatus.FAILED))
            raise
        else:
            mlflow.end_run(status="FINISHED")


def log_metrics(metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
    # MLflow metric names may not hold '@'
    mlflow.log_metrics({metric_name(prefix + k): float(v) for k, v in metrics.items()}, step=step)


def metric_name(key: str) -> str:
    return key.replace("@", "_at_")


PER_USER_ARTIFACT = "per_user_{phase}.parquet"


def log_per_user(frame, phase: str, users=None) -> None:
    """Per-user metrics of the active run (raw ``user_id`` added when ``users``, an IdMap, is
    given), as the artifact that paired comparisons read."""
    if users is not None:
        frame = frame.assign(user_id=users.to_raw(frame["user"].to_numpy()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PER_USER_ARTIFACT.format(phase=phase)
        frame.to_parquet(path, index=False)
        mlflow.log_artifact(str(path))


class MlflowLogger(Callback):
    """Logs each epoch's logs (train loss, validation metrics, epoch time, negative
    diagnostics) with the epoch as step."""

    def on_epoch_end(self, trainer, epoch, logs):
        log_metrics(logs, step=epoch)


def get_run(run_id: str, uri: str):
    try:
        return MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"run {run_id!r} not found in the tracking store {uri}") from e


def download(run_id: str, artifact: str, uri: str, dest: str | Path | None = None) -> Path:
    dest = dest or tempfile.mkdtemp(prefix="recsys-hnm-")
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dest), tracking_uri=uri))
    except (MlflowException, OSError) as e:
        raise TrackingError(f"run {run_id}: artifact {artifact!r} cannot be read ({e})") from e
