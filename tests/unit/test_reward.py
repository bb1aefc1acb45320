"""Reward models (train.objective reward) on real preference pairs (Intel/orca_dpo_pairs), no Ray.

The reward of a prompt + answer is the one-output head at the answer's last token; the loss is
-log sigmoid(reward(chosen) - reward(rejected)). Checked against each sequence scored on its own
(no padding, no batching), for LoRA, QLoRA and full fine-tuning; training must rank the chosen
answers above the rejected ones; the saved adapter holds the trained head and scores the same
after loading.
"""

from __future__ import annotations

import pytest
import torch

from finch.train.reward import whole_answers
from tests.unit.test_dpo import pairwise_trainer, preference_rows


def reward_alone(model, ids) -> torch.Tensor:
    """The reward of one sequence through the model on its own: no padding, no batch."""
    return model(input_ids=torch.as_tensor([list(ids)])).logits[0, 0]


def rewards_one_by_one(model, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each preference row's two rewards (chosen, rejected)."""
    pairs = [pair for row in rows for pair in whole_answers(row)]
    return (
        torch.stack([reward_alone(model, pair["chosen_ids"]) for pair in pairs]),
        torch.stack([reward_alone(model, pair["rejected_ids"]) for pair in pairs]),
    )


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_reward_loss_is_bradley_terry_on_each_answers_last_token(tmp_path, tiny_model_dir, method):
    trainer = pairwise_trainer(tmp_path, tiny_model_dir, "reward", method, steps=1, qlora={"compute_dtype": "float32"})
    model = trainer.model.train()
    assert model.config.num_labels == 1
    if method != "full":  # the head is new: it trains whole beside the adapters
        assert any("score" in name and param.requires_grad for name, param in model.named_parameters())
    batch = next(iter(trainer.get_train_dataloader()))  # 4 chosen then 4 rejected, padded to the longest
    assert not batch["attention_mask"].all()  # padding is in play
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        alone = torch.stack(
            [reward_alone(model, ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        )
    chosen, rejected = alone.chunk(2)
    expected = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-4)


def test_training_ranks_the_chosen_answers_first_and_the_adapter_keeps_its_head(tmp_path, tiny_model_dir):
    from peft import AutoPeftModelForSequenceClassification

    trainer = pairwise_trainer(tmp_path, tiny_model_dir, "reward", "lora", steps=12)
    trainer.train()
    history = trainer.state.log_history
    evals = [entry for entry in history if "eval_accuracy" in entry]
    assert [entry["step"] for entry in evals] == [0, 12]  # held-out accuracy before and after, for the registry
    steps = [entry for entry in history if "accuracy" in entry]
    # On the training pairs (a random tiny model learns nothing that carries over to held-out ones):
    # the chosen answers' rewards pull away from the rejected ones'.
    assert steps[0]["margin"] < 0.1 and steps[-1]["margin"] > 2.0
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert sum(s["accuracy"] for s in steps[-3:]) > sum(s["accuracy"] for s in steps[:3])
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"), num_labels=1).eval()
    rows = preference_rows(16, 256)[:4]
    with torch.no_grad():
        torch.testing.assert_close(rewards_one_by_one(loaded, rows), rewards_one_by_one(trainer.model.eval(), rows))


def test_a_reward_head_has_one_output_on_every_loading_path(tiny_model_dir):
    """With model.dropout (a changed config) and weightless (FSDP ranks after the first) too."""
    from finch.config import ModelConfig
    from finch.models.loading import load_base_model

    folder = str(tiny_model_dir)
    dropped = load_base_model(ModelConfig(path=folder, dropout=0.2), folder, reward_head=True)
    weightless = load_base_model(ModelConfig(path=folder), folder, weightless=True, reward_head=True)
    for model in (dropped, weightless):
        assert model.config.num_labels == 1 and model.score.out_features == 1
    assert dropped.config.attention_dropout == 0.2
