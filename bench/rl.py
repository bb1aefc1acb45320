"""GRPO steps: finch (completions from its vLLM engine in a Ray actor, the LoRA policy hot-swapped
after each step) against TRL's GRPOTrainer generating with transformers (`model.generate` in the
training process, no vLLM), on the same prompts, group size, completion length and LoRA.

Both sides are the same TRL GRPOTrainer apart from generation: finch's is finch's trainer
(train/grpo.py) with its rollout engine (rl/rollouts.py), TRL's is `GRPOTrainer` given the same
prompt token ids (a subclass only passes them through instead of re-tokenizing text). Each side
runs in a process of its own, on the quickstart model (Gemma 3 270M, LoRA rank 16 on all linear
layers, the dtype finch picks for this machine) and the triage tickets (jobs/data/triage.jsonl,
jobs/grpo.yaml's prompts). Per step: the time in generation (rollouts) and the tokens generated;
whole-step time from one optimizer step's end to the next. finch runs twice: as configured by default,
and with TRL's importance-sampling correction off (no second forward pass of each batch). The first step (warm-up: engine
compilation, allocator) is left out. Sampling is random on both sides, so completion lengths
differ: rollout speed is tokens generated per second of generation.

    .venv/bin/python bench/rl.py [--steps 5] [--num-generations 4] [--batch-size 8] [--max-completion-length 48]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import command_line, load_average, machine_description

REPO = Path(__file__).resolve().parents[1]


def run_config(args: argparse.Namespace, output_dir: str) -> dict:
    """jobs/grpo.yaml with the benchmark's sizes (the rewards do not change the work)."""
    import yaml

    config = yaml.safe_load((REPO / "jobs" / "grpo.yaml").read_text())
    config["output_dir"], config["registry_dir"] = f"{output_dir}/runs", f"{output_dir}/registry"
    config["data"]["train_files"] = [str(REPO / "jobs" / "data" / "triage.jsonl")]
    # A fresh adapter of the shape of the SFT adapter jobs/grpo.yaml continues: TRL's side starts
    # from the base too, and the benchmark needs no registry.
    config["lora"] = yaml.safe_load((REPO / "jobs" / "quickstart" / "triage.yaml").read_text())["lora"]
    config["train"].pop("eval_tasks", None)
    config["train"] |= {"max_steps": args.steps, "batch_size": args.batch_size, "save_steps": 10**6}
    config["grpo"] |= {
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "rewards": [{"name": "regex", "pattern": "[a-z]"}],
    }
    return config


class StepClock:
    """Wraps a trainer's `_generate_single_turn` and step ends: seconds and tokens per step."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.generation: list[tuple[float, int]] = []
        self.step_ends: list[float] = []
        generate = trainer._generate_single_turn

        def timed(*args, **kwargs):
            start = time.perf_counter()
            completion_ids, logprobs = generate(*args, **kwargs)
            self.generation.append((time.perf_counter() - start, sum(len(ids) for ids in completion_ids)))
            return completion_ids, logprobs

        trainer._generate_single_turn = timed
        clock = self

        class Ends(TrainerCallback):
            def on_step_end(self, *args, **kwargs):
                clock.step_ends.append(time.perf_counter())

        trainer.add_callback(Ends())
        self.started = time.perf_counter()

    def summary(self) -> dict[str, float]:
        steps = [b - a for a, b in zip([self.started, *self.step_ends], self.step_ends)][1:]
        generation = self.generation[1:]
        seconds = sum(s for s, _ in generation)
        tokens = sum(t for _, t in generation)
        return {
            "step_s": sum(steps) / len(steps),
            "rollout_s": seconds / len(generation),
            "rollout_tokens": tokens / len(generation),
            "rollout_tokens_per_s": tokens / seconds,
        }


def side(name: str, config_json: str) -> dict[str, float]:
    """One side, in this process."""
    from finch.config import validate_config
    from finch.models.loading import load_trainable_model
    from finch.models.source import resolve_model_source
    from finch.models.tokenizer import load_tokenizer
    from finch.precision import device_of_workers, resolved, training_precision
    from finch.rl.prompts import prepare_prompts
    from finch.train.grpo import build_online_rl_trainer
    from finch.train.trainers import training_arguments

    config = validate_config(json.loads(config_json))
    config = resolved(config, training_precision(config, device_of_workers(False, None)))
    model_source = resolve_model_source(config.model)
    prompts = prepare_prompts(config, model_source).prompts
    tokenizer = load_tokenizer(model_source.folder)
    model = load_trainable_model(config, model_source.folder)
    with tempfile.TemporaryDirectory() as scratch, finch_engine(name, config, model_source) as rollouts:
        args = training_arguments(config, scratch)
        if name != "trl":
            trainer = build_online_rl_trainer(config, model, tokenizer, args, prompts, rollouts)
        else:
            trainer = trl_trainer(config, model, tokenizer, args, prompts)
        clock = StepClock(trainer)
        trainer.train()
    return clock.summary()


def finch_engine(name: str, config, model_source):
    """finch's rollout engine as `finch train` starts it (an actor on a local Ray cluster); none for TRL."""
    if name == "trl":
        return contextlib.nullcontext()
    from finch.runtime import init_ray
    from finch.train.run import rollout_engine

    init_ray()
    return rollout_engine(config, model_source)


