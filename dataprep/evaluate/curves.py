"""Training curves: read `metrics.jsonl` and draw the loss curve (train, held-out, unigram baseline) as PNG."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from dataprep.shards import atomic_write_bytes


def save_png(figure: Any, path: Path, dpi: int = 100) -> None:
    """Render a matplotlib figure to PNG, close it, and publish the file atomically."""
    from matplotlib import pyplot

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    pyplot.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; the last row per step wins (a resumed run may have re-logged steps)."""
    if not path.is_file():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    return [rows[step] for step in sorted(rows)]


def loss_curve_png(rows: list[dict[str, Any]], path: Path, title: str, baseline: float | None = None) -> None:
    """Train loss per step, held-out loss where measured, and the unigram baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1)
    held = [r for r in rows if r.get("val_loss") is not None]
    if held:
        axis.plot([r["step"] for r in held], [r["val_loss"] for r in held], "o-", label="held-out loss")
    if baseline is not None:
        axis.axhline(baseline, linestyle="--", color="grey", label=f"unigram baseline {baseline:.2f}")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
