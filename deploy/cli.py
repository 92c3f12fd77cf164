"""The whole ``gorp`` command: the pipeline's commands (validate, run, lineage, prepare-model, from
``pipelines.cli``) and the ones that reach beyond one machine, registered here (submit; retrain and tune to come).

    gorp submit STREAM [--address http://HEAD:8265] [--follow] [--command run|retrain|tune] [-- ARGS...]
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


# `gorp retrain` (the inbox watcher: each new task in a folder becomes the next stage of a sequence) registers here
# once the sequence entry point (pipelines' run_sequence) lands, e.g.:
#     from deploy.retrain import retrain
#     app.command()(retrain)
# `gorp tune` likewise, from tuning/ (deploy -> tuning -> pipelines, never the reverse).


def main() -> None:  # pragma: no cover - console script
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
