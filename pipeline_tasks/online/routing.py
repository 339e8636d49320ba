"""Sticky canary assignment: which variant serves a user, the same answer in every process and every request.

``bucket(salt, user_id)`` is ``hash(salt + user_id) % 10000`` with a stable hash (BLAKE2b, not Python's
per-process ``hash``); a user whose bucket is below ``canary_bp`` (basis points: 500 = 5 %) goes to the
challenger. Raising the share keeps every user already on the challenger there; a new salt reshuffles.

:class:`Route` is what the canary router (``serving/router.py``) routes by: the champion's and the challenger's
URLs and versions, the share and the salt, kept in a JSON file written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BUCKETS = 10_000
CHAMPION, CHALLENGER = "champion", "challenger"


def bucket(salt: str, user_id: str) -> int:
    """The user's bucket in ``[0, 10000)`` for this salt."""
    digest = hashlib.blake2b(f"{salt}{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def variant_of(salt: str, user_id: str, canary_bp: int) -> str:
    """``challenger`` when the user's bucket is below ``canary_bp`` (0-10000), else ``champion``."""
    if not 0 <= canary_bp <= BUCKETS:
        raise ValueError(f"canary_bp={canary_bp}: use basis points in [0, {BUCKETS}] (500 = 5 %)")
    return CHALLENGER if bucket(salt, str(user_id)) < canary_bp else CHAMPION


@dataclass(frozen=True)
class Route:
    """Where each variant's requests go and the challenger's share."""

    champion_url: str
    champion_version: int
    challenger_url: str | None = None
    challenger_version: int | None = None
    share_bp: int = 0
    salt: str = "recsys"

    def __post_init__(self) -> None:
        if not 0 <= self.share_bp <= BUCKETS:
            raise ValueError(f"share_bp={self.share_bp}: use basis points in [0, {BUCKETS}] (500 = 5 %)")
        if self.share_bp and not self.challenger_url:
            raise ValueError("share_bp > 0 needs a challenger_url")
        for name in ("champion_url", "challenger_url"):
            url = getattr(self, name)
            if url is not None and not str(url).startswith(("http://", "https://")):
                raise ValueError(f"{name}={url!r}: use an http(s) URL")

    def variant(self, user_id: str) -> str:
        """The user's variant under this route (sticky: same salt and share, same answer)."""
        if not self.challenger_url:
            return CHAMPION
        return variant_of(self.salt, user_id, self.share_bp)

    def target(self, variant: str) -> tuple[str, int | None]:
        if variant == CHALLENGER:
            return str(self.challenger_url), self.challenger_version
        return self.champion_url, self.champion_version


def read_route(path: Path) -> Route:
    data = json.loads(path.read_text())
    return Route(**{k: data[k] for k in Route.__dataclass_fields__ if k in data})


def write_route(path: Path, route: Route) -> None:
    """Write ``route`` atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps({**asdict(route), "updated_at": time.time()}, indent=2))
    os.replace(tmp, path)
