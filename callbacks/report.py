"""Evaluation reports: one table of models x tasks as JSON, Markdown, CSV, a bar chart and a heat map,
written at the end of a test run by the ``ReportFiles`` callback.

A row is a merged model (named by its method) or ``individual``: each fine-tuned model on
its own task. Where the individual row exists, each merged row also gets its normalised
accuracy (merged / individual, per task, then averaged).

Wide tables (the Markdown table, the W&B table and both figures) name each task by its fixed
abbreviation (``common.names.TASK_ABBREVIATIONS``: ``SUN``, ``Cars``, ...), with a legend line in
``report.md``, so that 20 tasks fit a screen; ``report.csv`` and ``report.json``, read by
programs, keep the tasks' own names.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from common.files import write_files_atomically
from common.names import task_abbreviation
from common.plots import pyplot, save_figure

INDIVIDUAL = "individual"
#: Rows x columns of the heat map up to which every cell carries its number.
_ANNOTATED_CELLS = 60 * 32
#: The bar chart's widest figure (inches): at 20 tasks and 40 rows it would otherwise be 465
#: inches (56,000 pixels), and from 47 rows past the 2**16 pixels Agg draws at most; the heat map
#: is the figure for such tables.
_BAR_CHART_MAX_WIDTH = 40.0

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


def task_legend(tasks: Sequence[str]) -> str:
    """``SUN = sun397, Cars = stanford_cars, ...``: every abbreviated task of ``tasks`` ("" if none is)."""
    return ", ".join(f"{task_abbreviation(task)} = {task}" for task in tasks if task_abbreviation(task) != task)


def table_rows(report: Mapping[str, Any], abbreviate: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the accuracy table (percent), shared by Markdown, CSV and W&B: the
    same cells everywhere; the header names the tasks by their abbreviations (``abbreviate``:
    Markdown and W&B) or by their own names (CSV)."""
    tasks, normalized = _columns(report)
    columns = [task_abbreviation(task) for task in tasks] if abbreviate else tasks
    header = ["model", *columns, "average"] + (["normalized average"] if normalized else [])
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
    legend = task_legend(list(first["tasks"]))
    out += ["", *([f"Tasks: {legend}.", ""] if legend else []), f"Test samples: {counts}.", ""]
    per_task = report.get("per_task_backbones")
    if per_task:
        names = ", ".join(f"`{name}`" for name in per_task)
        out += [f"One backbone per task, which the task id picks at inference (each task scored with its own): {names}.", ""]
    if "precision" in report:
        out += [*precision_lines(report["precision"]), ""]
    return "\n".join(out)


def precision_lines(report: Mapping[str, Any]) -> list[str]:
    """``report.md``'s lines on the evaluation's precision (``report.json``'s ``precision``, made by
    ``lightning_modules.precision.precision_report``)."""
    name = report["trainer"] + (" with TF32" if report["tf32"] else "")
    if "reference" not in report:
        return [f"Precision: {name} (IEEE float32)."]
    changed = report["changed_predictions"]
    if changed is None:
        return [
            f"Precision: {name}. Predictions changed against IEEE float32 ({report['reference']}): not measured ({report['not_measured']})."
        ]
    predictions = report["test_predictions"]
    lines = [
        f"Precision: {name}. Test predictions that change against an IEEE float32 pass ({report['reference']}) of the same weights:",
        "",
    ]
    for row, tasks in changed.items():
        per_task = ", ".join(f"{task} {count:,}/{predictions[task]:,}" for task, count in tasks.items())
        lines.append(f"- {row}: {sum(tasks.values()):,} of {sum(predictions[task] for task in tasks):,} ({per_task})")
    return lines


def _csv(report: Mapping[str, Any]) -> str:
    header, lines = table_rows(report, abbreviate=False)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(lines)
    return buffer.getvalue()


