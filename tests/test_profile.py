"""The data profile on hand-built splits, the "auto" rules, the validation check and the MostPop warning."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from recsys_hnm.config import ConfigError, load_config
from recsys_hnm.data import Interactions, fixed_split
from recsys_hnm.data.profile import DataProfile, profile_split, suggest_settings
from recsys_hnm.evaluation import Evaluator
from recsys_hnm.experiment import choose_settings, load_data, train

from conftest import small_config


def _split(rows):
    """rows: (user, item, timestamp, phase)."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "phase"])
    return fixed_split(Interactions.from_frames(frame, keep_columns=("phase",), duplicates="keep"))  # repeats stay


def test_profile_of_a_temporal_split():
    split = _split([(1, "a", 1, "train"), (1, "b", 2, "train"), (1, "c", 3, "valid"), (1, "d", 4, "test"),
                    (2, "a", 1, "train"), (2, "c", 5, "train"), (2, "b", 6, "valid"), (2, "e", 7, "test")])
    p = profile_split(split)
    assert (p.heldout_after, p.heldout_tied, p.heldout_interleaved) == (1.0, 0.0, 0.0)
    assert p.protocol == "temporal" and p.train_ties == 0.0 and p.repeat_rate == 0.0
    assert p.history_median == 2.0 and p.items == 5 and p.train_events == 4
    t = profile_split(split, "test")  # against train + valid: 'e' and 'd' come after them too
    assert t.heldout_after == 1.0 and t.train_events == 6 and t.cold_heldout_items == 1.0


def test_profile_of_a_random_split_with_repeats():
    # user 1's held-out 'c' sits between training events; user 2 buys 'a' again
    split = _split([(1, "a", 1, "train"), (1, "c", 2, "valid"), (1, "b", 3, "train"), (1, "d", 4, "test"),
                    (2, "a", 1, "train"), (2, "b", 5, "train"), (2, "a", 9, "valid"), (2, "d", 10, "test")])
    p = profile_split(split)
    assert p.heldout_interleaved == 0.5 and p.heldout_after == 0.5
    assert p.repeat_rate == 0.5 and p.protocol == "random"


def test_profile_of_baskets_with_tied_timestamps():
    # each user's baskets share one timestamp; the held-out basket comes at a later time
    rows = []
    for u in (1, 2, 3):
        rows += [(u, "a", 10, "train"), (u, "b", 10, "train"), (u, "c", 20, "train"), (u, "d", 20, "train"),
                 (u, "e", 30, "valid"), (u, "f", 40, "test")]
    p = profile_split(_split(rows))
    assert p.train_ties == 1.0 and p.baskets and p.heldout_after == 1.0
    assert p.protocol == "basket"
    # a held-out event at the very time of the user's last training events
    q = profile_split(_split([(1, "a", 10, "train"), (1, "b", 20, "train"), (1, "c", 20, "valid"), (1, "d", 30, "test")]))
    assert q.heldout_tied == 1.0 and q.protocol == "basket"


def test_profile_without_timestamps_is_random():
    frame = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 2], "item_id": list("abcabd"),
                          "phase": ["train", "valid", "test", "train", "valid", "test"]})
    p = profile_split(fixed_split(Interactions.from_frames(frame, keep_columns=("phase",))))
    assert p.heldout_after is None and p.protocol == "random"


def _profile(**kw):
    base = dict(users=1000, items=10_000, train_events=50_000, heldout_after=1.0, heldout_tied=0.0, heldout_interleaved=0.0,
                train_ties=0.0, repeat_rate=0.0, top1pct_share=0.1, history_median=50.0, history_mean=60.0, cold_heldout_items=0.0)
    return DataProfile(**{**base, **kw})


def test_rules_follow_the_protocol():
    temporal = suggest_settings(_profile())
    assert temporal["model.train_history"][0][0] == "causal" and temporal["model.history_decay"][0][0] == 0.5
    random = suggest_settings(_profile(heldout_after=0.1, heldout_interleaved=0.9))
    assert random["model.train_history"][0][0] == "all" and random["model.history_decay"][0][0] == 1.0
    baskets = suggest_settings(_profile(train_ties=0.8))
    assert baskets["model.train_history"][0][0] == "all" and baskets["model.temperature"][0][0] == 0.25
    # every rule leaves its other value as the alternative validation may pick
    assert [v for v, _ in temporal["model.train_history"]] == ["causal", "all"]


def test_rules_for_temperature_and_user_id():
    assert suggest_settings(_profile(history_median=4.0))["model.temperature"][0][0] == 0.05
    assert [v for v, _ in suggest_settings(_profile())["model.temperature"]] == [0.1, 0.05, 0.25]
    assert suggest_settings(_profile(items=500))["model.temperature"][0][0] == 0.25
    assert [v for v, _ in suggest_settings(_profile(history_median=4.0))["model.user_id"]] == [False]
    assert [v for v, _ in suggest_settings(_profile(history_median=50.0))["model.user_id"]] == [False, True]
    assert suggest_settings(_profile())["model.item_bias"][0][0] is True


