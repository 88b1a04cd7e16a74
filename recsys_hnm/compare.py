"""Sampler-mix comparisons: variants of one base config, each over several seeds, as MLflow runs
in one experiment and a table of test metrics (mean and standard deviation over seeds)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ConfigError, check_name, load_config, read_yaml
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
        raw = read_yaml(path, "comparison spec")
        unknown = set(raw) - {"name", "base", "seeds", "variants", "set"}
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: base, name, seeds, set, variants")
        for key in ("name", "base", "variants"):
            if key not in raw:
                raise ConfigError(f"{path}: missing key {key!r}")

        def refuse(key: str, expected: str):
            return ConfigError(f"{path}: {key}: expected {expected}, got {raw.get(key)!r}")

        def strings(value) -> bool:
            return isinstance(value, list) and all(isinstance(v, str) for v in value)

        if not isinstance(raw["name"], str):
            raise refuse("name", "a string")
        check_name(raw["name"], f"{path}: name")  # part of every run's name, hence of checkpoint paths
        if not isinstance(raw["base"], str):
            raise refuse("base", "a config file path")
        seeds = raw.get("seeds", [0])
        if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds) and len(set(seeds)) == len(seeds)):
            raise refuse("seeds", "a non-empty list of distinct integers")
        if not strings(raw.get("set", [])):
            raise refuse("set", "a list of KEY=VALUE strings")
        if not (isinstance(raw["variants"], dict) and raw["variants"]):
            raise refuse("variants", "a non-empty mapping of variant name to a list of KEY=VALUE strings")
        variants = {}
        for name, sets in raw["variants"].items():
            if not strings(sets or []):
                raise ConfigError(f"{path}: variants.{name}: expected a list of KEY=VALUE strings, got {sets!r}")
            variants[str(name)] = list(sets or [])
        if "MostPop" in variants:
            raise ConfigError(f"{path}: variants: 'MostPop' is the name of the popularity baseline row")
        slugs: dict[str, str] = {}
        for name in variants:
            other = slugs.setdefault(_slug(name), name)
            if other != name:
                raise ConfigError(f"{path}: variants {other!r} and {name!r} give the same run name {_slug(name)!r}")
        return cls(raw["name"], raw["base"], seeds, variants, list(raw.get("set", [])))


def _slug(variant: str) -> str:
    """The variant label as a file-name-safe part of the run name (labels like '+ann[10,100)' are free text)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", variant)


def run_comparison(spec: ComparisonSpec, tracking_uri: str | None = None) -> dict:
    """Every variant x seed, trained and tracked; returns {variant: {metric: [values]}}."""
    configs = {}
    for variant, sets in spec.variants.items():  # check every config before training any
        for seed in spec.seeds:
            # json.dumps quotes the text values, so YAML reads them back as the same strings
            overrides = [*spec.overrides, *sets, f"train.seed={seed}", f"name={spec.name}-{_slug(variant)}-s{seed}",
                         f"tracking.experiment={json.dumps(spec.name)}", f"tracking.run_name={json.dumps(f'{variant}-s{seed}')}"]
            if tracking_uri:
                overrides.append(f"tracking.uri={json.dumps(tracking_uri)}")
            try:
                config = load_config(spec.base, overrides)
            except ConfigError as e:
                raise ConfigError(f"variant {variant!r}: {e}") from e
            missing = [m for m in METRICS if int(m.split("@")[1]) not in config.eval.ks]
            if missing:  # the test metrics hold only the Ks of eval.ks
                raise ConfigError(f"variant {variant!r}: eval.ks {config.eval.ks} lacks the K of {missing}, reported by the comparison table")
            configs[variant, seed] = config
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
