"""The Grafana dashboard (infra/grafana/serving.json) queries only metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from serving.metrics import ServerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "serving.json"


def test_every_dashboard_query_names_an_exported_metric() -> None:
    exported = {sample.name for family in ServerMetrics().registry.collect() for sample in family.samples}
    exported |= {family.name for family in ServerMetrics().registry.collect()}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"forgeline_[a-z0-9_]+", target["expr"])}
    assert len(queried) >= 12
    missing = {name for name in queried if name not in exported and name.removesuffix("_total") not in exported}
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
