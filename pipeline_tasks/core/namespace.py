"""A data source's identity: which long-lived feature history and MLflow experiment its runs share.

A customer directory that grows is the same source (its location is the identity); ``synthetic``
with other generator settings, MovieLens at another path and another directory are different ones.
The namespace is a short readable name plus a hash, usable as a directory, a Feast project suffix
and an MLflow experiment suffix.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

_SLUG = re.compile(r"[^a-z0-9]+")


def _slug(text: str, limit: int = 24) -> str:
    return _SLUG.sub("_", text.lower()).strip("_")[:limit] or "data"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def source_namespace(source: str, synthetic: dict[str, Any] | None = None) -> str:
    """The namespace of a run's data source (see the module doc)."""
    if source == "synthetic":
        return f"synthetic_{_digest(synthetic or {})}"
    if source.startswith("movielens:"):
        path = Path(source.removeprefix("movielens:")).expanduser().resolve()
        return f"movielens_{_slug(path.name)}_{_digest(str(path))}"
    path = Path(source).expanduser().resolve()
    return f"{_slug(path.name)}_{_digest(str(path))}"
