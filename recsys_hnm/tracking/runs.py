"""Parent and child runs of a study (a pipeline or a search), named in one place: the parent
run is tagged ``pipeline=<name>, role=parent``; each child carries ``pipeline=<name>``,
``pipeline.key=<key>`` (what "already done" is matched on), its ``variant`` and MLflow's
``mlflow.parentRunId``."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from .mlflow_tracking import experiment_id

PARENT_TAG, KEY_TAG = "pipeline", "pipeline.key"


def parent_run(name: str, uri: str) -> str:
    """The study's parent run, reused when the study runs again (so it resumes)."""
    client = MlflowClient(uri)
    exp_id = experiment_id(name, uri)
    found = client.search_runs([exp_id], f"tags.{PARENT_TAG} = '{name}' and tags.role = 'parent'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, "RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=name, tags={PARENT_TAG: name, "role": "parent"})
    return run.info.run_id


def child_tags(name: str, parent_id: str, variant: str, key: str) -> dict[str, str]:
    """The tags that make a run the child ``key`` (of ``variant``) of study ``name``."""
    return {"variant": variant, KEY_TAG: key, PARENT_TAG: name, "mlflow.parentRunId": parent_id}
