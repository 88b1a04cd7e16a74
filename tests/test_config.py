import pytest

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
        ({"sampler": {"select": {"rest": "summarise"}}}, r"sampler.select.rest: 'summarise' .* not 'none'"),
        ({"sampler": {"select": {"mode": "hardest", "rest": "summarise"}, "memory_bank": {"size": 64}}},
         r"sampler.select.rest: .* no memory bank"),
        ({"sampler": {"select": {"mode": "semi_hard", "rank": "share"}}}, r"sampler.select.rank: 'share' ranks the hardest"),
        ({"name": "../x"}, r"name: '../x' must be a simple file name"),
        ({"name": "runs/x"}, r"name: 'runs/x' must be a simple file name"),
        ({"name": ""}, r"name: '' must be a simple file name"),
        ({"train": {"lr": "1e-3x"}}, r"train.lr: expected a number, got '1e-3x'"),
        ({"train": {"epochs": "1e3"}}, r"train.epochs: expected an integer, got '1e3'"),
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


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3, having no dot, as the string '1e-3'
    path = tmp_path / "c.yaml"
    path.write_text("name: sci\ntrain: {lr: 5e-3, weight_decay: 1E-6}\nsampler: {mixture: {in_batch: 1, uniform: 2.5e-1}}\n")
    config = load_config(path, ["model.temperature=5e-2", "sampler.ann.window=[1e1, 1e+2]"])
    assert config.train.lr == 0.005 and config.train.weight_decay == 1e-6
    assert config.sampler.mixture == {"in_batch": 1.0, "uniform": 0.25}
    assert config.model.temperature == 0.05 and config.sampler.ann.window == [10.0, 100.0]
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001
    assert isinstance(load_config(None, ["train.lr=1e-3"]).flat()["train.lr"], float)


@pytest.mark.parametrize("text, message", [
    ("", "the config file is empty"),
    ("# only a comment\n", "the config file is empty"),
    ("[]\n", "the top level must be a mapping, got list"),
    ("just text\n", "the top level must be a mapping, got str"),
    ("train: {lr: [1,\n", "invalid YAML"),
])
def test_config_file_must_be_a_mapping(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_logged_configs_keep_their_old_names():
    # runs logged before names were restricted (e.g. 'compare-ann-+ann[10,100)-s0') must still load
    assert config_from_dict({"name": "compare-ann-+ann[10,100)-s0"}, logged=True).name == "compare-ann-+ann[10,100)-s0"


def test_a_scalar_section_is_blamed_on_the_file_not_on_an_override(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train: expected a mapping \(a section\), got 5"):
        load_config(path, ["train.progress=false"])
