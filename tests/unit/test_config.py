from pathlib import Path

import pytest
import yaml

from finch.config import ConfigError, EvalConfig, ServeConfig, SweepConfig, load_config, validate_config

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"name": "demo", "model": {"path": "some/model"}, "data": {"train_files": ["a.jsonl"]}}


def write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_defaults_are_filled_and_overrides_are_typed(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL), ["train.lr=1e-4", "data.packing=false", "lora.target_modules=[q_proj, v_proj]"]
    )
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.data.packing is False
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.model.trust_remote_code is False
    assert config.run_dir == (Path("runs").resolve() / "demo")


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    bad = {**MINIMAL, "train": {"learning_rate": 1e-4}}
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, bad))
    message = str(err.value)
    assert "'train.learning_rate'" in message
    assert "allowed keys here:" in message and "lr" in message and "epochs" in message


def test_unknown_override_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'data.max_lenght' \(did you mean 'max_length'\?\)"):
        load_config(write(tmp_path, MINIMAL), ["data.max_lenght=64"])


def test_bad_value_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["train.scheduler=cosyne"])
    assert "train.scheduler" in str(err.value)
    assert "'linear'" in str(err.value) and "'cosine'" in str(err.value) and "cosyne" in str(err.value)


def test_wrong_type_and_range_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(write(tmp_path, MINIMAL), ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        load_config(write(tmp_path, MINIMAL), ["data.eval_fraction=1.5"])


def test_missing_required_key_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'model.path'"):
        load_config(write(tmp_path, {**MINIMAL, "model": {}}))
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(write(tmp_path, MINIMAL), ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_eval_files_and_fraction_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="eval_files or data.eval_fraction"):
        load_config(write(tmp_path, MINIMAL), ["data.eval_files=[b.jsonl]", "data.eval_fraction=0.1"])


RUN_CONFIGS = sorted(p for p in (REPO / "jobs").rglob("*.yaml") if p.parent.name != "eval")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_run_config_validates(path):
    config = load_config(path)
    task_files = [f for task in config.train.eval_tasks for f in task.data.files]
    assert all((REPO / f).exists() for f in config.data.train_files + config.data.eval_files + task_files)


@pytest.mark.parametrize(
    "path", sorted((REPO / "jobs" / "eval").glob("*.yaml")), ids=lambda p: str(p.relative_to(REPO))
)
def test_every_shipped_eval_config_validates_and_builds_its_scorers(path):
    from finch.eval.metrics import TEXT_METRICS, text_scorer

    config = load_config(path, schema=EvalConfig)
    assert all((REPO / f).exists() for f in config.data.files)
    assert all(text_scorer(m) for m in config.metrics if m.name in TEXT_METRICS)


@pytest.mark.parametrize("path", sorted((REPO / "serve").glob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_serve_config_validates_and_is_private_or_keyed(path, monkeypatch):
    from finch.serve.app import LOOPBACK, build_application

    config = load_config(path, schema=ServeConfig)
    if config.server.host in LOOPBACK:
        return
    # Exposed beyond this machine: without the key in its environment variable the server refuses to start.
    monkeypatch.delenv(config.server.api_key_env, raising=False)
    with pytest.raises(ConfigError, match=rf"server.host {config.server.host} exposes .*\${config.server.api_key_env}"):
        build_application(config, model=None)


@pytest.mark.parametrize("path", sorted((REPO / "tune").glob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_sweep_config_validates_with_every_searched_value(path, monkeypatch):
    from finch.tune.sweep import base_run_config, check_space

    monkeypatch.chdir(REPO)  # sweeps name their run config relative to the repository root
    sweep = load_config(path, schema=SweepConfig)
    check_space(sweep, base_run_config(sweep))


def test_sweep_spaces_are_checked_before_anything_runs():
    def sweep(space, algorithm="random"):
        return validate_config(
            {"name": "s", "run": "r.yaml", "search": {"algorithm": algorithm, "space": space}}, schema=SweepConfig
        )

    with pytest.raises(ConfigError, match="search.space.train.lr.loguniform: low must be below high"):
        sweep({"train.lr": {"loguniform": [1e-3, 1e-5]}})
    with pytest.raises(ConfigError, match="cannot search data.max_length"):
        sweep({"data.max_length": {"choice": [128, 256]}})
    with pytest.raises(ConfigError, match="algorithm grid takes"):
        sweep({"train.lr": {"choice": [1e-4]}}, algorithm="grid")
    with pytest.raises(ConfigError, match="give exactly one of"):
        sweep({"train.lr": {"choice": [1e-4], "grid": [1e-3]}})
    # Trials that continue a registry adapter take its shape: varying it would fail each trial at load.
    from finch.tune.sweep import check_space

    continued = validate_config({**MINIMAL, "lora": {"init_adapter": "sft@v1"}})
    check_space(sweep({"train.lr": {"choice": [1e-4, 1e-3]}}), continued)
    for key in ("lora.r", "lora.alpha"):
        with pytest.raises(
            ConfigError, match=rf"search.space.{key}: the adapter's shape is lora.init_adapter's \(sft@v1\)"
        ):
            check_space(sweep({key: {"choice": [8, 16]}}), continued)
    check_space(sweep({"lora.r": {"choice": [8, 16]}}), validate_config(MINIMAL))


def test_unparseable_override_and_cross_field_errors_read_cleanly(tmp_path):
    with pytest.raises(ConfigError, match=r"override train.lr: cannot parse value '\[1'"):
        load_config(write(tmp_path, MINIMAL), ["train.lr=[1"])
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["data.eval_files=[b.jsonl]", "data.eval_fraction=0.1"])
    assert "got" not in str(err.value) and "(top level)" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["lora.target_modules=7"])
    assert str(err.value).count("lora.target_modules:") == 2 and "list[" not in str(err.value)


def test_bad_run_names_are_refused(tmp_path):
    for name in ("../up", "a/b", ".hidden", "x" * 65, "trailing\n"):
        with pytest.raises(ConfigError, match="name"):
            load_config(write(tmp_path, {**MINIMAL, "name": name}))


def test_on_demand_patterns_are_names_and_leave_room_for_one_adapter():
    base = {"model": {"path": "/m"}, "adapters": ["a", "b"], "on_demand": ["support-*"]}
    assert validate_config(base, schema=ServeConfig).on_demand == ["support-*"]
    with pytest.raises(ConfigError, match="on_demand.0"):
        validate_config({**base, "on_demand": ["../x"]}, schema=ServeConfig)
    with pytest.raises(
        ConfigError, match=r"max_cpu_loras \(3\) holds fewer adapters than the 2 in adapters plus one on-demand slot"
    ):
        validate_config({**base, "engine": {"max_loras": 2, "max_cpu_loras": 3}}, schema=ServeConfig)


def test_online_rl_settings_are_checked_together_and_survive_the_workers_round_trip():
    from finch.config import dump_config

    grpo = {**MINIMAL, "train": {"objective": "grpo", "batch_size": 4}}
    rewards = {"rewards": ["numeric_match", {"name": "length_penalty", "max_tokens": 64, "soft_tokens": 16}]}
    config = validate_config({**grpo, "grpo": {"num_generations": 4, **rewards}})
    # the workers validate the config the driver dumped, with every default written out
    assert validate_config(dump_config(config)) == config
    for settings, message in [
        ({}, "grpo needs grpo.rewards"),
        ({**rewards, "num_generations": 3}, r"num_generations \(3\) must divide .* = 4"),
        ({"rewards": [{"name": "length_penalty"}]}, "needs 'max_tokens'"),
        ({"rewards": [{"name": "perplexity"}]}, "length_penalty"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_config({**grpo, "grpo": {"num_generations": 4, **settings}})
    full = validate_config(
        {**grpo, "train": {**grpo["train"], "method": "full"}, "grpo": {"num_generations": 4, **rewards}}
    )
    assert validate_config(dump_config(full)) == full  # a fully fine-tuned policy: whole weights to the engine
    with pytest.raises(ConfigError, match="train.eval_tasks"):
        validate_config(
            {**grpo, "data": {**MINIMAL["data"], "eval_fraction": 0.1}, "grpo": {"num_generations": 4, **rewards}}
        )
    rloo = {**grpo, "train": {"objective": "rloo", "batch_size": 4}}
    config = validate_config({**rloo, "grpo": {"num_generations": 4, "normalize_advantages": True, **rewards}})
    assert validate_config(dump_config(config)) == config
    with pytest.raises(ConfigError, match="grpo.loss_type is used by train.objective grpo only"):
        validate_config({**rloo, "grpo": {"num_generations": 4, "loss_type": "grpo", **rewards}})
    with pytest.raises(ConfigError, match="grpo.normalize_advantages is used by train.objective rloo only"):
        validate_config({**grpo, "grpo": {"num_generations": 4, "normalize_advantages": True, **rewards}})
