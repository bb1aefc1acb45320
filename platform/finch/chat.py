"""`finch chat`: the base model and registry adapters answer the same prompt, side by side.

Offline generation with transformers + PEFT: one base model in memory, every adapter loaded
onto it, switched per answer; fully fine-tuned models (registry kind "model") load on their
own. Prompts render through the same template as training.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from finch.config import validate_config
from finch.data.templates import with_system_prompt
from finch.data.tokenization import prompt_token_ids
from finch.models.loading import load_base_model
from finch.models.tokenizer import load_tokenizer, merge_stop_ids
from finch.precision import detect_device, inference_dtype
from finch.registry.models import trained_base_folder
from finch.registry.store import RegistryEntry, resolve_entry

BASE = "base"
console = Console()


def announce_dtype(requested: str, on_gpu: bool) -> str:
    """The dtype to generate in on this machine, printed with why."""
    device = detect_device(on_gpu)
    dtype, warnings = inference_dtype(requested, device)
    console.print(f"finch: generating in {dtype} on {device.name}: {device.evidence}", highlight=False, soft_wrap=True)
    for warning in warnings:
        console.print(f"[yellow]finch: warning: {warning}[/]", highlight=False, soft_wrap=True)
    return dtype


@dataclass
class ChatSession:
    model: Any  # the base model, with every LoRA adapter loaded when there are any
    tokenizer: Any
    adapters: list[RegistryEntry]
    full_models: dict[str, Any] = field(default_factory=dict)  # registry ref -> fully fine-tuned model

    @classmethod
    def from_registry(cls, registry_dir: str | Path, refs: list[str]) -> ChatSession:
        from peft import PeftModel

        adapters = [resolve_entry(registry_dir, ref) for ref in refs]
        for adapter in adapters:
            adapter.check_generates("chat")
        folder = trained_base_folder(adapters)
        config = validate_config(adapters[0].manifest["config"])
        tokenizer = load_tokenizer(folder)
        on_gpu = torch.cuda.is_available()
        # A registry manifest is data, not a trust decision: never run model code because of it.
        # model.dtype 'auto' is chosen for this machine, not the one that trained.
        model_config = config.model.model_copy(
            update={"trust_remote_code": False, "dtype": announce_dtype(config.model.dtype, on_gpu)}
        )
        device = "cuda" if on_gpu else "cpu"
        model = load_base_model(model_config, folder, use_gpu=on_gpu).to(device)
        lora = [a for a in adapters if a.kind == "adapter"]
        if lora:
            model = PeftModel.from_pretrained(model, lora[0].path, adapter_name=lora[0].ref)
            for adapter in lora[1:]:
                model.load_adapter(adapter.path, adapter_name=adapter.ref)
        full_models = {
            a.ref: load_base_model(model_config, str(a.path), use_gpu=on_gpu).to(device).eval()
            for a in adapters
            if a.kind == "model"
        }
        model.eval()
        return cls(model, tokenizer, adapters, full_models)

    def answer(self, prompt: str, adapter: RegistryEntry | None, max_new_tokens: int = 64) -> str:
        """Greedy answer of the base model (adapter None) or one adapter."""
        template = (adapter or self.adapters[0]).manifest["template"]
        # The system message the adapter saw in training (formats.normalize adds it there); the base
        # model gets none, as in `finch serve`.
        messages = with_system_prompt([{"role": "user", "content": prompt}], adapter.system_prompt if adapter else None)
        input_ids = torch.tensor([prompt_token_ids(messages, self.tokenizer, template)], device=self.model.device)
        if adapter is not None and adapter.kind == "model":
            output = self._generate(self.full_models[adapter.ref], input_ids, max_new_tokens)
        elif adapter is None:
            with contextlib.ExitStack() as stack:
                if hasattr(self.model, "disable_adapter"):
                    stack.enter_context(self.model.disable_adapter())
                output = self._generate(self.model, input_ids, max_new_tokens)
        else:
            self.model.set_adapter(adapter.ref)
            output = self._generate(self.model, input_ids, max_new_tokens)
        return self.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()

    @property
    def stop_token_ids(self) -> list[int]:
        return merge_stop_ids(self.tokenizer, self.model.generation_config.eos_token_id)

    def _generate(self, model: Any, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )

    def side_by_side(self, prompt: str, max_new_tokens: int = 64, include_base: bool = True) -> dict[str, str]:
        targets: list[RegistryEntry | None] = ([None] if include_base else []) + list(self.adapters)
        return {(t.ref if t else BASE): self.answer(prompt, t, max_new_tokens) for t in targets}

    def print_side_by_side(self, prompt: str, max_new_tokens: int = 64, include_base: bool = True) -> dict[str, str]:
        answers = self.side_by_side(prompt, max_new_tokens, include_base)
        table = Table(title=f"prompt: {prompt}", show_lines=True, expand=True)
        for name in answers:
            table.add_column(name, overflow="fold")
        table.add_row(*(Text(answer) for answer in answers.values()))  # answers are text, never rich markup
        console.print(table)
        return answers
