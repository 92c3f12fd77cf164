"""The whole ``gorp`` command: the pipeline's commands (validate, run, lineage, prepare-model, from
``pipelines.cli``) and the ones that reach beyond one machine, registered here (submit, retrain, tune).

    gorp submit STREAM [--address http://HEAD:8265] [--follow] [--command run|retrain|tune] [-- ARGS...]
    gorp retrain STREAM --inbox DIR [--run-dir DIR] [--storage URI] [--from latest|champion] (--once | --every 10m)
    gorp tune STREAM SEARCH.yaml [--out DIR] [--resume]
    python -m deploy.cli ...      # the same command without the console script (what a Ray Job runs)
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pipelines.cli import app, console


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    stream: Path = typer.Argument(..., help="the stream YAML; its folder (data, model) is uploaded with the job"),
    address: str = typer.Option(
        None, help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)"
    ),
    follow: bool = typer.Option(False, "--follow", help="stream the job's logs until it ends; exit with its status"),
    command: str = typer.Option("run", help="the gorp command the job runs on the stream: run, retrain or tune"),
) -> None:
    """Run `gorp COMMAND STREAM ARGS...` on a Ray cluster as a Ray Job. The same work (command, arguments, the files
    of the stream's folder) gets the same submission id, and Ray refuses a second one: it runs once. Arguments after
    `--` go to the command, e.g. `gorp submit s.yaml -- --method lora`."""
    from deploy.submit import SubmitError, plan_submission
    from deploy.submit import submit as submit_job
    from pipelines.spec import SpecError

    try:
        plan = plan_submission(stream, command, ctx.args)
        code = submit_job(plan, address=address, follow=follow, echo=_echo)
    except (SpecError, SubmitError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def _echo(text: str, end: str = "\n") -> None:
    # job logs verbatim: no rich markup or highlighting of what the job printed
    sys.stdout.write(text + end)
    sys.stdout.flush()


@app.command()
def retrain(
    stream: Path = typer.Argument(..., help="the stream YAML: model, method, training, scaling, mlflow, first tasks"),
    inbox: str = typer.Option(..., help="the folder new task files are dropped into (a local or shared path)"),
    run_dir: Path = typer.Option(None, help="the stream's run directory, shared by every watcher (default: run_dir)"),
    storage: str = typer.Option(None, help="where stage models go (a folder or a URI such as s3://bucket/runs)"),
    once: bool = typer.Option(False, "--once", help="one pass over the inbox, then exit"),
    every: str = typer.Option(None, help="a pass every INTERVAL (e.g. 10m, 1h), forever"),
    start: str = typer.Option("latest", "--from", help="continue from the latest version, or champion"),
) -> None:
    """Train each new task in the inbox as the next stage of the stream's sequence; the gate decides `champion`.
    Bad task files move to INBOX/rejected/ with the reason; trained ones to INBOX/done/ with the decision."""
    from deploy.retrain import RetrainError, parse_interval, retrain_every, retrain_once
    from pipelines.sequence import StageFailed
    from pipelines.spec import SpecError

    if once == (every is not None):
        console.print("[red]error:[/red] pass exactly one of --once and --every INTERVAL", highlight=False)
        raise typer.Exit(2)
    kwargs = {"run_dir": run_dir, "storage": storage, "start": start, "console": console}
    try:
        if once:
            decisions = retrain_once(stream, inbox, **kwargs)
            console.print(f"retrain: {len(decisions)} task(s) trained", highlight=False)
        else:
            retrain_every(stream, inbox, parse_interval(every), **kwargs)
    except (SpecError, RetrainError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    except StageFailed as e:
        console.print(f"[red]stage failed:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None


# `gorp tune` registers here, from tuning/ (deploy -> tuning -> pipelines, never the reverse).
@app.command()
def tune(
    stream: Path = typer.Argument(..., help="the stream YAML whose sequence the search runs"),
    search: Path = typer.Argument(..., help="the search YAML: space, objective, scheduler, samples, seed"),
    out: Path = typer.Option(None, help="the search's folder (default: <run_dir>/tune/<search name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue a search whose driver died (Tuner.restore)"),
) -> None:
    """Search method_args (and methods) over whole sequences with Ray Tune, scored on validation; ASHA stops poor
    trials at stage boundaries. Prints the trials, writes best.yaml, trials.csv and aa_per_stage.png."""
    from pipelines.records import DataError
    from pipelines.spec import SpecError
    from tuning.run import tune_stream

    try:
        tune_stream(stream, search, out_dir=out, resume=resume, echo=lambda s: console.print(s, highlight=False))
    except (SpecError, DataError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None


def main() -> None:  # pragma: no cover - console script
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
