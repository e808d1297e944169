"""Evaluation reports: one table of models x tasks as JSON, Markdown, CSV and a bar chart.

A row is a merged model (named by its method) or ``individual``: each fine-tuned model on
its own task. Where the individual row exists, each merged row also gets its normalised
accuracy (merged / individual, per task, then averaged).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from common.files import write_files_atomically
from common.plots import pyplot, save_figure

INDIVIDUAL = "individual"

#: results[row][task] = {"accuracy": float, "loss": float, "num_samples": int}
Results = Mapping[str, Mapping[str, Mapping[str, float]]]


def summarize(results: Results) -> dict[str, Any]:
    """The report's content: per row, per task numbers plus averages and normalised accuracy."""
    rows = {}
    individual = results.get(INDIVIDUAL)
    for row, per_task in results.items():
        tasks = {task: dict(values) for task, values in per_task.items()}
        summary: dict[str, Any] = {
            "tasks": tasks,
            "average_accuracy": sum(v["accuracy"] for v in tasks.values()) / len(tasks),
            "average_loss": sum(v["loss"] for v in tasks.values()) / len(tasks),
        }
        if individual is not None and row != INDIVIDUAL:
            for task, values in tasks.items():
                reference = individual[task]["accuracy"]
                # None (JSON null) where the individual model scored 0: no ratio to give.
                values["normalized_accuracy"] = values["accuracy"] / reference if reference > 0 else None
            ratios = [v["normalized_accuracy"] for v in tasks.values()]
            summary["average_normalized_accuracy"] = None if None in ratios else sum(ratios) / len(ratios)
        rows[row] = summary
    return {"rows": rows}


def _columns(report: Mapping[str, Any]) -> tuple[list[str], bool]:
    first = next(iter(report["rows"].values()))
    normalized = any("average_normalized_accuracy" in row for row in report["rows"].values())
    return list(first["tasks"]), normalized


def table_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the accuracy table (percent), shared by Markdown, CSV and W&B."""
    tasks, normalized = _columns(report)
    header = ["model", *tasks, "average"] + (["normalized average"] if normalized else [])
    lines = []
    for name, row in report["rows"].items():
        cells = [f"{100 * row['tasks'][task]['accuracy']:.2f}" for task in tasks]
        cells.append(f"{100 * row['average_accuracy']:.2f}")
        if normalized:
            value = row.get("average_normalized_accuracy")
            cells.append(f"{100 * value:.2f}" if value is not None else "")
        lines.append([name, *cells])
    return header, lines


def markdown(report: Mapping[str, Any], title: str) -> str:
    header, lines = table_rows(report)
    first = next(iter(report["rows"].values()))
    counts = ", ".join(f"{task} {int(values['num_samples'])}" for task, values in first["tasks"].items())
    out = [f"# {title}", "", "Top-1 accuracy (%) on each task's test split.", ""]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(" --- " for _ in header) + "|")
    out += ["| " + " | ".join(line) + " |" for line in lines]
    out += ["", f"Test samples: {counts}.", ""]
    return "\n".join(out)


def _csv(report: Mapping[str, Any]) -> str:
    header, lines = table_rows(report)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(lines)
    return buffer.getvalue()


def bar_chart(report: Mapping[str, Any], title: str, path: Path) -> None:
    """Per-task accuracy, one bar group per task and one colour per row, written to ``path``."""
    plt = pyplot()
    tasks, _ = _columns(report)
    labels = [*tasks, "average"]
    rows = report["rows"]
    width = 0.8 / len(rows)
    legend_width = 3.5 if len(rows) > 1 else 0.0
    height = max(4.0, 1.0 + 0.2 * len(rows))  # room for a legend entry per row
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * max(1, len(rows) / 2)) + legend_width, height))
    for index, (name, row) in enumerate(rows.items()):
        values = [100 * row["tasks"][task]["accuracy"] for task in tasks] + [100 * row["average_accuracy"]]
        positions = [i + (index - (len(rows) - 1) / 2) * width for i in range(len(labels))]
        axes.bar(positions, values, width=width, label=name)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    if len(rows) > 1:
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    save_figure(figure, path)


def write_report(
    results: Results,
    directory: str | Path,
    title: str,
    extra: Mapping[str, Any] | None = None,
    sections: Sequence[str] = (),
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` (the table, then ``sections``), ``report.csv`` and
    ``accuracy.png`` to ``directory``, all four or none (``write_files_atomically``: a full disk
    leaves no part of a report)."""
    report = {"title": title, **(dict(extra) if extra else {}), **summarize(results)}
    # Strict JSON: a NaN would be written as a bare NaN, which JSON readers refuse.
    content = json.dumps(report, indent=2, allow_nan=False) + "\n"
    texts = {"report.json": content, "report.md": "\n".join([markdown(report, title), *sections]), "report.csv": _csv(report)}
    writers = {name: partial(_write_text, text=text) for name, text in texts.items()}
    writers["accuracy.png"] = partial(bar_chart, report, title)
    write_files_atomically(Path(directory), writers, "model.report_dir")
    return report


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)
