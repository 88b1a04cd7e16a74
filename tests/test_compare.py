"""Comparisons of an experiment's runs: mean ± sd over seeds, paired bootstrap CI over users."""

import numpy as np
import pandas as pd
import pytest

from conftest import small_config
from recsys_hnm.cli import main
from recsys_hnm.studies.compare import RunRecord, by_history, by_history_markdown, compare_runs, comparison_markdown, paired_bootstrap
from recsys_hnm.experiment import train


def test_paired_bootstrap_collapses_on_a_constant_ratio_and_matches_a_reference():
    base = np.array([0.1, 0.3, 0.2, 0.4])
    assert paired_bootstrap(2 * base, base) == pytest.approx((1.0, 1.0, 1.0))
    rng = np.random.default_rng(5)
    a, b = rng.random(50), rng.random(50)
    change, lo, hi = paired_bootstrap(a, b, n_boot=500, seed=3, chunk=7)
    ref_rng = np.random.default_rng(3)  # the same draws, one resample at a time
    ratios = []
    for start in range(0, 500, 7):
        for idx in ref_rng.integers(0, 50, (min(7, 500 - start), 50)):
            ratios.append(a[idx].mean() / b[idx].mean() - 1)
    assert change == pytest.approx(a.mean() / b.mean() - 1)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(ratios, [2.5, 97.5])))
    assert lo < change < hi
    with pytest.raises(ValueError, match="paired arrays"):
        paired_bootstrap(a, b[:10])


def _record(variant, seed, ndcg_users):
    users = pd.DataFrame({"user": range(len(ndcg_users)), "user_id": [f"u{i}" for i in range(len(ndcg_users))],
                          "ndcg@10": ndcg_users})
    metrics = {"test.ndcg_at_10": float(np.mean(ndcg_users)), "train_s": 10.0 + seed, "neg.uniform.false_negative_rate": 0.01 * (seed + 1)}
    return RunRecord(f"{variant}{seed}", variant, metrics, users)


def test_compare_runs_by_hand():
    records = [_record("base", 0, [0.2, 0.4]), _record("base", 1, [0.4, 0.2]),
               _record("hard", 0, [0.3, 0.6]), _record("hard", 1, [0.5, 0.4])]
    frame = compare_runs(records, "ndcg@10", baseline="base", metrics=("ndcg@10",), n_boot=200).set_index("variant")
    # hard: seed means 0.45 and 0.45 -> mean 0.45, sd 0; base: 0.3 and 0.3
    assert frame.loc["hard", "ndcg@10"] == pytest.approx(0.45) and frame.loc["hard", "ndcg@10 sd"] == pytest.approx(0.0)
    assert frame.loc["base", "ndcg@10"] == pytest.approx(0.3)
    # per user over seeds: hard (0.4, 0.5), base (0.3, 0.3): change 0.45 / 0.3 - 1 = +50%
    assert frame.loc["hard", "change"] == pytest.approx(0.5)
    # two users: resamples are (u0,u0) 0.4/0.3, (u1,u1) 0.5/0.3, mixed 0.45/0.3
    assert 1 / 3 - 1e-9 <= frame.loc["hard", "ci_low"] <= frame.loc["hard", "ci_high"] <= 2 / 3 + 1e-9
    assert frame.loc["hard", "train_s"] == pytest.approx(10.5)
    assert frame.loc["hard", "fnr.uniform"] == pytest.approx(0.015)
    assert np.isnan(frame.loc["base"].get("change", np.nan))
    text = comparison_markdown(frame.reset_index(), metrics=("ndcg@10",), baseline="base")
    assert "| hard | 2 | 0.4500 ± 0.0000 | +50.0% [" in text
    with pytest.raises(ValueError, match="baseline variant 'nope'"):
        compare_runs(records, baseline="nope")


