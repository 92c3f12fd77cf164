"""Results of a continual run: ``results.json``, the accuracy heatmap, the per-task accuracy curves, the CLI table.

The accuracy matrix has one row per completed stage (stage t trains task t) and one column per task of the stream:
``matrix[t][i]`` is the accuracy (a fraction in [0, 1]) on task i after stage t, None where task i was not evaluated.
The diagonal and everything left of it must be present; entries right of it are optional (the pipeline fills
``matrix[t][t + 1]``, the score of the next task before it is trained, for forward transfer).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gorp.metrics import summarize

RESULTS_FILE = "results.json"
METRIC_NAMES = ("aa", "bwt", "fwt", "forgetting")
STAGE_KEYS = ("task", "train_s", "eval_s", "tokens_per_s")

Row = Sequence[float | None]


def _accuracy(value: Any, where: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{where} = {value} is not an accuracy in [0, 1] (fractions, not percentages)")
    return value


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _check(tasks: Sequence[str], matrix: Sequence[Row], zero_shot: Sequence[float | None]) -> None:
    if len(matrix) > len(tasks):
        raise ValueError(f"{len(matrix)} matrix rows for {len(tasks)} tasks")
    for t, row in enumerate(matrix):
        if len(row) != len(tasks):
            raise ValueError(f"matrix row {t} has {len(row)} entries for {len(tasks)} tasks")
    if len(zero_shot) != len(tasks):
        raise ValueError(f"{len(zero_shot)} zero-shot scores for {len(tasks)} tasks")


def write_results(
    run_dir: str | Path,
    tasks: Sequence[str],
    matrix: Sequence[Row],
    zero_shot: Sequence[float | None],
    stages: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Write ``<run_dir>/results.json`` (atomically) and return what was written.

    Keys: tasks, matrix, zero_shot, aa, bwt, fwt, forgetting (``gorp.metrics.summarize`` of the stages so far, None
    where undefined), stages (task, train_s, eval_s, tokens_per_s per completed stage).
    """
    _check(tasks, matrix, zero_shot)
    if len(stages) != len(matrix):
        raise ValueError(f"{len(stages)} stage records for {len(matrix)} matrix rows")
    rows = [[_accuracy(v, f"matrix[{t}][{i}]") for i, v in enumerate(row)] for t, row in enumerate(matrix)]
    base = [_accuracy(v, f"zero_shot[{i}]") for i, v in enumerate(zero_shot)]
    metrics = summarize(rows, base)
    results: dict[str, Any] = {
        "tasks": [str(name) for name in tasks],
        "matrix": rows,
        "zero_shot": base,
        **{k: _number(metrics[k]) for k in METRIC_NAMES},
        "stages": [{"task": str(s["task"]), **{k: _number(s.get(k)) for k in STAGE_KEYS[1:]}} for s in stages],
    }
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RESULTS_FILE}.", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, run_dir / RESULTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return results


# ---- plots (matplotlib, Agg, no pyplot state) ------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A figure on its own Agg canvas: no pyplot, no global backend switch, safe in threads and headless workers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _stage_labels(tasks: Sequence[str], n: int) -> list[str]:
    return [f"{t + 1}: {tasks[t]}" for t in range(n)]


