"""GRPO rewards: the functions TRL calls on each batch of completions, built from reward configs."""

import pytest

from finch.config import REWARDS, ConfigError, GrpoConfig, RewardConfig, validate_config
from finch.eval.metrics import TEXT_METRICS
from finch.rl.rewards import reward_functions
from finch.train.plots import plot_loss, reward_terms


def rewards(*specs: dict | str) -> tuple[list, list[float]]:
    return reward_functions([RewardConfig.model_validate(spec) for spec in specs])


def call_like_trl(function, completions: list[str], references: list[str | None], logged: dict | None = None):
    """One batch, passed the way TRL 1.16's GRPOTrainer passes it: token-id prompts, columns as lists."""
    count = len(completions)
    return function(
        prompts=[[1, 2, 3]] * count,
        completions=completions,
        completion_ids=[[7] * len(text.split()) for text in completions],
        reference=references,
        messages=[[{"role": "user", "content": "Question?"}]] * count,
        source=[f"train.jsonl:{line}" for line in range(1, count + 1)],
        trainer_state=None,
        log_extra=lambda column, values: None,
        log_metric=(lambda name, value: logged.__setitem__(name, value)) if logged is not None else None,
    )


def test_numeric_match_scores_gsm8k_answers_against_references():
    [numeric], _ = rewards("numeric_match")
    completions = ["She sold 48 + 24 = 72 clips.\n#### 72", "#### 70", "I do not know"]
    assert call_like_trl(numeric, completions, ["#### 72"] * 3) == [1.0, 0.0, 0.0]


def test_regex_and_json_schema_rewards():
    schema = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
    [regex, shaped], _ = rewards(
        {"name": "regex", "pattern": r"<answer>\d+</answer>"}, {"name": "json_schema", "schema": schema}
    )
    assert call_like_trl(regex, ["so <answer>72</answer>", "<answer>seventy</answer>"], [None, None]) == [1.0, 0.0]
    completions = ['{"answer": 72}', '```json\n{"answer": 72}\n```', '{"answer": "72"}', "72"]
    assert call_like_trl(shaped, completions, [None] * 4) == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "tokens, expected",
    [(1, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0), (101, -1.0), (500, -1.0)],
)
def test_length_penalty_is_dapo_soft_overlong_punishment(tokens, expected):
    [penalty], _ = rewards({"name": "length_penalty", "max_tokens": 100, "soft_tokens": 20})
    [score] = penalty(prompts=[[1]], completions=["x"], completion_ids=[[5] * tokens], reference=[None])
    assert score == pytest.approx(expected)


def test_length_penalty_without_soft_zone_punishes_only_past_max_tokens():
    [penalty], _ = rewards({"name": "length_penalty", "max_tokens": 100})
    assert penalty(completions=["x"] * 2, completion_ids=[[5] * 100, [5] * 101]) == [0.0, -1.0]


def test_weights_come_back_in_order_and_names_are_the_keys():
    functions, weights = rewards(
        "numeric_match",
        {"name": "json_valid", "label": "is_json", "weight": 0.25},
        {"name": "length_penalty", "max_tokens": 64, "soft_tokens": 16, "weight": -2},
    )
    assert weights == [1.0, 0.25, -2.0]
    assert [function.__name__ for function in functions] == ["numeric_match", "is_json", "length_penalty"]


def test_prompt_only_rows_give_none_for_reference_metrics_only():
    [exact, numeric, json_valid], _ = rewards("exact_match", "numeric_match", "json_valid")
    completions, references = ['{"a": 1}', "It is 3."], [None, "3"]
    assert call_like_trl(exact, completions, references) == [None, 0.0]
    assert call_like_trl(numeric, completions, references) == [None, 1.0]
    assert call_like_trl(json_valid, completions, references) == [1.0, 0.0]


def test_python_reward_gets_answer_reference_and_example(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "seen = []\n"
        "def graded(answer, reference, example):\n"
        "    seen.append((answer, reference, example))\n"
        "    return answer.strip() == reference\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    [graded], _ = rewards({"name": "python", "function": "my_rewards:graded"})
    assert call_like_trl(graded, [" 72 ", "71"], ["72", "72"]) == [1.0, 0.0]
    import my_rewards

    # what finch eval passes too, so one function serves both
    example = {"messages": [{"role": "user", "content": "Question?"}], "source": "train.jsonl:1"}
    assert my_rewards.seen[0] == (" 72 ", "72", example)


def test_a_completion_that_cannot_be_scored_gives_none_and_is_counted():
    [field], _ = rewards({"name": "json_field", "field": "answer"})
    logged: dict = {}
    # The second row's reference has no "answer" field: a dataset problem (MetricError), not a wrong answer.
    scores = call_like_trl(field, ['{"answer": 1}', '{"answer": 1}'], ['{"answer": 1}', '{"other": 1}'], logged)
    assert scores == [1.0, None]
    assert logged == {"rewards/json_field/errors": 1}


def test_settings_are_checked_when_the_functions_are_built():
    with pytest.raises(ConfigError, match="schema is not a valid JSON schema"):
        rewards({"name": "json_schema", "schema": {"type": "integr"}})
    with pytest.raises(ConfigError, match="cannot import function 'no_such_module:f'"):
        rewards({"name": "python", "function": "no_such_module:f"})


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "length_penalty"}, "reward length_penalty needs 'max_tokens'"),
        (
            {"name": "length_penalty", "max_tokens": 64, "soft_tokens": 64},
            r"soft_tokens \(64\) must be below max_tokens \(64\)",
        ),
        ({"name": "numeric_match", "max_tokens": 64}, "reward numeric_match does not use 'max_tokens'"),
        (
            {"name": "regex", "label": "tagged", "pattern": "x", "text": "y"},
            r"reward tagged \(regex\) does not use 'text'",
        ),
        ({"name": "perplexity"}, r"rewards.0.name: Input should be .*'numeric_match'.*'length_penalty'"),
        ({"name": "exact_match", "weight": float("nan")}, "rewards.0.weight: Input should be a finite number"),
    ],
)
def test_bad_reward_config_names_the_problem(spec, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"rewards": [spec]}, schema=GrpoConfig)


