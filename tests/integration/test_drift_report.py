"""The drift_check stage on a real split directory: Evidently's HTML report is self-contained
(opens offline) and holds the same PSI values and verdicts as the JSON report."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.core import constants
from pipeline_tasks.data.contract import write_contract_dir
from pipeline_tasks.data.split import SplitConfig, split_contract_dir
from pipeline_tasks.data.synthetic import SyntheticConfig, generate
from pipeline_tasks.evaluation.drift import REPORT_HTML, REPORT_JSON, DriftConfig, drift_check_split

pytestmark = pytest.mark.integration

SMALL = SyntheticConfig(n_users=500, n_items=1000, n_days=56, n_events=30_000)


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Accepted contract dir and split dir, the newest window with 40 % of its views logged as clicks."""
    root = tmp_path_factory.mktemp("drift_stage")
    accepted, split = root / "accepted", root / "split"
    write_contract_dir(generate(SMALL).tables, accepted)
    split_contract_dir(accepted, split, SplitConfig())
    test = pd.read_parquet(split / "test.parquet")
    views = np.flatnonzero((test[constants.EVENT_TYPE] == "view").to_numpy())
    test.loc[np.random.default_rng(0).choice(views, int(0.4 * len(views)), replace=False),
             constants.EVENT_TYPE] = "click"
    test.to_parquet(split / "test.parquet", index=False)
    return {"accepted": accepted, "split": split, "root": root}


@pytest.fixture(scope="module")
def stage(stage_dirs: dict[str, Path]) -> dict[str, Any]:
    out_dir = stage_dirs["root"] / "drift_check"
    result = drift_check_split(stage_dirs["split"], stage_dirs["accepted"], out_dir, DriftConfig())
    return {"result": result, "out_dir": out_dir, "report": json.loads(Path(result["report_json"]).read_text()),
            "html": Path(result["report_html"]).read_text(encoding="utf-8")}


def dashboard(html: str) -> dict:
    """The report data Evidently embeds in its HTML (``var metric_<id> = {...};``)."""
    match = re.search(r"var metric_[0-9a-f]+ = (\{.*?\});\n", html)
    assert match, "no embedded dashboard data in the HTML report"
    return json.loads(match.group(1))


def widgets(node: dict) -> list[dict]:
    """Every widget in the tree, depth first."""
    found = [node]
    for child in node.get("widgets") or []:
        found += widgets(child)
    for tab in node.get("tabs") or []:
        found += widgets(tab["widget"])
    return found


def drift_table(html: str) -> dict[str, dict]:
    """Rows of the report's drift table by column name (drift score, verdict, test, type)."""
    for widget in widgets({"widgets": dashboard(html)["widgets"]}):
        params = widget.get("params") or {}
        if any(c.get("field") == "drift_score" for c in params.get("columns", [])):
            return {row["column_name"]: row for row in params["data"]}
    raise AssertionError("no drift table in the HTML report")


def test_stage_writes_both_reports_into_its_directory(stage: dict[str, Any]):
    result, out_dir = stage["result"], stage["out_dir"]
    assert Path(result["report_html"]) == out_dir / REPORT_HTML
    assert Path(result["report_json"]) == out_dir / REPORT_JSON
    assert result["flagged"] == ["event_type"], stage["report"]["features"]
    json.dumps(result)  # small and serialisable: it is the task's XCom


def test_html_report_is_self_contained(stage: dict[str, Any]):
    html = stage["html"]
    # Evidently inlines its JS bundle (about 3.5 MB) and its icon font: the report opens offline.
    assert len(html) > 1_000_000
    assert "window.drawDashboard" in html
    assert not re.findall(r"<script[^>]*\bsrc\s*=", html, flags=re.I), "external script in the report"
    assert not re.findall(r"<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//", html, flags=re.I), "external stylesheet"
    assert not re.findall(r"url\(\s*[\"']?(https?:)?//", html, flags=re.I), "external font or image"


def test_json_numbers_agree_with_the_html_report(stage: dict[str, Any]):
    report, table = stage["report"], drift_table(stage["html"])
    assert set(table) == set(report["features"])
    for name, feature in report["features"].items():
        row = table[name]
        assert row["stattest_name"] == "PSI"
        assert row["column_type"] == {"numeric": "num", "categorical": "cat"}[feature["kind"]]
        # The HTML rounds the drift score to 6 decimals.
        assert row["drift_score"] == pytest.approx(feature["psi"], abs=1e-6), name
        assert (row["data_drift"] == "Detected") == feature["flagged"], (name, row["data_drift"], feature)
    counters = [c for w in widgets({"widgets": dashboard(stage["html"])["widgets"]})
                for c in (w.get("params") or {}).get("counters", [])]
    assert {"label": "Drifted Columns", "value": str(len(report["flagged"]))} in counters
    # The headline says "detected" as soon as one feature is flagged, like the check itself, and labels
    # Evidently's drift share as the share of features, not as a threshold.
    headline = next(c["label"] for c in counters if c["value"] == "Dataset Drift")
    n = len(report["features"])
    assert headline.startswith(f"Dataset Drift is detected: {len(report['flagged'])} of {n} features have PSI "
                               f"above {report['threshold']}."), headline
    assert "detection threshold is" not in stage["html"]


def test_html_report_opens_with_the_per_feature_psi_verdict(stage: dict[str, Any]):
    """The banner at the top of the page agrees with the JSON report: threshold, counts, PSI."""
    report = stage["report"]
    match = re.search(r'<body[^>]*>\s*<div id="recsys-drift-banner"[^>]*><strong>(.*?)</strong>', stage["html"])
    assert match, "no drift banner at the top of the report's body"
    assert match.start() > stage["html"].index("</head>")  # in the page, not inside the head's inline JS
    listing = ", ".join(f"{c} (PSI {report['features'][c]['psi']:.3f})" for c in report["flagged"])
    assert html.unescape(match.group(1)) == (f"Per-feature PSI threshold {report['threshold']}: "
                                             f"{len(report['flagged'])} of {len(report['features'])} features "
                                             f"drifted: {listing}.")


def test_reference_path_overrides_the_train_window(stage_dirs: dict[str, Path]):
    """The champion's training data as reference: here the newest window itself, so the event mix
    shift that the train window shows (the ``stage`` test) is gone. Sampled to 2,000 rows a part:
    two different samples of one window, so PSI is small but not zero."""
    split = stage_dirs["split"]
    result = drift_check_split(split, stage_dirs["accepted"], stage_dirs["root"] / "drift_vs_self",
                               DriftConfig(max_rows=2000), reference_path=split / "test.parquet")
    report = json.loads(Path(result["report_json"]).read_text())
    assert result["flagged"] == [], report["features"]
    assert report["reference_rows"] == report["current_rows"] > 2000
    assert report["sampled_rows"]["reference"]["events"] == report["sampled_rows"]["current"]["events"] == 2000
