"""DPO on real preference pairs (Intel/orca_dpo_pairs in OpenAI's DPO format), no Ray.

With LoRA the reference is the base with the adapter disabled, and a fresh adapter changes
nothing (B = 0), so the first sigmoid DPO loss is exactly ln 2 and the reward margin 0; training
on the pairs must then push the chosen answers' reward above the rejected ones'.
"""

from __future__ import annotations

import math
from itertools import islice

import pytest
import torch

from finch.config import validate_config
from finch.data.formats import normalize
from finch.data.readers import iter_records
from finch.data.tokenization import tokenize_preference
from finch.models.loading import load_trainable_model
from finch.registry.models import load_init_adapter, pin_init_adapter
from finch.train.trainers import build_trainer
from tests.conftest import data_file, make_tokenizer, register_adapter, run_config_dict


def preference_rows(count: int, max_length: int) -> list[dict]:
    tokenizer = make_tokenizer()
    path = data_file("preference/orca_dpo_pairs_openai_format.jsonl")
    rows = []
    for source, record in islice(iter_records(str(path)), count):
        pair = tokenize_preference(normalize(record, "auto", source), "chat", tokenizer, max_length)
        rows.append({"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids})
    return rows


def pairwise_trainer(
    tmp_path, model_dir, objective: str, method: str, steps: int, save_steps: int = 1000, output: str = "hf", **sections
):
    """A trainer of `objective` (dpo, reward) on 12 real pairs, 4 more held out for eval."""
    config = validate_config(
        run_config_dict(
            tmp_path,
            model_dir,
            ["unused.jsonl"],
            data={"eval_fraction": 0.25, "max_length": 256},
            train={
                "objective": objective,
                "method": method,
                "max_steps": steps,
                "lr": 5e-3,
                "batch_size": 4,
                "eval_steps": steps,
                "save_steps": save_steps,
            },
            **sections,
        )
    )
    config = pin_init_adapter(config)  # as `finch train` does: a lora.init_adapter section starts from that adapter
    rows = preference_rows(16, max_length=256)
    torch.manual_seed(0)
    model = load_trainable_model(config, str(model_dir))
    load_init_adapter(model, config)
    return build_trainer(config, model, make_tokenizer(), rows[:12], rows[12:], str(tmp_path / output))


def dpo_trainer(tmp_path, model_dir, method: str, steps: int, save_steps: int = 1000, output: str = "hf", **sections):
    return pairwise_trainer(
        tmp_path, model_dir, "dpo", method, steps, save_steps, output, dpo={"beta": 0.1}, **sections
    )


def dpo_history(tmp_path, model_dir, method: str, steps: int) -> list[dict]:
    trainer = dpo_trainer(tmp_path, model_dir, method, steps)
    trainer.train()
    return trainer.state.log_history


def adapter_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_resumed_lora_dpo_continues_the_trained_adapter(tmp_path, tiny_model_dir):
    straight = dpo_trainer(tmp_path, tiny_model_dir, "lora", steps=4, save_steps=2, output="a")
    assert set(straight.model.peft_config) == {"default"}  # the reference is the disabled adapter, no copy
    straight.train()
    resumed = dpo_trainer(tmp_path, tiny_model_dir, "lora", steps=4, save_steps=2, output="b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    expected, actual = adapter_weights(straight), adapter_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def test_dpo_from_a_registry_adapter_is_pulled_towards_it_and_resumes(tmp_path, tiny_model_dir):
    """DPO after SFT: the reference is the SFT adapter the run starts from (a frozen copy), so the
    first loss is ln 2 although the adapter already changes the model; a resumed run restores the
    trained adapter, not only the copy (HF Trainer alone restores just the copy)."""
    register_adapter(tmp_path / "registry", tiny_model_dir, "sft")
    sections = {"lora": {"init_adapter": "sft"}}
    straight = dpo_trainer(tmp_path, tiny_model_dir, "lora", steps=4, save_steps=2, output="a", **sections)
    assert set(straight.model.peft_config) == {"default", "ref"}
    straight.train()
    first_train = next(entry for entry in straight.state.log_history if "loss" in entry)
    assert first_train["loss"] == pytest.approx(math.log(2), abs=1e-4)
    resumed = dpo_trainer(tmp_path, tiny_model_dir, "lora", steps=4, save_steps=2, output="b", **sections)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    expected, actual = adapter_weights(straight), adapter_weights(resumed)
    assert expected.keys() == actual.keys() and all(".default." in name for name in expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kto_starts_at_one_half_and_prefers_the_chosen_answers(tmp_path, tiny_model_dir, method):
    """KTO on the same pairs, unpaired: at the start policy and reference agree (log-ratios and the
    KL estimate 0), so every answer's loss is 1 - sigmoid(0) = 0.5; training pushes the chosen
    answers' rewards above the rejected ones', on held-out pairs too. Each answer's KL sequence
    joins it to another pair's prompt in its batch."""
    trainer = pairwise_trainer(tmp_path, tiny_model_dir, "kto", method, steps=12, kto={"beta": 0.1})
    rows, per_batch = trainer.train_dataset, trainer.args.per_device_train_batch_size
    assert per_batch == 8 and rows["label"][:4] == [True, False, True, False]  # 4 pairs a batch, pairs kept
    for start in range(0, len(rows), per_batch):
        batch = rows[start : start + per_batch]
        for i, kl_answer in enumerate(batch["KL_completion_ids"]):
            source = (i - 2) % per_batch  # the same kind of answer, one pair back
            assert kl_answer == batch["completion_ids"][source] and batch["label"][source] == batch["label"][i]
            assert batch["prompt_ids"][source] != batch["prompt_ids"][i]
    trainer.train()
    history = trainer.state.log_history
    first_train = next(entry for entry in history if "loss" in entry)
    assert first_train["loss"] == pytest.approx(0.5, abs=1e-4)
    evals = [entry for entry in history if "eval_loss" in entry]
    assert evals[-1]["eval_rewards/margins"] > 0.05 and evals[-1]["eval_loss"] < 0.5
    train_margins = [entry["rewards/margins"] for entry in history if "rewards/margins" in entry]
    assert sum(train_margins[-3:]) / 3 > 0.2


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_starts_at_ln2_and_the_reward_margin_grows(tmp_path, tiny_model_dir, method):
    history = dpo_history(tmp_path, tiny_model_dir, method, steps=12)
    evals = [entry for entry in history if "eval_loss" in entry]
    first_train = next(entry for entry in history if "loss" in entry)
    assert evals[0]["step"] == 0  # evaluated before the first update
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert evals[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert first_train["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # the policy learns to prefer the chosen answers, on the training pairs and on held-out pairs
    assert evals[-1]["eval_rewards/margins"] > 0.2
    assert evals[-1]["eval_loss"] < math.log(2)
    train_margins = [entry["rewards/margins"] for entry in history if "rewards/margins" in entry]
    assert sum(train_margins[-3:]) / 3 > 0.5
    assert train_margins[-1] > train_margins[0]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_dpo_loss_and_gradients_equal_those_from_full_logits(tmp_path, tiny_model_dir, method):
    """TRL's fused LM head (tiles, never the [tokens x vocabulary] logits) gives the DPO loss and
    gradients that log-softmax over the model's full logits gives, for finch's pretokenized pairs."""
    trainer = dpo_trainer(tmp_path, tiny_model_dir, method, steps=1, qlora={"compute_dtype": "float32"})
    model = trainer.model.train()
    with torch.no_grad():  # move the policy away from the reference, so both log-ratios matter
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * (0.05 if "lora_B" in name else 0.01))
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    def answer_logps(forward) -> torch.Tensor:
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        picked = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (picked * batch["completion_mask"][:, 1:]).sum(1)

    with torch.no_grad():
        if method != "full":
            with model.disable_adapter():
                reference = answer_logps(model)
        else:
            reference = answer_logps(trainer.ref_model)
    chosen, rejected = (answer_logps(model) - reference).chunk(2)
    expected = -torch.nn.functional.logsigmoid(trainer.beta * (chosen - rejected)).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-4)
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert plain.keys() == fused.keys() and plain
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], atol=1e-6, rtol=1e-3, msg=name)


def test_preference_pairs_share_the_prompt_and_end_with_the_answer_end(tokenizer):
    sample = {"messages": [{"role": "user", "content": "Pick one."}], "chosen": "Blue.", "rejected": "Red, of course."}
    pair = tokenize_preference(sample, "chat", tokenizer, max_length=512)
    assert tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(pair.chosen_ids) == "Blue.<|im_end|>\n"
    assert tokenizer.decode(pair.rejected_ids) == "Red, of course.<|im_end|>\n"
    plain = tokenize_preference(sample, "alpaca", tokenizer, max_length=512)
    assert tokenizer.decode(plain.prompt_ids).endswith("### Response:\n")
    assert plain.chosen_ids[-1] == tokenizer.eos_token_id
    # answers are cut so prompt + answer fits max_length
    short = tokenize_preference(sample, "chat", tokenizer, max_length=len(pair.prompt_ids) + 2)
    assert short.truncated and len(short.chosen_ids) == 2 and len(short.rejected_ids) == 2