def test_two_rewards_with_one_key_are_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"rewards \['numeric_match'\] appear twice"):
        validate_config({"rewards": ["numeric_match", {"name": "numeric_match", "weight": 0.5}]}, schema=GrpoConfig)
    functions, _ = rewards("numeric_match", {"name": "numeric_match", "label": "numeric_again"})
    assert [function.__name__ for function in functions] == ["numeric_match", "numeric_again"]


def test_rewards_are_the_eval_text_metrics_the_length_penalty_and_reward_models():
    assert set(REWARDS) == TEXT_METRICS | {"length_penalty", "reward_model"}


def test_a_registry_reward_model_scores_each_prompt_and_completion(tmp_path, tiny_model_dir):
    """A LoRA reward model from the registry, pinned and checked against the run, scores a batch of
    completions (padded, in chunks) exactly as it scores each prompt + completion alone."""
    import torch

    from finch.registry.models import check_reward_models, load_reward_model, pin_reward_models
    from finch.registry.store import resolve_entry
    from tests.conftest import model_source, register_adapter, register_reward_model, run_config_dict

    registry = tmp_path / "registry"
    judge = register_reward_model(registry, tiny_model_dir, "judge")
    register_adapter(registry, tiny_model_dir, "sft")

    def run_config(model: str):
        rewards = [{"name": "reward_model", "model": model}]
        train = {"objective": "grpo", "batch_size": 4}
        return validate_config(
            run_config_dict(
                tmp_path, tiny_model_dir, ["p.jsonl"], train=train, grpo={"num_generations": 4, "rewards": rewards}
            )
        )

    with pytest.raises(ConfigError, match=r"needs 'model' \(a reward model in the registry"):
        validate_config(
            run_config_dict(
                tmp_path,
                tiny_model_dir,
                ["p.jsonl"],
                train={"objective": "grpo"},
                grpo={"num_generations": 2, "rewards": ["reward_model"]},
            )
        )
    config = pin_reward_models(run_config("judge"))
    assert config.grpo.rewards[0].model == "judge@v1"
    check_reward_models(config, model_source(tiny_model_dir), "chat")
    with pytest.raises(
        ConfigError, match="judge@v1 was trained on the chat template; this run renders prompts with alpaca"
    ):
        check_reward_models(config, model_source(tiny_model_dir), "alpaca")
    with pytest.raises(ConfigError, match="reward reward_model: sft@v1 is not a reward model"):
        pin_reward_models(run_config("sft"))

    loaded = load_reward_model(resolve_entry(registry, "judge@v1"), str(tiny_model_dir), "float32", "cpu")
    [score], _ = reward_functions(config.grpo.rewards, lambda reward: loaded)
    prompts = [[5, 17, 99, 3, 250][: 2 + i % 4] for i in range(11)]  # more than one chunk of 8
    completions = [[40 + i] * (1 + i % 5) for i in range(11)]
    scores = score(prompts=prompts, completions=["text"] * 11, completion_ids=completions, trainer_state=None)
    with torch.no_grad():
        alone = [judge(torch.tensor([p + c])).logits[0, 0].item() for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert len(set(scores)) > 5  # the completions are told apart


def test_the_run_plot_draws_each_reward_when_there_are_several(tmp_path):
    step = {"loss": 0.1, "reward": 2.5, "rewards/short/mean": 0.5, "rewards/category/mean": 1.0, "kl": 0.01}
    history = [step | {"step": 1}, step | {"step": 2, "reward": 1.5}]
    assert reward_terms(history) == ["rewards/category/mean", "rewards/short/mean"]
    # One reward is the weighted sum already; DPO's rewards/chosen and rewards/margins are not rewards of a step.
    assert reward_terms([{"step": 1, "reward": 1.0, "rewards/only/mean": 1.0}]) == []
    assert reward_terms([{"step": 1, "rewards/chosen": 0.1, "rewards/margins": 0.2}]) == []
    png = plot_loss(history, tmp_path / "loss.png", "grpo")
    assert png.read_bytes().startswith(b"\x89PNG")
