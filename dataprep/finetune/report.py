"""The base-vs-tuned comparison as a markdown table and a PNG (held-out answer loss, exact match, chrF)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dataprep.evaluate.curves import save_png

COLUMNS = (("held_out_loss", "held-out answer loss (nats/token)"), ("exact_match", "exact match"),
           ("chrf", "chrF"))


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """One row per model: held-out answer-token loss, exact match and chrF of greedy answers."""
    lines = ["| model | " + " | ".join(label for _, label in COLUMNS) + " | answers |",
             "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [f"{row[key]:.4f}" if isinstance(row[key], float) and not math.isnan(row[key]) else str(row[key])
                 for key, _ in COLUMNS]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {row['answers_scored']} |")
    return "\n".join(lines) + "\n"


def comparison_png(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Three bar panels, base and tuned side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(COLUMNS), figsize=(10, 3.5))
    names = [row["model"] for row in rows]
    for axis, (key, label) in zip(axes, COLUMNS, strict=True):
        values = [float(row[key]) for row in rows]
        bars = axis.bar(names, values, color=["#999999", "#3366cc"][: len(names)])
        axis.bar_label(bars, fmt="%.3f")
        axis.set_title(label, fontsize=9)
    figure.suptitle(title)
    save_png(figure, path)
