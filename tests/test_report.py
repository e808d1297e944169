"""The report's tables and figures at the width of the 20-task benchmark: task abbreviations in
the Markdown table (with their legend) and the W&B table, full names in the CSV, and a heat map
that grows with the table and carries its numbers while they fit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

import callbacks.report as report_module
import merge_fixtures as mf
from callbacks.report import markdown, summarize, table_rows, write_report
from common.names import TASK_ABBREVIATIONS, task_abbreviation
from datamodules.tasks import BENCHMARKS, TASKS

#: The eight tasks and the twelve of TALL20, in the benchmark's order.
TALL20 = BENCHMARKS["tall20"]
DPI = 120  # common.plots.save_figure's


def results(tasks, rows: int, individual: bool = True) -> dict:
    """``rows`` merged rows (and ``individual``) with distinct accuracies per task."""
    names = [f"ties(top_k={index / 100:g}, scaling_factor=1)" for index in range(rows)]
    out = {
        name: {
            task: {"accuracy": (7 * r + 3 * t) % 100 / 100, "loss": 1.0 + t, "num_samples": 10 + t}
            for t, task in enumerate(tasks)
        }
        for r, name in enumerate(names)
    }
    if individual:
        out["individual"] = {task: {"accuracy": 0.9, "loss": 0.5, "num_samples": 10 + t} for t, task in enumerate(tasks)}
    return out


def test_every_hub_task_has_one_fixed_abbreviation():
    hub_tasks = [name for name, info in TASKS.items() if info.hub_dataset is not None]
    assert set(hub_tasks) <= set(TASK_ABBREVIATIONS), "a registry task without an abbreviation"
    assert set(TALL20) <= set(TASK_ABBREVIATIONS)
    assert len(set(TASK_ABBREVIATIONS.values())) == len(TASK_ABBREVIATIONS), "two tasks, one column name"
    assert task_abbreviation("Stanford-Cars") == "Cars" and task_abbreviation("sun397") == "SUN"
    assert task_abbreviation("digits") == "digits", "a task without one keeps its name"


def test_the_markdown_and_wandb_tables_abbreviate_and_the_csv_keeps_the_names(tmp_path):
    report = write_report(results(TALL20, rows=3), tmp_path, "TALL20")
    header, lines = table_rows(report)
    assert header == ["model", *(TASK_ABBREVIATIONS[task] for task in TALL20), "average", "normalized average"]
    assert header[1:9] == ["SUN", "Cars", "RES", "EuSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    full_header, full_lines = table_rows(report, abbreviate=False)
    assert full_header == ["model", *TALL20, "average", "normalized average"]
    assert full_lines == lines, "the same cells whatever the header"
    with open(tmp_path / "report.csv", newline="") as file:
        assert list(csv.reader(file)) == [full_header, *lines]
    text = (tmp_path / "report.md").read_text()
    assert "| " + " | ".join(header) + " |" in text
    for line in lines:
        assert "| " + " | ".join(line) + " |" in text
    legend = ", ".join(f"{TASK_ABBREVIATIONS[task]} = {task}" for task in TALL20)
    assert f"Tasks: {legend}." in text
    # report.json keeps the tasks' own names, and every cell is its number in percent.
    content = json.loads((tmp_path / "report.json").read_text())
    assert list(content["rows"]["individual"]["tasks"]) == list(TALL20)
    first = content["rows"][lines[0][0]]
    assert lines[0][1:3] == [f"{100 * first['tasks'][task]['accuracy']:.2f}" for task in TALL20[:2]]


def test_a_table_of_unabbreviated_tasks_has_no_legend():
    report = {"title": "t", **summarize(results(("digits", "mnist5k"), rows=1, individual=False))}
    text = markdown(report, "t")
    assert "| model | digits | mnist5k | average |" in text
    assert "Tasks:" not in text


def test_the_report_is_five_files(tmp_path):
    write_report(results(("eurosat", "dtd"), rows=2), tmp_path, "two tasks")
    assert sorted(path.name for path in tmp_path.iterdir()) == mf.REPORT_FILES


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report draws, by file name: their size in inches and their texts. Only the
    ones written under a name of ``keep`` become files (drawing a 2,000-cell figure takes seconds)."""
    figures = {}
    keep = set()
    save = report_module.save_figure

    def record(figure, path, dpi=DPI):
        name = Path(path).name.split(".")[1]  # the staging file of accuracy.png: .accuracy.<random>.png
        figures[name] = (figure.get_size_inches().copy(), list(figure.axes[0].texts))
        if name in keep:
            save(figure, path, dpi)
        else:
            report_module.pyplot().close(figure)

    monkeypatch.setattr(report_module, "save_figure", record)
    figures["keep"] = keep
    return figures


def staged(directory: Path, name: str) -> Path:
    """A path like the staging file of ``name`` that ``write_files_atomically`` hands a writer."""
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f".{Path(name).stem}.staged{Path(name).suffix}"


def test_the_heat_map_grows_with_the_table_and_numbers_its_cells_while_they_fit(tmp_path, drawn):
    """20 tasks and 40 rows: 0.3 inch a row, 0.5 inch a column (the 20 tasks and the average),
    every one of the 840 cells with its number; 81 rows (1,701 cells, up to the 60 x 32 that are
    numbered) too; 101 rows: no numbers, the cells alone."""
    drawn["keep"].add("accuracy_heatmap")
    report = {"title": "TALL20", **summarize(results(TALL20, rows=39))}
    path = staged(tmp_path, "accuracy_heatmap.png")
    report_module.heat_map(report, "TALL20", path)
    (width, height), texts = drawn["accuracy_heatmap"]
    assert height == pytest.approx(1.8 + 0.3 * 40)
    longest = max(len(name) for name in report["rows"])
    assert width == pytest.approx(0.8 + 0.065 * longest + 1.2 + 0.5 * 21)
    assert len(texts) == 40 * 21
    row = report["rows"]["individual"]
    numbers = [f"{100 * row['tasks'][task]['accuracy']:.1f}" for task in TALL20] + [f"{100 * row['average_accuracy']:.1f}"]
    assert [text.get_text() for text in texts[-21:]] == numbers, "the last row, the individual models, cell by cell"
    with Image.open(path) as image:
        assert image.size == (round(width * DPI), round(height * DPI))

    drawn["keep"].clear()
    report_module.heat_map({"rows": summarize(results(TALL20, rows=80))["rows"]}, "TALL20", path)
    assert len(drawn["accuracy_heatmap"][1]) == 81 * 21
    report_module.heat_map({"rows": summarize(results(TALL20, rows=100))["rows"]}, "TALL20", path)
    (_, height), texts = drawn["accuracy_heatmap"]
    assert texts == [] and height == pytest.approx(1.8 + 0.3 * 101)


def test_the_bar_chart_of_a_wide_table_stays_drawable(tmp_path, drawn):
    """20 tasks and 40 rows would be a 465-inch chart (56,000 pixels; from 47 rows past the 2**16
    Agg draws at most): capped at 40 inches of bars and the legend's 3.5."""
    report_module.bar_chart({"rows": summarize(results(TALL20, rows=39))["rows"]}, "TALL20", staged(tmp_path, "accuracy.png"))
    (width, _), _ = drawn["accuracy"]
    assert width == pytest.approx(40.0 + 3.5)
    assert width * DPI < 2**16