def test_each_variant_is_set_beside_the_strongest_baseline():
    ease = _record("ease", 0, [0.3, 0.3, 0.3, 0.3])
    pop = _record("mostpop", 0, [0.1, 0.1, 0.1, 0.1])
    ease.baseline = pop.baseline = True
    records = [ease, pop, _record("good", 0, [0.5, 0.6, 0.4, 0.5]), _record("weak", 0, [0.2, 0.1, 0.2, 0.3])]
    frame = compare_runs(records, "ndcg@10", baseline="mostpop", metrics=("ndcg@10",), n_boot=200)
    rows = frame.set_index("variant")
    assert rows.loc["good", "best_baseline"] == "ease" and rows.loc["good", "vs_best"] == pytest.approx(0.5 / 0.3 - 1)
    assert "vs_best" not in rows.loc["ease"] or np.isnan(rows.loc["ease", "vs_best"])
    text = comparison_markdown(frame, metrics=("ndcg@10",), baseline="mostpop")
    assert "- `good` beats the best baseline, ease: ndcg@10 +66.7%" in text
    assert "- `weak` is below the best baseline, ease: ndcg@10 -33.3%" in text


def test_by_history_groups_users_by_their_history_and_pairs_within_each_group():
    history = [1, 3, 4, 9, 30]
    records = [_record("bag", 0, [0.2, 0.2, 0.4, 0.1, 0.5]), _record("seq", 0, [0.1, 0.3, 0.2, 0.2, 0.5]),
               _record("seq", 1, [0.3, 0.3, 0.4, 0.4, 0.5])]
    for r in records:
        r.per_user["history"] = history
    frame = by_history(records, [3, 4, 10], baseline="bag", n_boot=200).set_index("history")
    assert frame.index.tolist() == ["<= 3", "4", "5-10", "> 10"]
    assert frame["users"].tolist() == [2, 1, 1, 1]
    # <= 3: users 0 and 1; seq averages its seeds per user first: (0.2, 0.3) against bag's (0.2, 0.2)
    assert frame.loc["<= 3", "seq"] == pytest.approx(0.25) and frame.loc["<= 3", "bag"] == pytest.approx(0.2)
    assert frame.loc["<= 3", "seq change"] == pytest.approx(0.25)
    assert frame.loc["5-10", "seq change"] == pytest.approx(2.0)  # 0.3 against 0.1
    assert frame.loc["> 10", "seq change"] == pytest.approx(0.0) and frame.loc["> 10", "seq low"] == pytest.approx(0.0)
    text = by_history_markdown(frame.reset_index(), ["bag", "seq"], baseline="bag")
    assert "| 5-10 | 1 | 0.1000 | 0.3000 | +200.0% [+200.0%, +200.0%] |" in text
    with pytest.raises(ValueError, match="increasing"):
        by_history(records, [5, 5])
    del records[0].per_user["history"]  # a run logged before the column existed
    with pytest.raises(ValueError, match=r"\['bag'\] hold no history column"):
        by_history(records, [3])


def test_cli_compare_experiment_reads_the_store(synthetic_files, tmp_path, capsys):
    for variant, lr in (("slow", 0.001), ("fast", 0.01)):
        train(small_config(synthetic_files, tmp_path, name=variant, train={"epochs": 1, "lr": lr},
                           tracking={"tags": {"variant": variant}}))
    uri = small_config(synthetic_files, tmp_path).tracking.uri
    out = tmp_path / "table.md"
    assert main(["compare", "--experiment", "tests", "--baseline", "slow", "--output", str(out), "--tracking-uri", uri]) == 0
    text = out.read_text()
    assert "| fast | 1 |" in text and "ndcg@10 vs slow (95% CI)" in text
    assert out.with_suffix(".png").stat().st_size > 1000
    capsys.readouterr()  # the runs log each test user's history: the table per group comes from the store
    assert main(["compare", "--experiment", "tests", "--baseline", "slow", "--by-history", "10", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| history (items) | users | slow ndcg@10 | fast ndcg@10 | fast vs slow (95% CI) |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| <= 10", "| > 10"]
    assert main(["compare", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "experiment 'nope' not found" in capsys.readouterr().err