def plot_heatmap(path: str | Path, tasks: Sequence[str], matrix: Sequence[Row]) -> Path:
    """The accuracy matrix as an annotated heatmap (rows: stages, columns: tasks; diagonal outlined, scores of tasks
    not yet trained in italics)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import PercentFormatter

    _check(tasks, matrix, [None] * len(tasks))
    n_rows, n_cols = len(matrix), len(tasks)
    fig = _figure(2.8 + 1.0 * n_cols, 2.6 + 0.55 * max(n_rows, 1))
    ax = fig.add_subplot()
    ax.set_title("Accuracy R[t, i] after each stage (%)")
    ax.set_xlabel("evaluated task i")
    ax.set_ylabel("after stage t (task trained)")
    if n_rows == 0:
        ax.text(0.5, 0.5, "no stage completed yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
        cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        fig.colorbar(image, ax=ax, label="accuracy", fraction=0.05, format=PercentFormatter(1.0))
        ax.set_xticks(range(n_cols), list(tasks), rotation=30, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n_rows), _stage_labels(tasks, n_rows))
        for t in range(n_rows):
            for i in range(n_cols):
                v = values[t, i]
                if np.isnan(v):
                    continue
                ax.text(
                    i,
                    t,
                    f"{100 * v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if v < 0.55 else "black",
                    fontstyle="italic" if i > t else "normal",
                )
            if t < n_cols:
                ax.add_patch(Rectangle((t - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_forgetting(
    path: str | Path, tasks: Sequence[str], matrix: Sequence[Row], zero_shot: Sequence[float | None]
) -> Path:
    """One line per task: its accuracy after every stage from the one that trained it; the base model's zero-shot
    accuracy on it as a dashed line of the same colour."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    _check(tasks, matrix, zero_shot)
    n_rows = len(matrix)
    fig = _figure(max(6.0, 2.5 + 1.1 * max(n_rows, 1)), 4.2)
    ax = fig.add_subplot()
    ax.set_title("Accuracy of each task across stages")
    ax.set_xlabel("after stage (task trained)")
    ax.set_ylabel("accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.3, max(n_rows - 1, 0) + 0.3)
    labels = _stage_labels(tasks, n_rows) or [""]
    long = max(map(len, labels)) * max(n_rows, 1) > 60  # rotate rather than overlap
    ax.set_xticks(range(max(n_rows, 1)), labels, rotation=30 if long else 0, ha="right" if long else "center")
    ax.grid(alpha=0.3)
    colors = [f"C{k % 10}" for k in range(len(tasks))]
    handles = []
    for i, name in enumerate(tasks):
        points = [(t, matrix[t][i]) for t in range(i, n_rows) if matrix[t][i] is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", color=colors[i], linewidth=1.8)
        if zero_shot[i] is not None and (points or n_rows == 0):
            ax.axhline(zero_shot[i], color=colors[i], linestyle="--", linewidth=1.0, alpha=0.7)
        if points or (zero_shot[i] is not None and n_rows == 0):
            handles.append(Line2D([], [], color=colors[i], marker="o", label=name))
    if any(b is not None for b in zero_shot):
        handles.append(Line2D([], [], color="grey", linestyle="--", label="zero-shot (base model)"))
    if handles:
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ---- CLI table ----------------------------------------------------------------------------------------------------


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def render_table(
    tasks: Sequence[str],
    matrix: Sequence[Row],
    zero_shot: Sequence[float | None],
    metrics: Mapping[str, float | None],
):
    """A rich Table: a zero-shot row, then one row per stage, one column per task (accuracy in %); AA / BWT / FWT /
    forgetting in the caption."""
    from rich.table import Table

    _check(tasks, matrix, zero_shot)
    summary = (
        f"AA {_pct(metrics.get('aa'))}   BWT {_pct(metrics.get('bwt'), True)}   "
        f"FWT {_pct(metrics.get('fwt'), True)}   forgetting {_pct(metrics.get('forgetting'))}"
    )
    legend = "percentage points; bold: just trained, italic: before training"
    table = Table(
        title="Accuracy (%) after each stage",
        caption=f"{summary}\n[dim]{legend}[/dim]",
        caption_justify="left",
        min_width=len(legend) + 2,  # keep the caption on its two lines
    )
    table.add_column("stage", style="cyan", no_wrap=True)
    for name in tasks:
        table.add_column(str(name), justify="right")
    table.add_row("zero-shot", *[_pct(v) if v is not None else "-" for v in zero_shot], style="dim", end_section=True)
    for t, row in enumerate(matrix):
        cells = []
        for i, v in enumerate(row):
            if v is None:
                cells.append("[dim]-[/dim]")
            elif i == t:
                cells.append(f"[bold]{_pct(v)}[/bold]")
            elif i > t:
                cells.append(f"[italic dim]{_pct(v)}[/italic dim]")
            else:
                cells.append(_pct(v))
        table.add_row(f"{t + 1} {tasks[t]}", *cells)
    return table
