"""Figures drawn to files on any machine (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path, dpi: int = 120) -> None:
    """Write ``figure`` to ``path`` as it is (a staging file of ``common.files.write_files_atomically``,
    which makes the figure appear whole or not at all) and close it."""
    try:
        figure.savefig(path, dpi=dpi, format=Path(path).suffix.lstrip(".") or None)
    finally:
        pyplot().close(figure)
