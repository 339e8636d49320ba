"""Make Evidently's saved drift report say what the drift check decides.

Evidently's headline reads "Dataset drift detection threshold is 0.0714": that number is the
preset's drift share (the share of columns that must drift, here 1 of 14), not the threshold the
check applies, which is PSI 0.2 per feature. The saved HTML gets a banner at the top of its body
naming the per-feature PSI threshold and the drifted features, and the headline's label is
rewritten to say what the share is. Both are plain inline HTML/JSON: the report stays one file
that opens offline.
"""

from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

BANNER_ID = "recsys-drift-banner"
# The headline counter's label inside the dashboard JSON that Evidently embeds in the page.
_HEADLINE = re.compile(r'"label": "Dataset Drift is (?:NOT )?detected\. Dataset drift detection threshold is [^"]*"')
_BODY = re.compile(r"<body[^>]*>")
_STYLE = ("font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 12px; "
          "padding: 12px 16px; border-radius: 6px; color: #1d2430; border: 1px solid {border}; background: {bg}")


def verdict_line(psi: dict[str, float], flagged: list[str], threshold: float) -> str:
    """The banner's first line, e.g. ``Per-feature PSI threshold 0.2: 1 of 14 features drifted: event_type
    (PSI 0.312).``"""
    listing = ", ".join(f"{c} (PSI {psi[c]:.3f})" for c in flagged)
    return (f"Per-feature PSI threshold {threshold}: {len(flagged)} of {len(psi)} features drifted"
            + (f": {listing}." if flagged else "."))


def headline_label(psi: dict[str, float], flagged: list[str], threshold: float, drift_share: float) -> str:
    """The headline counter's new label: the verdict, the per-feature threshold, the share for what it is."""
    state = "detected" if flagged else "NOT detected"
    return (f"Dataset Drift is {state}: {len(flagged)} of {len(psi)} features have PSI above {threshold}. The "
            f"dataset counts as drifted when any one feature does (drifted-column share {drift_share}, i.e. 1 "
            f"of {len(psi)}); the drift threshold is PSI {threshold} per feature.")


def banner_html(psi: dict[str, float], flagged: list[str], threshold: float, drift_share: float) -> str:
    """The banner put at the top of the report (every value escaped)."""
    colours = {"border": "#e08a80", "bg": "#fdecea"} if flagged else {"border": "#7bc48f", "bg": "#e6f4ea"}
    note = (f"Each monitored feature is compared between the reference and the newest window by its population "
            f"stability index (PSI); a feature drifts when its PSI is above {threshold}. Below, Evidently's "
            f"\"Dataset Drift\" headline counts drifted features: its share ({drift_share}) is the share of "
            f"features that must drift for the dataset to count as drifted (1 of {len(psi)}), not a drift "
            "threshold. drift_report.json has the same numbers.")
    return (f'<div id="{BANNER_ID}" style="{html.escape(_STYLE.format(**colours))}">'
            f"<strong>{html.escape(verdict_line(psi, flagged, threshold))}</strong>"
            f"<div>{html.escape(note)}</div></div>")


def annotate_report_html(path: Path, psi: dict[str, float], flagged: list[str], threshold: float,
                         drift_share: float) -> None:
    """Add the banner after ``<body>`` of the saved report and relabel its headline (in place)."""
    text = path.read_text(encoding="utf-8")
    label = json.dumps(headline_label(psi, flagged, threshold, drift_share)).replace("</", "<\\/")
    text, relabelled = _HEADLINE.subn(lambda _: f'"label": {label}', text, count=1)
    if not relabelled:  # another Evidently version: the banner still tells the truth
        log.warning("drift report: Evidently's headline label was not found in %s; only the banner is added", path)
    body = _BODY.search(text, max(text.find("</head>"), 0))  # the page's body, not a "<body" in its inline JS
    if body is None:
        raise RuntimeError(f"{path}: no <body> in Evidently's report; cannot add the drift banner")
    text = text[:body.end()] + banner_html(psi, flagged, threshold, drift_share) + text[body.end():]
    path.write_text(text, encoding="utf-8")
