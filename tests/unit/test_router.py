"""The canary router's route: validation, sticky variants, atomic persistence (pure logic; the HTTP behaviour is in
tests/integration/test_canary.py)."""

from __future__ import annotations

import pytest

from pipeline_tasks.online.routing import Route, read_route, write_route

CHAMP = "http://127.0.0.1:3001"
CHALL = "http://127.0.0.1:3002"


def test_route_validation():
    with pytest.raises(ValueError, match="share_bp"):
        Route(CHAMP, 1, CHALL, 2, share_bp=10_001)
    with pytest.raises(ValueError, match="challenger_url"):
        Route(CHAMP, 1, share_bp=500)
    with pytest.raises(ValueError, match="http"):
        Route("localhost:3001", 1)


def test_variants_are_sticky_and_follow_the_share():
    route = Route(CHAMP, 1, CHALL, 2, share_bp=500)
    users = [f"u{i}" for i in range(20_000)]
    first = [route.variant(u) for u in users]
    assert first == [route.variant(u) for u in users]  # same answer every time
    share = sum(v == "challenger" for v in first) / len(users)
    assert abs(share - 0.05) < 0.006  # 5 % within ~4 standard errors
    wider = Route(CHAMP, 1, CHALL, 2, share_bp=2500)
    assert all(wider.variant(u) == "challenger" for u, v in zip(users, first, strict=True) if v == "challenger")
    assert {Route(CHAMP, 1).variant(u) for u in users[:100]} == {"champion"}  # no challenger: champion only
    assert route.target("challenger") == (CHALL, 2) and route.target("champion") == (CHAMP, 1)


def test_route_file_round_trip(tmp_path):
    path = tmp_path / "canary" / "route.json"
    route = Route(CHAMP, 1, CHALL, 2, share_bp=500, salt="s1")
    write_route(path, route)
    assert read_route(path) == route
    assert [p.name for p in path.parent.iterdir()] == ["route.json"]  # written under a temporary name, renamed
