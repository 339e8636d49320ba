"""The validate stage's results page (``data_docs/index.html``): the gate's verdict, each rule by its
reason with the rows it flagged, stubs, spikes and files; self-contained and escaped. Real GX runs."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from pipeline_tasks.data.contract import ContractTables, normalise_interactions, normalise_items, normalise_users
from pipeline_tasks.data.quality_report import render_quality_page
from pipeline_tasks.data.validate import DataQualityError, ValidationConfig, validate_contract_dir, validate_tables

NOW = datetime(2025, 6, 1, tzinfo=UTC)
BASE = pd.Timestamp("2025-03-01T12:00:00Z")
EVIL_ID = "<b>x</b><script>alert(1)</script>"


def rows(n: int) -> list[dict]:
    """n clean interactions, one per (user, item), an hour apart."""
    return [{"user_id": f"u{i % 5}", "item_id": f"i{i}", "timestamp": (BASE + pd.Timedelta(hours=i)).isoformat(),
             "event_type": "view", "value": None} for i in range(n)]


class Page(HTMLParser):
    """Table rows of a page as cell texts, each under the heading (h2/h3) it follows."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.links: list[str] = []
        self._heading: str = ""
        self._in_heading = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("h2", "h3"):
            self._heading, self._in_heading = "", True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "a":
            self.links += [v or "" for k, v in attrs if k == "href"]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "h3"):
            self._in_heading = False
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.setdefault(self._heading, []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self._heading += data
        if self._cell is not None:
            self._cell.append(data)

    def by_first_cell(self, heading: str) -> dict[str, list[str]]:
        return {r[0]: r for r in self.rows[heading][1:]}


@pytest.fixture(scope="module")
def passed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """41 interactions: one duplicate, one too old (39 accepted, 95.1 %: passes), one naming an item the
    table lacks, whose id is HTML; no users table."""
    root = tmp_path_factory.mktemp("page")
    data = rows(40)
    data[5]["timestamp"] = "2020-01-01T00:00:00Z"
    data[7]["item_id"] = EVIL_ID
    data.append(dict(data[2]))
    src = root / "src"
    src.mkdir()
    pd.DataFrame(data).to_csv(src / "interactions.csv", index=False)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(40)]}).to_csv(src / "items.csv", index=False)
    out = validate_contract_dir(src, root / "out", ValidationConfig(), now=NOW)
    page = Path(out["data_docs"])
    return {"out": root / "out", "page": page, "html": page.read_text(encoding="utf-8"),
            "report": json.loads((root / "out" / "report.json").read_text())}


def test_page_is_the_data_docs_index_and_shows_the_gate_verdict(passed_run: dict):
    assert passed_run["page"] == passed_run["out"] / "data_docs" / "index.html"
    html = passed_run["html"]
    assert "Quality gate PASSED" in html and "FAILED" not in html
    assert "Quality: 95.12 % of interactions accepted (threshold 95.00 %): passes." in html


def test_page_counts_every_table(passed_run: dict):
    tables_ = Page(passed_run["html"]).by_first_cell("Tables")
    assert tables_["interactions"][1:4] == ["41", "39", "2"]
    assert tables_["items"][1:5] == ["40", "40", "0", "1"]  # one stub row on top of the 40 accepted
    assert tables_["users"][1:5] == ["0", "0", "0", "5"]


def test_page_names_each_rule_by_its_reason_with_the_rows_it_flagged(passed_run: dict):
    page = Page(passed_run["html"])
    suites = {t: json.loads((Path(__file__).parents[2] / "expectations" / f"{t}.json").read_text())
              for t in ("interactions", "items", "users")}
    for table, suite in suites.items():
        shown = page.by_first_cell(table)
        assert set(shown) == {e["meta"]["reason"] for e in suite["expectations"]}, table
        for e in suite["expectations"]:
            assert shown[e["meta"]["reason"]][1] == e["meta"]["notes"]
    interactions = page.by_first_cell("interactions")
    flagged = {reason: int(row[3]) for reason, row in interactions.items()}
    assert flagged == {**dict.fromkeys(flagged, 0), "too_old_timestamp": 1, "duplicate": 1}
    assert "raise horizon_days from 730" in interactions["too_old_timestamp"][4]
    # The contract's column names, not the helper columns or GX's success percent.
    assert interactions["too_old_timestamp"][2] == "timestamp"
    for noise in ("_ts_epoch", "_dup_rank", "_user_day_events", "Success Percent", "success_percent"):
        assert noise not in passed_run["html"]


def test_page_shows_stubs_and_where_the_files_are(passed_run: dict):
    page = Page(passed_run["html"])
    stubs = page.by_first_cell("Stubbed entities")
    assert stubs["items"][1:6] == ["1", "1", "2.56 %", "5.00 %", EVIL_ID]
    assert stubs["users"][4] == "does not apply (no users table)"
    files = {row[1] for row in page.rows["Files"][1:]}
    assert str(passed_run["out"] / "quarantine" / "interactions.parquet") in files
    assert "gx/index.html" in page.links
    assert (passed_run["page"].parent / "gx" / "index.html").exists()


def test_page_is_self_contained_and_escaped(passed_run: dict):
    html = passed_run["html"]
    assert "<style>" in html
    assert not re.search(r"<(script|link|img|iframe)\b", html, flags=re.I)
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html, flags=re.I)
    assert "url(" not in html and "http" not in html
    assert "&lt;b&gt;x&lt;/b&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_failed_gate_page_says_failed_with_the_message(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame(rows(20)).to_csv(src / "interactions.csv", index=False)
    pd.DataFrame({"item_id": ["i0"]}).to_csv(src / "items.csv", index=False)
    with pytest.raises(DataQualityError) as err:
        validate_contract_dir(src, tmp_path / "out", ValidationConfig(), now=NOW)
    html = (tmp_path / "out" / "data_docs" / "index.html").read_text(encoding="utf-8")
    assert "Quality gate FAILED" in html and "PASSED" not in html
    assert "Interactions naming an item missing from the items table: 19 (95.00 %; limit 5.00 %: fails)." in html
    assert escape(str(err.value)) in html


def test_page_lists_volume_spikes():
    days = pd.date_range("2025-01-01", periods=40, freq="D", tz="UTC")
    data = []
    for d_i, day in enumerate(days):
        n = 60 if d_i == 35 else 5 + (d_i % 3)
        data += [{"user_id": f"u{k % 5}", "item_id": f"i{k}", "event_type": "view", "value": None,
                  "timestamp": (day + pd.Timedelta(minutes=k)).isoformat()} for k in range(n)]
    contract = ContractTables(normalise_interactions(pd.DataFrame(data)),
                              normalise_items(pd.DataFrame({"item_id": [f"i{i}" for i in range(60)]})),
                              normalise_users(pd.DataFrame({"user_id": [f"u{i}" for i in range(5)]})))
    report = validate_tables(contract, ValidationConfig(), now=NOW).report
    spikes = Page(render_quality_page(report)).by_first_cell("Volume spikes")
    assert spikes[days[35].date().isoformat()][1] == "60"
