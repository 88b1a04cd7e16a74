"""Sampler-mix comparisons: variants of one base config, each over several seeds, as MLflow runs
in one experiment and a table of test metrics (mean and standard deviation over seeds)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .config import ConfigError, load_config
from .experiment import train

log = logging.getLogger(__name__)
METRICS = ("ndcg@10", "map@10", "recall@10", "ndcg@50")


@dataclass
class ComparisonSpec:
    name: str
    base: str
    seeds: list[int]
    variants: dict[str, list[str]]  # variant -> --set overrides
    overrides: list[str] = field(default_factory=list)  # applied to every variant

    @classmethod
    def load(cls, path: str | Path) -> "ComparisonSpec":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"comparison spec not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - {"name", "base", "seeds", "variants", "set"}
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: base, name, seeds, set, variants")
        for key in ("name", "base", "variants"):
            if key not in raw:
                raise ConfigError(f"{path}: missing key {key!r}")
        variants = {str(k): list(v or []) for k, v in raw["variants"].items()}
        return cls(raw["name"], raw["base"], list(raw.get("seeds", [0])), variants, list(raw.get("set", [])))


def run_comparison(spec: ComparisonSpec, tracking_uri: str | None = None) -> dict:
    """Every variant x seed, trained and tracked; returns {variant: {metric: [values]}}."""
    configs = {}
    for variant, sets in spec.variants.items():  # check every config before training any
        for seed in spec.seeds:
            overrides = [*spec.overrides, *sets, f"train.seed={seed}", f"name={spec.name}-{variant}-s{seed}",
                         f"tracking.experiment={spec.name}", f"tracking.run_name={variant}-s{seed}"]
            if tracking_uri:
                overrides.append(f"tracking.uri={tracking_uri}")
            configs[variant, seed] = load_config(spec.base, overrides)
    results: dict = {v: {m: [] for m in METRICS} for v in spec.variants}
    results["MostPop"] = {m: [] for m in METRICS}
    for (variant, seed), config in configs.items():
        log.info("comparison %s: %s seed %d", spec.name, variant, seed)
        out = train(config)
        for m in METRICS:
            results[variant][m].append(out.test[m])
            if variant == next(iter(spec.variants)):
                results["MostPop"][m].append(out.mostpop_test[m])
    return results


def table(results: dict) -> str:
    """Markdown: mean ± sd over seeds for each variant."""
    lines = ["| variant | " + " | ".join(METRICS) + " | seeds |", "|---|" + "---|" * (len(METRICS) + 1)]
    for variant, metrics in results.items():
        cells = []
        for m in METRICS:
            v = np.asarray(metrics[m])
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {len(metrics[METRICS[0]])} |")
    return "\n".join(lines)


def to_json(results: dict) -> str:
    return json.dumps(results, indent=1)
