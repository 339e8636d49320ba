"""The service's micro-batcher: requests that queue are answered in blocks, each gets its own answer, a failing
request fails alone, and an idle service answers a lone request at once."""

from __future__ import annotations

import asyncio

from serving import service  # the `serving` extra, which the test command installs: no skip


class FakeEngine:
    """Answers a request with its user id upper-cased; raises for the user "bad" (the whole block, as a real
    block would)."""

    def __init__(self) -> None:
        self.blocks: list[list[str]] = []

    def recommend_many(self, requests: list[str]) -> list[str]:
        self.blocks.append(list(requests))
        if "bad" in requests:
            raise ValueError("bad request")
        return [r.upper() for r in requests]


def test_queued_requests_are_answered_in_blocks_of_at_most_max_batch():
    engine, batcher = FakeEngine(), service.MicroBatcher(max_batch=4)

    async def main() -> list[str]:
        return await asyncio.gather(*(batcher.answer(lambda: engine, f"u{i}") for i in range(10)))

    assert asyncio.run(main()) == [f"U{i}" for i in range(10)]
    assert [len(b) for b in engine.blocks] == [4, 4, 2]
    assert not batcher.running and not batcher.pending


def test_a_failing_request_fails_alone():
    engine, batcher = FakeEngine(), service.MicroBatcher(max_batch=8)

    async def main() -> list[object]:
        return await asyncio.gather(*(batcher.answer(lambda: engine, u) for u in ("a", "bad", "c")),
                                    return_exceptions=True)

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("A", "C") and isinstance(bad, ValueError)
    assert engine.blocks == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]  # the block, then one by one


def test_a_lone_request_is_answered_alone_at_once():
    engine, batcher = FakeEngine(), service.MicroBatcher(max_batch=8)

    async def main() -> list[str]:
        first = await batcher.answer(lambda: engine, "x")
        second = await batcher.answer(lambda: engine, "y")
        return [first, second]

    assert asyncio.run(main()) == ["X", "Y"]
    assert engine.blocks == [["x"], ["y"]]
