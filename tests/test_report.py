"""pipelines.report: results.json on a hand-made accuracy matrix, the PNG plots and the rich summary table."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from pipelines.report import plot_forgetting, plot_heatmap, render_table, write_results

TASKS = ["nouns", "verbs", "antonyms"]
# stage t learns task t; R[0][1] and R[1][2] are the scores of the next task before it is trained (forward transfer)
MATRIX = [[0.8, 0.3, None], [0.6, 0.9, 0.4], [0.5, 0.7, 0.95]]
ZERO_SHOT = [0.2, 0.25, 0.3]
STAGES = [
    {"task": "nouns", "train_s": 10.0, "eval_s": 1.5, "tokens_per_s": 200.0},
    {"task": "verbs", "train_s": 11.0, "eval_s": 1.25, "tokens_per_s": 210.0, "extra": "dropped"},
    {"task": "antonyms", "train_s": 12.0, "eval_s": 2.0, "tokens_per_s": None},
]
# AA = mean(.5, .7, .95); BWT = mean(.5 - .8, .7 - .9); FWT = mean(.3 - .25, .4 - .3); forgetting = mean(.3, .2)
EXPECTED = {"aa": 2.15 / 3, "bwt": -0.25, "fwt": 0.075, "forgetting": 0.25}


def test_results_json_exact(tmp_path):
    out = write_results(tmp_path / "run", TASKS, MATRIX, ZERO_SHOT, STAGES)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == out
    assert list(on_disk) == ["tasks", "matrix", "zero_shot", "aa", "bwt", "fwt", "forgetting", "stages"]
    assert on_disk["tasks"] == TASKS and on_disk["matrix"] == MATRIX and on_disk["zero_shot"] == ZERO_SHOT
    for key, value in EXPECTED.items():
        assert on_disk[key] == pytest.approx(value), key
    assert on_disk["stages"] == [
        {"task": "nouns", "train_s": 10.0, "eval_s": 1.5, "tokens_per_s": 200.0},
        {"task": "verbs", "train_s": 11.0, "eval_s": 1.25, "tokens_per_s": 210.0},
        {"task": "antonyms", "train_s": 12.0, "eval_s": 2.0, "tokens_per_s": None},
    ]
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name != "results.json"]  # no temporary left


def test_results_json_partial_run(tmp_path):
    """After the first stage: one row, the next task's pre-training score present, the rest null."""
    out = write_results(tmp_path, TASKS, MATRIX[:1], [0.2, None, 0.3], STAGES[:1])
    assert out["matrix"] == [[0.8, 0.3, None]] and out["zero_shot"] == [0.2, None, 0.3]
    assert (out["aa"], out["bwt"], out["fwt"], out["forgetting"]) == (0.8, None, None, None)
    two = write_results(tmp_path, TASKS, [[0.8, None, None], [0.6, 0.9, None]], ZERO_SHOT, STAGES[:2])
    assert two["fwt"] is None  # R[0][1] was not measured: no forward-transfer term
    assert two["bwt"] == pytest.approx(-0.2) and two["forgetting"] == pytest.approx(0.2)
    empty = write_results(tmp_path, TASKS, [], ZERO_SHOT, [])
    assert empty["matrix"] == [] and empty["aa"] is None and empty["stages"] == []
    assert json.loads((tmp_path / "results.json").read_text()) == empty


@pytest.mark.parametrize(
    ("matrix", "zero_shot", "stages", "match"),
    [
        ([[80.0, None, None]], ZERO_SHOT, STAGES[:1], "fractions"),
        ([[0.8, None]], ZERO_SHOT, STAGES[:1], "entries"),
        ([[0.8, None, None], [0.6, None, None]], ZERO_SHOT, STAGES[:2], "missing"),
        ([[0.8, None, None]], ZERO_SHOT[:2], STAGES[:1], "zero-shot"),
        ([[0.8, None, None]], ZERO_SHOT, STAGES[:2], "stage records"),
        ([[float("nan"), None, None]], ZERO_SHOT, STAGES[:1], "accuracy"),
    ],
)
def test_results_json_rejects_bad_input(tmp_path, matrix, zero_shot, stages, match):
    with pytest.raises(ValueError, match=match):
        write_results(tmp_path, TASKS, matrix, zero_shot, stages)
    assert not (tmp_path / "results.json").exists()


def _png_size(path) -> tuple[int, int]:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    img = imread(path)
    return img.shape[1], img.shape[0]


@pytest.mark.parametrize("rows", [0, 1, 3])
def test_plots_written(tmp_path, rows):
    heat = plot_heatmap(tmp_path / "plots" / f"heatmap{rows}.png", TASKS, MATRIX[:rows])
    curves = plot_forgetting(tmp_path / "plots" / f"forgetting{rows}.png", TASKS, MATRIX[:rows], ZERO_SHOT)
    for path in (heat, curves):
        w, h = _png_size(path)
        assert w > 300 and h > 200


def test_plot_rejects_ragged_matrix(tmp_path):
    with pytest.raises(ValueError, match="entries"):
        plot_heatmap(tmp_path / "h.png", TASKS, [[0.5, 0.5]])


def test_render_table():
    metrics = {k: EXPECTED[k] for k in ("aa", "bwt", "fwt", "forgetting")}
    console = Console(record=True, width=160, color_system=None)
    console.print(render_table(TASKS, MATRIX, ZERO_SHOT, metrics))
    text = console.export_text()
    for needle in (*TASKS, "zero-shot", "1 nouns", "3 antonyms", "95.0", "20.0"):
        assert needle in text, needle
    assert "AA 71.7" in text and "BWT -25.0" in text and "FWT +7.5" in text and "forgetting 25.0" in text
    lines = text.splitlines()
    stage2 = next(line for line in lines if "2 verbs" in line)
    assert ["60.0", "90.0", "40.0"] == [c for c in stage2.replace("│", " ").split() if "." in c]
    stage1 = next(line for line in lines if "1 nouns" in line)
    assert stage1.count("-") >= 1  # task 3 not evaluated after stage 1

    console = Console(record=True, width=160, color_system=None)
    console.print(render_table(TASKS, [], [None] * 3, {"aa": None}))
    assert "AA n/a" in console.export_text()
