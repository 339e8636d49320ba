"""The validate stage's results page (``data_docs/index.html``), rendered from GX's results.

GX's own Data Docs score each expectation by its success percent over the helper columns
(``_ts_epoch``, ``_dup_rank``) and call a run "Failed" whenever one row is flagged, even when the
gate passes; their styles come from CDNs. This page says what the gate decided, names each rule by
its quarantine reason with the rows it flagged, and is one self-contained file (inline CSS, no
external URL), so it reads the same offline. GX's pages stay beside it, linked.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pipeline_tasks.core.constants import DUP_RANK, TS_EPOCH, USER_DAY_EVENTS
from pipeline_tasks.data.quality_gate import ARTICLE, REASON_SETTING, fix_for

# What a helper column stands for, in the contract's words.
HELPER_COLUMNS = {TS_EPOCH: "timestamp", DUP_RANK: "duplicate key", USER_DAY_EVENTS: "events per user and UTC day"}

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 72em; padding: 0 1em; color: #1d2430; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #d8dee8; }
table { border-collapse: collapse; margin: .5em 0 1em; width: 100%; }
th, td { border: 1px solid #d8dee8; padding: .35em .6em; text-align: left; vertical-align: top; }
th { background: #f1f4f8; } td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { background: #f1f4f8; padding: 0 .25em; border-radius: 3px; }
.verdict { padding: .8em 1em; border-radius: 6px; margin: 1em 0; }
.passed { background: #e6f4ea; border: 1px solid #7bc48f; } .failed { background: #fdecea; border: 1px solid #e08a80; }
.badge { font-weight: 700; letter-spacing: .05em; } .muted { color: #5b6575; font-size: .92em; }
tr.flagged td { background: #fff8e6; }
"""


