"""`finch` command line: data inspect, train, tune, eval, serve, chat, export, registry."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from finch.config import ConfigError, load_config
from finch.data.readers import DatasetError
from finch.registry.store import RegistryError
from finch.runtime import OutputFolderError

app = typer.Typer(help="Fine-tune and serve LLMs on Ray.", no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect datasets before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")
registry_app = typer.Typer(help="What the registry holds: versions, lineage, eval scores.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
console = Console()

ConfigArg = Annotated[Path, typer.Argument(help="Run config YAML (see jobs/).")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.lr=1e-4 data.max_length=256.")
]
USER_ERRORS = (ConfigError, DatasetError, RegistryError, FileExistsError, PermissionError, OutputFolderError)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@data_app.command("inspect")
def data_inspect(
    config_path: ConfigArg,
    overrides: OverridesArg = None,
    histogram: Annotated[Path | None, typer.Option(help="Where to write the token-length histogram PNG.")] = None,
) -> None:
    """Counts, token-length stats, truncation and packing efficiency; writes a histogram PNG."""
    from finch.data.inspect import inspect_data

    try:
        inspect_data(load_config(config_path, overrides), histogram)
    except USER_ERRORS as err:
        _fail(err)


@app.command()
def train(
    config_path: Annotated[
        str | None, typer.Argument(help="Run config YAML (see jobs/); with --resume, only overrides follow.")
    ] = None,
    overrides: OverridesArg = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder of the same name.")] = False,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run folder (e.g. runs/NAME) from its last checkpoint.")
    ] = None,
) -> None:
    """Fine-tune (full, LoRA, QLoRA; SFT, pre-training, DPO, reward models) on Ray Train and register the result."""
    try:
        from finch.train.run import load_run_config
        from finch.train.run import train as run_training

        if resume is not None:
            # The run folder holds the config; anything before the overrides is one of them.
            config = load_run_config(resume, ([config_path] if config_path else []) + (overrides or []))
        elif config_path is None:
            raise ConfigError("finch train needs a config file (or --resume RUN_FOLDER)")
        else:
            config = load_config(config_path, overrides)
        run_training(config, overwrite=overwrite, resume=resume is not None)
    except USER_ERRORS as err:
        _fail(err)


@app.command()
def tune(
    sweep_path: Annotated[Path, typer.Argument(help="Sweep config YAML (see tune/).")],
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted sweep of this name.")] = False,
) -> None:
    """Search training settings with Ray Tune (grid, random or Optuna; ASHA stopping); register the best adapter."""
    from finch.tune.sweep import SweepError, load_sweep_config, sweep

    try:
        sweep(load_sweep_config(sweep_path, overrides), resume=resume)
    except (*USER_ERRORS, SweepError) as err:
        _fail(err)


@app.command()
def serve(
    config_path: Annotated[Path, typer.Argument(help="Serve config YAML (see serve/).")],
    overrides: OverridesArg = None,
    ask: Annotated[
        list[str] | None,
        typer.Option(
            help="Send this prompt to every served model over HTTP, print the answers, then stop (repeatable)."
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="With --ask: tokens per answer.")] = 64,
) -> None:
    """Serve the base model and registry adapters: OpenAI-compatible API and chat page on Ray Serve + vLLM."""
    from finch.config import ServeConfig

    try:
        config = load_config(config_path, overrides, schema=ServeConfig)
        from finch.serve.app import api_key_of, run, stop

        if not ask:
            run(config)
            return
        url = run(config, blocking=False)
        try:
            from finch.serve.probe import ask_every_model

            ask_every_model(url, ask, api_key_of(config), max_tokens, console)
        finally:
            stop(config)
    except USER_ERRORS as err:
        _fail(err)


@app.command("eval")
def evaluate(
    config_path: Annotated[Path, typer.Argument(help="Eval config YAML (see jobs/eval/).")],
    overrides: OverridesArg = None,
) -> None:
    """Score the base model and registry entries on a task (vLLM batch generation on Ray Data); record the scores."""
    from finch.config import EvalConfig
    from finch.eval.metrics import MetricError

    try:
        from finch.eval.run import evaluate as run_evaluation

        run_evaluation(load_config(config_path, overrides, schema=EvalConfig))
    except (*USER_ERRORS, MetricError) as err:
        _fail(err)


RegistryOption = Annotated[Path, typer.Option(help="Registry root.")]


@registry_app.command("list")
def registry_list(registry: RegistryOption = Path("registry")) -> None:
    """Every entry: kind, method, base model, data, and its eval scores."""
    from finch.registry.view import print_list

    print_list(registry, console)


@registry_app.command("show")
def registry_show(
    ref: Annotated[str, typer.Argument(help="Entry: name (latest version) or name@vN.")],
    registry: RegistryOption = Path("registry"),
) -> None:
    """One entry: versions, training, lineage and every evaluation with the base model's score beside it."""
    from finch.registry.view import print_entry

    try:
        print_entry(registry, ref, console)
    except RegistryError as err:
        _fail(err)


