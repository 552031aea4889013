"""Federated config: defaults, shipped config files, overrides, phase switching, bad input."""
from pathlib import Path

import pytest

from zowarmup.federated.config import (ConfigError, RunConfig, apply_overrides, load_config,
                                       load_file, validate)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate_and_match_the_shipped_default_file():
    validate(RunConfig())
    # configs/digits.toml spells out the built-in default: they must not drift apart.
    assert load_file(CONFIGS / "digits.toml", RunConfig()).to_dict() == RunConfig().to_dict()
    d = RunConfig()
    assert (d.data.name, d.data.num_clients, d.data.alpha, d.data.hi_fraction) == ("digits", 50, 0.1, 0.1)
    assert d.method == "zowarmup" and d.baselines == ["high_res_only"] and d.zo.num_seeds == 20
    assert 0 < d.pivot < d.rounds


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    # GPU-scale configs name a data folder; validation does not read it.
    cfg = load_config(path, ["data.root=/nonexistent"])
    assert cfg.rounds >= 1 and cfg.method in ("zowarmup",)
    # the file sets keys explicitly (not an empty file that silently means "defaults")
    assert path.read_text().count("=") >= 2


def test_overrides_parse_toml_values_and_bare_strings():
    cfg = apply_overrides(RunConfig(), ["zo.num_seeds=7", "baselines=[]", "data.name=digits",
                                        "data.alpha=0.5", "progress=false",
                                        "model.options.hidden=[32, 16]", "data.root=none"])
    assert cfg.zo.num_seeds == 7 and cfg.baselines == [] and cfg.data.name == "digits"
    assert cfg.data.alpha == 0.5 and cfg.progress is False and cfg.model.options["hidden"] == [32, 16]
    assert cfg.data.root is None
    validate(cfg)
    # the original is untouched
    assert RunConfig().zo.num_seeds == 20


@pytest.mark.parametrize("item, key, allowed", [
    ("zo.nm_seeds=3", "zo.nm_seeds", "num_seeds"),
    ("round=3", "round", "rounds"),
    ("optim.lr=1", "optim.lr", "data"),
])
def test_unknown_keys_are_named_with_the_allowed_ones(item, key, allowed):
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), [item])
    assert key in str(e.value) and allowed in str(e.value)


@pytest.mark.parametrize("item, key, allowed", [
    ("method=fedsgd", "method", "'zowarmup'"),
    ("zo.dist=uniform", "zo.dist", "'rademacher', 'gaussian'"),
    ("warmup.server_opt=sgd", "warmup.server_opt", "'fedavg', 'fedadam'"),
    ("rounds=0", "rounds", "[1, 1000000]"),
    ("pivot=500", "pivot", "[0, 100]"),
    ("data.alpha=0", "data.alpha", "(0"),
    ("data.hi_fraction=1.5", "data.hi_fraction", "[0.0, 1.0]"),
    ("zo.num_seeds=2.5", "zo.num_seeds", "integer"),
    ("warmup.beta1=1.0", "warmup.beta1", "[0.0, 1.0)"),
    ("zo.eps=-1e-3", "zo.eps", "(0"),
    ("zo.sync=sometimes", "zo.sync", "'broadcast', 'lazy'"),
    ("zo.backend=gpu", "zo.backend", "'cpu'"),
    ("model.name=resnet50", "model.name", "'resnet18'"),
    ("model.norm=ln", "model.norm", "'bn'"),
    ("baselines=['zowarmup']", "baselines", "once"),
    ("baselines=['fedprox']", "baselines[0]", "'high_res_only'"),
    ("data.name=cifar10", "data.root", "required"),
    ("progress=1", "progress", "true, false"),
    ("data.hi_fraction=0.0", "data.hi_fraction", "high-resource"),
])
def test_bad_values_name_the_key_and_the_allowed_values(item, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    msg = str(e.value)
    assert f"'{key}'" in msg and allowed in msg, msg


def test_bad_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("rounds = [\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(p)
    p.write_text("[zo]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="zo.learning_rate"):
        load_config(p)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")
    j = tmp_path / "c.json"
    j.write_text('{"rounds": 7, "pivot": 3, "zo": {"num_seeds": 3}}')
    cfg = load_config(j)
    assert cfg.rounds == 7 and cfg.zo.num_seeds == 3


def test_phases_switch_at_the_pivot_for_each_method():
    cfg = load_config(None, ["rounds=10", "pivot=4"])
    phases = {m: [cfg.for_run(m, 0).phase(r) for r in range(10)]
              for m in ("zowarmup", "high_res_only", "zo_only", "fedkseed", "zowarmup_fedkseed",
                        "zowarmup_hilo")}
    assert phases["zowarmup"] == ["warmup"] * 4 + ["zo"] * 6
    assert phases["high_res_only"] == ["warmup"] * 10
    assert phases["zo_only"] == ["zo"] * 10
    assert phases["fedkseed"] == ["fedkseed"] * 10
    assert phases["zowarmup_fedkseed"] == ["warmup"] * 4 + ["fedkseed"] * 6
    assert phases["zowarmup_hilo"] == ["warmup"] * 4 + ["hilo"] * 6
    run = cfg.for_run("high_res_only", 5)
    assert run.pivot == 10 and run.seed == 5 and run.baselines == [] and run.num_seeds == 1
