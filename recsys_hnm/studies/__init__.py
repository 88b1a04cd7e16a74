"""Many runs: batch pipelines (variants x seeds x baselines as MLflow child runs), the Optuna
search, and the comparison of their runs (tables, paired bootstrap, plots). Import the modules:
``studies.pipeline``, ``studies.search``, ``studies.compare``."""