def test_auto_values_are_checked():
    assert load_config(None, ["model.temperature=auto"]).model.temperature == "auto"
    for bad, key in (("model.temperature=warm", "model.temperature"), ("model.user_id=maybe", "model.user_id"),
                     ("model.train_history=later", "model.train_history"), ("auto.budget=-2", "auto.budget")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


AUTO = {"temperature": "auto", "item_bias": "auto", "train_history": "auto", "history_decay": "auto", "user_id": "auto"}


def test_rules_alone_resolve_every_auto_key(synthetic_files, tmp_path):
    config = small_config(synthetic_files, tmp_path, model=AUTO)
    data, split = load_data(config)
    resolved, selection = choose_settings(config, data, split)
    picks = {k: opts[0][0] for k, opts in suggest_settings(selection.profile).items()}
    assert {k: getattr(resolved.model, k.split(".")[1]) for k in picks} == picks
    assert selection.probes == [] and all(why.startswith("rule:") for _, why in selection.choices.values())


def test_selection_reads_no_test_data_and_is_deterministic(synthetic_files, tmp_path, monkeypatch):
    config = small_config(synthetic_files, tmp_path, model=AUTO, auto={"budget": 3, "probe_epochs": 2})
    data, split = load_data(config)
    phases = []
    real = Evaluator.__init__

    def spy(self, split, phase="valid", *a, **kw):
        phases.append(phase)
        real(self, split, phase, *a, **kw)

    monkeypatch.setattr(Evaluator, "__init__", spy)
    first, sel = choose_settings(config, data, split)
    assert len(sel.probes) == 3 and set(phases) == {"valid"}
    # the test phase replaced by other events: the same choice
    scrambled = type(split)(split.data, split.train, split.valid, split.test.assign(item=np.roll(split.test["item"].to_numpy(), 7)),
                            dict(split.report))
    second, sel2 = choose_settings(config, data, scrambled)
    assert first == second and [p["valid"] for p in sel.probes] == [p["valid"] for p in sel2.probes]


def test_a_validation_winner_replaces_the_rule(synthetic_files, tmp_path, monkeypatch):
    import recsys_hnm.experiment.run as experiment

    config = small_config(synthetic_files, tmp_path, model=AUTO, auto={"budget": 2, "probe_epochs": 1})
    data, split = load_data(config)
    options = suggest_settings(profile_split(split))
    first_key = "model.train_history"
    alternative = options[first_key][1][0]
    noise = np.random.default_rng(0).normal(0, 0.05, 400)
    # per-user validation figures: the rule's pick, then its first alternative, clearly better
    results = iter([np.full(400, 0.1), 0.2 + noise])
    monkeypatch.setattr(experiment, "_probe", lambda *a, **kw: (float((r := next(results)).mean()), [0.0], r))
    resolved, selection = choose_settings(config, data, split)
    assert resolved.model.train_history == alternative
    assert selection.choices[first_key][1].startswith("validation:")
    # a gain within the noise of the paired per-user differences leaves the rule's pick
    results = iter([np.full(400, 0.1), 0.101 + noise])
    resolved, selection = choose_settings(config, data, split)
    assert resolved.model.train_history == options[first_key][0][0]
    assert selection.choices[first_key][1].startswith("rule:") and "paired gain" in selection.choices[first_key][1]


def _tags(run_id, uri):
    mlflow.set_tracking_uri(uri)
    return mlflow.get_run(run_id).data.tags


def test_train_logs_profile_choices_and_mostpop_check(synthetic_files, tmp_path, capsys):
    from recsys_hnm.cli import main

    config = small_config(synthetic_files, tmp_path, model=AUTO)
    uri = config.tracking.uri
    args = ["train", "--train", str(synthetic_files["train"]), "--valid", str(synthetic_files["valid"]),
            "--test", str(synthetic_files["test"]), "--items", str(synthetic_files["items"]), "--tracking-uri", uri, "--no-progress",
            "--set", "model.dim=32", "--set", "train.epochs=3", "--set", "train.checkpoint_dir=" + str(tmp_path / "ckpt"),
            "--set", "sampler.num_negatives=64", "--set", "train.batch_size=256"]
    for key in AUTO:
        args += ["--set", f"model.{key}=auto"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    run_id = out[-1].split("=", 1)[1]
    assert any(line.startswith("model.train_history:") for line in out) and any("protocol" in line for line in out)
    tags = _tags(run_id, uri)
    assert tags["profile.protocol"] in ("temporal", "random", "basket") and tags["auto.model.temperature"]
    assert tags["beats_mostpop"] == "true" and "warning" not in tags
    params = mlflow.get_run(run_id).data.params
    assert params["model.temperature"] != "auto"  # the resolved value is the logged param


def test_the_mostpop_warning_appears_when_the_model_loses(synthetic_files, tmp_path):
    # a learning rate that cannot learn: the model stays at its random start, below MostPop
    config = small_config(synthetic_files, tmp_path, train={"lr": 1e-9, "epochs": 1})
    result = train(config)
    assert any(line.startswith("WARNING: the model does not beat MostPop") for line in result.summary)
    tags = _tags(result.run_id, config.tracking.uri)
    assert tags["beats_mostpop"] == "false" and "MostPop" in tags["warning"]
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/auto_selection.json"))
    assert logged["profile"]["protocol"] == tags["profile.protocol"]


def test_last_basket_out_holds_out_each_users_last_two_baskets():
    frame = pd.DataFrame({
        "user_id": [1] * 7 + [2] * 3,
        "item_id": list("abcdefg") + list("abc"),
        "timestamp": [1, 1, 2, 3, 3, 4, 4] + [1, 2, 3],
        "basket_id": [10, 10, 11, 12, 12, 13, 13] + [20, 21, 21],
    })
    from recsys_hnm.data import last_basket_out

    split = last_basket_out(Interactions.from_frames(frame))
    items = lambda part: sorted(split.data.items.to_raw(part[part["user"] == 0]["item"]).tolist())  # noqa: E731
    assert items(split.test) == ["f", "g"] and items(split.valid) == ["d", "e"] and items(split.train) == ["a", "b", "c"]
    assert split.report["users_too_short_for_valid_test"] == 1 and (split.train["user"] == 1).sum() == 3
    assert profile_split(split).protocol == "basket"