@app.command()
def chat(
    adapter: Annotated[list[str], typer.Option(help="Registry adapter (name or name@vN); repeat to compare.")],
    prompt: Annotated[
        list[str] | None, typer.Option(help="Prompt(s); without one, read prompts interactively.")
    ] = None,
    registry: Annotated[Path, typer.Option(help="Adapter registry root.")] = Path("registry"),
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    no_base: Annotated[bool, typer.Option(help="Skip the base model's answer.")] = False,
) -> None:
    """Answer each prompt with the base model and every adapter, side by side (greedy)."""
    from finch.chat import ChatSession

    try:
        session = ChatSession.from_registry(registry, adapter)
    except USER_ERRORS as err:
        _fail(err)
    prompts = prompt or _interactive_prompts()
    for text in prompts:
        session.print_side_by_side(text, max_new_tokens=max_new_tokens, include_base=not no_base)


class ExportFormat(StrEnum):
    merged = "merged"
    gguf = "gguf"


class GgufType(StrEnum):
    f16 = "f16"
    q8_0 = "q8_0"


class SixteenBit(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"


@app.command()
def export(
    adapter: Annotated[str, typer.Argument(help="Registry entry (name or name@vN).")],
    output: Annotated[Path, typer.Option(help="Folder (merged) or .gguf file (gguf) to write.")],
    format: Annotated[
        ExportFormat,
        typer.Option(
            help="merged: the base with the adapter merged in, 16-bit safetensors; gguf: that, for llama.cpp."
        ),
    ] = ExportFormat.merged,
    dtype: Annotated[
        SixteenBit | None,
        typer.Option(help="merged: weights dtype (default: the training dtype if 16-bit, else bfloat16)."),
    ] = None,
    gguf_type: Annotated[
        GgufType, typer.Option(help="gguf: f16, or q8_0 (8-bit, about half the size).")
    ] = GgufType.f16,
    registry: Annotated[Path, typer.Option(help="Adapter registry root.")] = Path("registry"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Export a registry entry as a standalone model (QLoRA merges into the dequantized base)."""
    from finch.export.gguf import ExportError, export_gguf
    from finch.export.merged import export_merged

    try:
        if format is ExportFormat.gguf:
            if dtype is not None:
                raise ConfigError("--dtype is for --format merged; GGUF types are chosen with --gguf-type")
            written = export_gguf(registry, adapter, output, gguf_type.value, overwrite)
        else:
            written = export_merged(registry, adapter, output, dtype.value if dtype else None, overwrite)
    except (*USER_ERRORS, ExportError) as err:
        _fail(err)
    console.print(f"[green]finch: exported {adapter} ({format.value}) to {written}[/]")


def _interactive_prompts():
    while True:
        try:
            text = console.input("[bold]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            return
        if text.strip():
            yield text


if __name__ == "__main__":
    app()