def _e(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def _pct(share: float) -> str:
    return f"{100 * share:.2f} %"


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    """A table; cells are HTML already (escaped by the caller); numeric cells start with ``<n>``."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="n">{c[3:]}</td>' if c.startswith("<n>") else f"<td>{c}</td>" for c in row)
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _n(value: int | float) -> str:
    return f"<n>{value:,}"


def _verdict(report: dict[str, Any]) -> str:
    passed = bool(report["passed"])
    stubs = report["stubs"]
    lines = [f"Quality: {_pct(report['quality_rate'])} of interactions accepted (threshold "
             f"{_pct(report['quality_threshold'])}): "
             f"{'passes' if report['quality_rate'] >= report['quality_threshold'] else 'fails'}."]
    for kind in ("items", "users"):
        s = stubs[kind]
        limit = (f"limit {_pct(stubs['max_stub_share'])}: {'passes' if s['passed'] else 'fails'}"
                 if s["limit_applies"] else "no users table, so the limit does not apply")
        lines.append(f"Interactions naming {ARTICLE[kind]} missing from the {kind} table: {s['interactions']:,} "
                     f"({_pct(s['share'])}; {limit}).")
    body = "".join(f"<div>{_e(line)}</div>" for line in lines)
    if report.get("gate", {}).get("message"):
        body += f"<p>{_e(report['gate']['message'])}</p>"
    word = "PASSED" if passed else "FAILED"
    return (f'<div class="verdict {word.lower()}"><span class="badge">Quality gate {word}</span>{body}</div>')


def _tables(report: dict[str, Any]) -> str:
    stubs = report["stubs"]
    rows = [[_e(t), _n(v["input"]), _n(v["accepted"]), _n(v["quarantined"]),
             _n(stubs[t]["stubbed"]) if t in ("items", "users") else "",
             _e(", ".join(f"{k}: {c:,}" for k, c in v["reasons"].items()) or "none")]
            for t, v in report["tables"].items()]
    return ("<h2>Tables</h2>" + _table(["table", "input rows", "accepted", "quarantined", "stub rows added",
                                        "quarantine reasons"], rows)
            + '<p class="muted">input = accepted + quarantined for every table. Interactions naming an unknown '
              "item or user are accepted; the entity gets a stub row on top of the accepted rows.</p>")


def _rules(report: dict[str, Any]) -> str:
    parts = ["<h2>Rules</h2><p class=\"muted\">One Great Expectations expectation per rule; its reason is the "
             "quarantine reason of the rows it flags. A row breaking several rules counts under each.</p>"]
    by_table: dict[str, list[dict[str, Any]]] = {}
    for r in report["expectations"]:
        by_table.setdefault(r["table"], []).append(r)
    for table, results in by_table.items():
        rows, classes = [], []
        for r in results:
            flagged = int(r.get("flagged_rows", r["unexpected_count"]))
            column = HELPER_COLUMNS.get(r["column"], r["column"])
            keep = _e(fix_for(r["reason"], report)) if flagged and r["reason"] in REASON_SETTING and (
                table == "interactions") else ""
            rows.append([f"<code>{_e(r['reason'])}</code>", _e(r.get("rule", "")), _e(column), _n(flagged), keep,
                         f'<span class="muted">{_e(r["expectation"])}</span>'])
            classes.append("flagged" if flagged else "")
        parts.append(f"<h3>{_e(table)}</h3>" + _table(
            ["reason", "rule", "column", "rows flagged", "setting that keeps them", "GX expectation"], rows, classes))
    return "".join(parts)


def _stubs(report: dict[str, Any]) -> str:
    stubs = report["stubs"]
    rows = [[_e(kind), _n(s["stubbed"]), _n(s["interactions"]), f"<n>{_e(_pct(s['share']))}",
             _e(_pct(stubs["max_stub_share"]) if s["limit_applies"] else "does not apply (no users table)"),
             _e(", ".join(s["first_ids"]) or "none")]
            for kind, s in ((k, stubs[k]) for k in ("items", "users"))]
    return ("<h2>Stubbed entities</h2>" + _table(
        ["table", "ids missing from it", "accepted interactions naming them", "share", "max_stub_share",
         "first ids"], rows)
        + '<p class="muted">Items get category "unknown", users null attributes (setting <code>max_stub_share'
          "</code>).</p>")


def _spikes(report: dict[str, Any]) -> str:
    spikes = report["spikes"]
    if not spikes:
        return "<h2>Volume spikes</h2><p>None.</p>"
    rows = [[_e(s["day"]), _n(s["events"]), _n(s["trailing_mean"]), _n(s["threshold"])] for s in spikes]
    return ("<h2>Volume spikes</h2>" + _table(["day", "events", "trailing mean", "threshold"], rows)
            + '<p class="muted">Reported, not quarantined.</p>')


def _settings(report: dict[str, Any]) -> str:
    as_of, params = report["as_of"], report["parameters"]
    rows = [["future anchor (later = <code>future_timestamp</code>)", _e(as_of["future_anchor"])],
            ["horizon (older = <code>too_old_timestamp</code>)",
             _e(f"{as_of['horizon_start']} .. {as_of['horizon_anchor']}")],
            ["as_of given explicitly", _e(as_of["explicit"])],
            ["bot_events_per_day", _e(params["bot_events_per_day"])],
            ["event types", _e(", ".join(params["event_types"]))],
            ["quality_threshold", _e(_pct(report["quality_threshold"]))],
            ["max_stub_share", _e(_pct(report["stubs"]["max_stub_share"]))]]
    return "<h2>Run settings</h2>" + _table(["setting", "value"], rows)


def _files(report: dict[str, Any]) -> str:
    out = report.get("outputs", {})
    qdir = out.get("quarantine_dir")
    rows = [["accepted tables", f"<code>{_e(out.get('accepted_dir'))}</code>"],
            ["report", f"<code>{_e(out.get('report'))}</code>"]]
    rows += [[_e(f"quarantined {t} ({v['quarantined']:,} rows, column reasons)"),
              f"<code>{_e(Path(qdir) / f'{t}.parquet') if qdir else ''}</code>"] for t, v in report["tables"].items()]
    if out.get("gx_data_docs"):
        rows.append(["Great Expectations Data Docs", '<a href="gx/index.html">gx/index.html</a> <span class="muted">'
                     "(GX's own view: success percent per expectation over helper columns; its styles load "
                     "from the internet)</span>"])
    return "<h2>Files</h2>" + _table(["what", "where"], rows)


def render_quality_page(report: dict[str, Any]) -> str:
    """The results page of one validate run as self-contained HTML (every value escaped)."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    source = report.get("input_dir", "")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Validation {verdict}: {_e(source)}</title><style>{CSS}</style></head><body>"
        f"<h1>Data validation of <code>{_e(source)}</code></h1>"
        + _verdict(report) + _tables(report) + _rules(report) + _stubs(report) + _spikes(report)
        + _settings(report) + _files(report) + "</body></html>\n"
    )


def write_quality_page(report: dict[str, Any], path: Path) -> Path:
    """Write :func:`render_quality_page` to ``path`` (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_quality_page(report), encoding="utf-8")
    return path
