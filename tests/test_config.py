import pytest

from recsys_hnm.cli import main
from recsys_hnm.config import ConfigError, config_from_dict, load_config


def test_shipped_configs_load():
    for name in ("quickstart", "mixed", "ann"):
        config = load_config(f"pipelines/{name}.yaml")
        assert config.name == name
    assert load_config("pipelines/quickstart.yaml").sampler.mixture == {"in_batch": 1.0, "uniform": 1.0}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"lrate": 0.1}}, r"unknown config key\(s\): \['train.lrate'\]"),
        ({"optimiser": {}}, r"unknown config key\(s\): \['optimiser'\]"),
        ({"train": {"epochs": "ten"}}, r"train.epochs: expected an integer, got 'ten'"),
        ({"train": {"progress": "yes"}}, r"train.progress: expected true or false"),
        ({"model": {"hidden": 128}}, r"model.hidden: expected a list"),
        ({"train": {"lr": -0.001}}, r"train.lr: must be > 0, got -0.001"),
        ({"eval": {"ks": [10, 0]}}, r"eval.ks\[1\]: must be > 0, got 0"),
        ({"model": {"temperature": 0}}, r"model.temperature: must be > 0"),
        ({"data": {"split": "random"}}, r"data.split: 'random' is not one of"),
        ({"train": {"monitor": "auc@10"}}, r"train.monitor: 'auc@10' must be one of"),
        ({"train": {"monitor": "ndcg@5"}}, r"train.monitor: 'ndcg@5' must be one of .* a K in eval.ks"),
        ({"data": {"train": "missing.csv", "valid": "v.csv", "test": "t.csv"}}, r"data.train: file not found: missing.csv"),
        ({"data": {"train": "a.csv"}}, r"data.train, data.valid and data.test must be given together"),
        ({"sampler": {"logq": "sometimes"}}, r"sampler.logq: 'sometimes' is not one of"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_overrides_are_typed_and_checked(tmp_path):
    config = load_config("pipelines/quickstart.yaml", ["train.epochs=3", "sampler.mixture={uniform: 1.0}", "eval.ks=[5, 10]"])
    assert config.train.epochs == 3 and config.sampler.mixture == {"uniform": 1.0} and config.eval.ks == [5, 10]
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    flat = config.flat()
    assert flat["train.epochs"] == 3 and flat["sampler.mixture"] == {"uniform": 1.0}


def test_cli_refuses_bad_config_before_training(capsys):
    assert main(["train", "--config", "pipelines/quickstart.yaml", "--set", "train.lr=-1"]) == 2
    assert "train.lr: must be > 0" in capsys.readouterr().err
    assert main(["train", "--config", "pipelines/quickstart.yaml", "--set", "eval.ks=[0]"]) == 2
    assert "eval.ks[0]" in capsys.readouterr().err
