"""Run params to typed stage configs: the one check that a param object names only known fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline_tasks.core.errors import InvalidParamsError


def known_params(cls: type, params: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """``params`` as a dict, refused (``InvalidParamsError`` naming the param ``name``) when it holds a key that
    is not a field of the dataclass ``cls``."""
    p = dict(params or {})
    fields = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = set(p) - fields
    if unknown:
        raise InvalidParamsError(f"unknown {name} params {sorted(unknown)}; known: {sorted(fields)}")
    return p
