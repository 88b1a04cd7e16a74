"""MLflow tracking."""

from .mlflow_tracking import (
    MlflowLogger, PER_USER_ARTIFACT, Terminated, TrackingError, download, experiment_id, get_run, git_commit, log_metrics, log_per_user, metric_name, sigterm_raises, store_exists, tracked_run, tracking_uri,
)

__all__ = ["MlflowLogger", "PER_USER_ARTIFACT", "Terminated", "TrackingError", "download", "experiment_id", "get_run", "git_commit", "log_metrics", "log_per_user", "metric_name", "sigterm_raises", "store_exists", "tracked_run", "tracking_uri"]