def bar_chart(report: Mapping[str, Any], title: str, path: Path) -> None:
    """Per-task accuracy, one bar group per task and one colour per row, written to ``path``."""
    plt = pyplot()
    tasks, _ = _columns(report)
    labels = [*(task_abbreviation(task) for task in tasks), "average"]
    rows = report["rows"]
    width = 0.8 / len(rows)
    legend_width = 3.5 if len(rows) > 1 else 0.0
    height = max(4.0, 1.0 + 0.2 * len(rows))  # room for a legend entry per row
    groups_width = min(_BAR_CHART_MAX_WIDTH, max(6.0, 1.1 * len(labels) * max(1, len(rows) / 2)))
    figure, axes = plt.subplots(figsize=(groups_width + legend_width, height))
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


def heat_map(report: Mapping[str, Any], title: str, path: Path) -> None:
    """Rows x tasks (and the average), one cell per accuracy on a fixed 0-100% colour scale,
    written to ``path``. The figure grows with the table (0.3 inch a row, 0.5 inch a column) and,
    up to ``_ANNOTATED_CELLS`` cells, every cell carries its number."""
    plt = pyplot()
    tasks, _ = _columns(report)
    names = list(report["rows"])
    values = [
        [100 * row["tasks"][task]["accuracy"] for task in tasks] + [100 * row["average_accuracy"]]
        for row in report["rows"].values()
    ]
    columns = [*(task_abbreviation(task) for task in tasks), "average"]
    label_width = 0.8 + 0.065 * max(len(name) for name in names)  # inches for the row names
    width = max(5.0, label_width + 1.2 + 0.5 * len(columns))
    height = 1.8 + 0.3 * len(names)
    figure, axes = plt.subplots(figsize=(width, height))
    image = axes.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names, fontsize="small")
    axes.axvline(len(tasks) - 0.5, color="white", linewidth=2)  # the average apart from the tasks
    if len(names) * len(columns) <= _ANNOTATED_CELLS:
        for i, line in enumerate(values):
            for j, value in enumerate(line):
                # viridis is dark below about 60%: white digits there, black above
                axes.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7, color="white" if value < 60 else "black")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02, label="top-1 accuracy (%)")
    figure.tight_layout()
    save_figure(figure, path)


def build_report(results: Results, title: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``report.json``: the title, ``extra``'s fields and ``summarize(results)``."""
    return {"title": title, **(dict(extra) if extra else {}), **summarize(results)}


def write_report(
    results: Results,
    directory: str | Path,
    title: str,
    extra: Mapping[str, Any] | None = None,
    sections: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the report of ``results`` to ``directory`` (``write_report_files``) and return its content."""
    report = build_report(results, title, extra)
    write_report_files(report, directory, sections)
    return report


def write_report_files(report: Mapping[str, Any], directory: str | Path, sections: Sequence[str] = ()) -> None:
    """Write ``report`` (``build_report``'s) to ``directory``: ``report.json``, ``report.md`` (the
    table, then ``sections``), ``report.csv``, the bar chart ``accuracy.png`` and the heat map
    ``accuracy_heatmap.png``, all five or none (``write_files_atomically``: a full disk leaves no
    part of a report)."""
    title = report["title"]
    # Strict JSON: a NaN would be written as a bare NaN, which JSON readers refuse.
    content = json.dumps(report, indent=2, allow_nan=False) + "\n"
    texts = {"report.json": content, "report.md": "\n".join([markdown(report, title), *sections]), "report.csv": _csv(report)}
    writers = {name: partial(_write_text, text=text) for name, text in texts.items()}
    writers["accuracy.png"] = partial(bar_chart, report, title)
    writers["accuracy_heatmap.png"] = partial(heat_map, report, title)
    write_files_atomically(Path(directory), writers, "model.report_dir")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


class ReportFiles(Callback):
    """At the end of a test run, rank 0 writes the module's ``report`` (the content of
    ``report.json``, which ``MultiTaskEvaluation`` computes) with ``write_report_files``, the
    module's ``report_sections()`` after the table of ``report.md``, and prints ``report.md``.

    Args:
        directory: where the five files go (``--model.report_dir``).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report: Any = getattr(pl_module, "report", None)
        if not trainer.is_global_zero or report is None:
            return
        write_report_files(report, self.directory, pl_module.report_sections())
        print(Path(self.directory, "report.md").read_text())
