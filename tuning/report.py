"""What ``gorp tune`` leaves behind: the table it prints, ``trials.csv``, ``best.yaml`` (the stream with the best
trial's method and method_args, ready for ``gorp run``) and ``aa_per_stage.png`` (AA after each stage, every trial;
a trial ASHA stopped ends early, with a cross)."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml


def _params(trials: list[dict]) -> list[str]:
    return sorted({k for t in trials for k in t["config"]})


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def table(outcome, n_stages: int):
    from rich.table import Table

    params = _params(outcome.trials)
    best = outcome.best["trial_id"] if outcome.best else None
    tab = Table(title=f"{len(outcome.trials)} trials, scored on validation (best: {best or 'none completed'})")
    for col in ("trial", *params, *(f"AA@{s + 1}" for s in range(n_stages)), "stopped at", "objective"):
        tab.add_column(col, justify="left" if col in ("trial", "method") else "right")
    for t in outcome.trials:
        aa = [f"{a:.3f}" if a is not None else "" for a in t["aa"]] + ["-"] * (n_stages - len(t["aa"]))
        stopped = f"stage {t['stages']}" if t["stopped"] else ("error" if t["status"] == "ERROR" else "-")
        mark = " *" if t["trial_id"] == best else ""
        objective = "" if t["objective"] is None else f"{t['objective']:.3f}"
        tab.add_row(t["trial_id"] + mark, *(_fmt(t["config"].get(p, "")) for p in params), *aa, stopped, objective)
    return tab


def write_csv(outcome, path: Path, n_stages: int) -> None:
    params = _params(outcome.trials)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "trial_id",
                *params,
                *(f"aa_stage{s + 1}" for s in range(n_stages)),
                "stages",
                "stopped",
                "objective",
                "status",
            ]
        )
        for t in outcome.trials:
            aa = t["aa"] + [None] * (n_stages - len(t["aa"]))
            w.writerow(
                [
                    t["trial_id"],
                    *(t["config"].get(p) for p in params),
                    *aa,
                    t["stages"],
                    t["stopped"],
                    t["objective"],
                    t["status"],
                ]
            )


def best_stream(stream, best: dict) -> dict:
    """The stream (paths absolute, so it loads from anywhere) with the best trial's method and method_args."""
    data = stream.model_dump(mode="json")
    method = best["config"]["method"]
    base = data["method_args"] if method == data["method"] else {}
    data["method"] = method
    data["method_args"] = base | {k: v for k, v in best["config"].items() if k != "method"}
    return data


def plot(outcome, path: Path, n_stages: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for t in outcome.trials:
        xs = [s + 1 for s, a in enumerate(t["aa"]) if a is not None]
        ys = [a for a in t["aa"] if a is not None]
        if not xs:
            continue
        best = outcome.best is not None and t["trial_id"] == outcome.best["trial_id"]
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t["config"].items()) if k != "method")
        label = f"{t['trial_id']} {values}" + (" (best)" if best else "")
        (line,) = ax.plot(xs, ys, marker="o", lw=2.5 if best else 1.2, label=label)
        if t["stopped"]:
            ax.plot(xs[-1], ys[-1], marker="x", ms=11, mew=2.5, color=line.get_color())
    ax.set_xticks(range(1, n_stages + 1))
    ax.set_xlim(0.8, n_stages + 0.2)
    ax.set_xlabel("stage")
    ax.set_ylabel("AA over the tasks seen (validation)")
    ax.set_title("AA per stage; x = stopped by the scheduler")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(outcome, stream, search, *, echo=print) -> None:
    from rich.console import Console

    n = len(stream.tasks)
    out = outcome.out_dir
    write_csv(outcome, out / "trials.csv", n)
    plot(outcome, out / "aa_per_stage.png", n)
    Console(width=160).print(table(outcome, n))
    spent = sum(t["stages"] for t in outcome.trials)
    echo(f"stage-trainings spent: {spent} (running every trial to the end: {len(outcome.trials) * n})")
    if outcome.best is None:
        echo("no trial completed every stage: no best.yaml")
        return
    header = (
        f"# gorp tune {search.name}: the best of {len(outcome.trials)} trials ({outcome.best['trial_id']}), "
        f"objective {outcome.best['objective']:.4f} on validation.\n# Its test accuracy: gorp run {out / 'best.yaml'}\n"
    )
    (out / "best.yaml").write_text(header + yaml.safe_dump(best_stream(stream, outcome.best), sort_keys=False))
    echo(f"wrote {out / 'best.yaml'}, {out / 'trials.csv'}, {out / 'aa_per_stage.png'}")
