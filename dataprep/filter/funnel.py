"""The filter funnel: documents and characters left after each step, as a markdown table and a PNG chart."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from dataprep.shards import atomic_write_bytes


def funnel_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per step, in chain order (`stats["steps"]` is a list): documents in, dropped and left;
    characters removed by drops and by line-level rewrites."""
    rows = []
    left = stats["records_in"]
    for step in stats["steps"]:
        name = step["name"]
        left -= step["docs_dropped"]
        rows.append({"step": name, "docs_in": step["docs_in"], "dropped": step["docs_dropped"], "left": left,
                     "flagged": step["docs_flagged"], "chars_dropped": step["chars_dropped"],
                     "lines_removed": step["lines_removed"], "chars_removed_in_lines": step["chars_removed_in_lines"]})
    return rows


def funnel_markdown(stats: dict[str, Any]) -> str:
    lines = [
        "| step | docs in | dropped | left | % of input left | flagged | chars dropped | lines removed | "
        "chars removed in lines |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total = max(stats["records_in"], 1)
    for row in funnel_rows(stats):
        lines.append(f"| {row['step']} | {row['docs_in']:,} | {row['dropped']:,} | {row['left']:,} | "
                     f"{100 * row['left'] / total:.1f} % | {row['flagged']:,} | {row['chars_dropped']:,} | "
                     f"{row['lines_removed']:,} | {row['chars_removed_in_lines']:,} |")
    return "\n".join(lines) + "\n"


def funnel_png(stats: dict[str, Any], path: Path, title: str) -> None:
    """A horizontal bar chart of documents left after each step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = funnel_rows(stats)
    labels = ["input", *[row["step"] for row in rows]]
    values = [stats["records_in"], *[row["left"] for row in rows]]
    figure, axes = pyplot.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    bars = axes.barh(labels[::-1], values[::-1], color="#4C72B0")
    axes.bar_label(bars, labels=[f"{v:,}" for v in values[::-1]], padding=3)
    axes.set_xlabel("documents left after the step")
    axes.set_title(title)
    axes.set_xlim(0, max(values) * 1.15 if max(values) else 1)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