def trl_trainer(config, model, tokenizer, args, prompts):
    from datasets import Dataset
    from trl import GRPOTrainer

    from finch.rl.rewards import reward_functions

    class TokenPrompts(GRPOTrainer):
        """The same prompt ids as finch's; generation stays TRL's (transformers)."""

        def _tokenize_prompts(self, prompts):
            return prompts, None, {}

    return TokenPrompts(
        model=model,
        reward_funcs=reward_functions(config.grpo.rewards)[0],
        args=args,
        train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per side (the first is warm-up)")
    parser.add_argument("--num-generations", type=int, default=4, help="group size")
    parser.add_argument("--batch-size", type=int, default=8, help="completions per step")
    parser.add_argument("--max-completion-length", type=int, default=48)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    return parser.parse_args()


SIDES = {
    "trl": "TRL GRPOTrainer, transformers generate",
    "finch": "finch, vLLM engine actor",
    "finch-no-is": "finch, importance-sampling correction off",
}


def side_config(config_json: str, name: str) -> str:
    """The run config of a side: finch-no-is turns grpo.vllm_importance_sampling_correction off,
    which skips TRL's extra forward pass of each batch."""
    if name != "finch-no-is":
        return config_json
    config = json.loads(config_json)
    config["grpo"]["vllm_importance_sampling_correction"] = False
    return json.dumps(config)


def main() -> None:
    args = parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.config)))
        return
    started = time.perf_counter()
    print(f"machine: {machine_description(('torch', 'ray', 'transformers', 'trl', 'vllm'))}; load {load_average()}")
    print(f"command: {command_line()}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="finch-bench-rl-") as work:
        config = json.dumps(run_config(args, work))
        for name in SIDES:
            child = [sys.executable, __file__, "--side", name, "--config", side_config(config, name)]
            output = subprocess.run(child, capture_output=True, text=True, cwd=REPO)
            if output.returncode:
                raise SystemExit(f"{name} failed:\n{output.stderr[-3000:]}")
            results[name] = json.loads(output.stdout.strip().splitlines()[-1])
    trl = results["trl"]
    print(
        f"\n{args.steps - 1} timed steps per side; {args.batch_size} completions per step "
        f"({args.batch_size // args.num_generations} prompts x {args.num_generations}), up to "
        f"{args.max_completion_length} tokens each.\n"
    )
    print(
        "| side | whole step s | rollouts s/step | tokens/step | rollout tokens/s | vs TRL: step | vs TRL: rollout tokens/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, label in SIDES.items():
        r = results[name]
        print(
            f"| {label} | {r['step_s']:.1f} | {r['rollout_s']:.1f} | {r['rollout_tokens']:.0f} | "
            f"{r['rollout_tokens_per_s']:.1f} | {trl['step_s'] / r['step_s']:.2f}x | "
            f"{r['rollout_tokens_per_s'] / trl['rollout_tokens_per_s']:.2f}x |"
        )
    print(f"\nTotal time: {time.perf_counter() - started:.0f}s; load average {load_average()} at the end")


if __name__ == "__main__":
    main()
