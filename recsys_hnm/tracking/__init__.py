"""MLflow tracking."""

from .mlflow_tracking import (
    MlflowLogger, Terminated, TrackingError, download, get_run, git_commit, log_metrics, metric_name, tracked_run, tracking_uri,
)

__all__ = ["MlflowLogger", "Terminated", "TrackingError", "download", "get_run", "git_commit", "log_metrics", "metric_name", "tracked_run", "tracking_uri"]
