"""Sticky canary assignment: which variant serves a user, the same answer in every process and every request.

``bucket(salt, user_id)`` is ``hash(salt + user_id) % 10000`` with a stable hash (BLAKE2b, not Python's
per-process ``hash``); a user whose bucket is below ``canary_bp`` (basis points: 500 = 5 %) goes to the
challenger. Raising the share keeps every user already on the challenger there; a new salt reshuffles.
"""

from __future__ import annotations

import hashlib

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
