"""What both reports share: results.json, results.md and the plots written to ``--out``, and markdown helpers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Results = dict[str, Any]
Render = Callable[[Results], list[str]]


def write_outputs(
    results: Results,
    out: str,
    markdown: Callable[[Results], str],
    plots: Callable[[Results, Path], list[Path]],
) -> list[Path]:
    """Write ``results.json``, ``results.md`` (``markdown(results)``) and ``plots(results, DIR)`` into ``out``."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "results.json", directory / "results.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    written[1].write_text(markdown(results) + "\n")
    return written + plots(results, directory)


def section(results: Results, name: str) -> dict[str, Any] | None:
    """The section ``name`` if it ran and was measured, else None (it is then left out of the report)."""
    found = results.get(name)
    if isinstance(found, dict) and found.get("status") not in ("failed", "not measured"):
        return found
    return None


def table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def document(head: list[str], results: Results, renders: Iterable[Render]) -> str:
    """``head``, a line per failed section, then each rendered section that has lines, blank-line separated."""
    lines = list(head)
    for name in results["failed_sections"]:
        lines += ["", f"**Section {name} failed:** {results[name]['error']}"]
    for render in renders:
        if rendered := render(results):
            lines += ["", *rendered]
    return "\n".join(lines)


def save_figure(fig: Any, path: Path, written: list[Path]) -> None:
    """Save a matplotlib figure as a PNG, close it, and add ``path`` to ``written``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
