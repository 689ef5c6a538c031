"""Evaluation results: the long-format table, a per-step markdown summary and a PNG of each metric vs step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from dataprep.evaluate.curves import save_png

RESULT_SCHEMA = pa.schema([
    pa.field("run", pa.string()), pa.field("pretrain", pa.string()), pa.field("checkpoint", pa.string()),
    pa.field("step", pa.int64()), pa.field("tokens", pa.int64()), pa.field("task", pa.string()),
    pa.field("metric", pa.string()), pa.field("value", pa.float64()),
])
# Metrics worth a column and a chart (counts such as `examples` stay in the table only).
SHOWN = {("heldout", "perplexity"), ("heldout", "bits_per_byte")}
SHOWN_METRICS = {"accuracy", "chance", "bleu", "chrf", "rouge1", "rouge2", "rougeL"}


def shown(task: str, metric: str) -> bool:
    return (task, metric) in SHOWN or (task != "heldout" and metric in SHOWN_METRICS)


def _series(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        if shown(row["task"], row["metric"]):
            series.setdefault((row["task"], row["metric"]), []).append((row["step"], row["value"]))
    return {key: sorted(points) for key, points in sorted(series.items())}


def summary_markdown(rows: list[dict[str, Any]], errors: list[dict[str, Any]]) -> str:
    """One line per checkpoint step, one column per shown (task, metric); then the errors."""
    series = _series(rows)
    columns = list(series)
    steps = sorted({row["step"] for row in rows})
    tokens = {row["step"]: row["tokens"] for row in rows}
    values = {(row["step"], row["task"], row["metric"]): row["value"] for row in rows}
    header = ["step", "tokens", *[f"{task} {metric}" for task, metric in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for step in steps:
        cells = [f"{step}", f"{tokens[step]:,}"]
        for task, metric in columns:
            value = values.get((step, task, metric))
            cells.append("—" if value is None or math.isnan(value) else f"{value:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    if errors:
        lines += ["", "Errors:", ""] + [f"- step {e.get('step')}, task `{e['task']}`: {e['error'].splitlines()[0]}"
                                        for e in errors]
    return "\n".join(lines) + "\n"


def metrics_png(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """A grid of small charts, one per shown (task, metric), value against training step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    series = _series(rows)
    count = max(1, len(series))
    columns = min(3, count)
    rows_n = math.ceil(count / columns)
    figure, axes = pyplot.subplots(rows_n, columns, figsize=(4 * columns, 3 * rows_n), squeeze=False)
    for axis, ((task, metric), points) in zip(axes.flat, series.items(), strict=False):
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-")
        axis.set_title(f"{task}: {metric}", fontsize=10)
        axis.set_xlabel("step")
    for axis in list(axes.flat)[len(series):]:
        axis.axis("off")
    figure.suptitle(title)
    save_png(figure, path, dpi=90)
