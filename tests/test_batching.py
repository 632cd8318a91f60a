"""The service's QueryBatcher alone: grouping, order, waiting only for announced requests,
failures of one item or of a whole batch, a full queue."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reid_search.app.service import ApiError, QueryBatcher


def _run_batcher(n: int, max_batch: int, max_wait_s: float, fail: set[int] = frozenset()) -> tuple[list, list[int]]:
    sizes: list[int] = []

    def run(items: list[int]) -> list[Any]:
        sizes.append(len(items))
        time.sleep(0.01)
        return [ValueError(i) if i in fail else 2 * i for i in items]

    async def go() -> list[Any]:
        with ThreadPoolExecutor(1) as ex:
            b: QueryBatcher[int, int] = QueryBatcher(run, ex, max_batch=max_batch, max_wait_s=max_wait_s)
            b.start()
            try:
                return await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(n)),
                                                             return_exceptions=True), 30)
            finally:
                await b.stop()

    return asyncio.run(go()), sizes


def test_batcher_groups_and_keeps_order() -> None:
    out, sizes = _run_batcher(10, max_batch=4, max_wait_s=0.05)
    assert out == [2 * i for i in range(10)]
    assert sizes == [4, 4, 2]
    out, sizes = _run_batcher(5, max_batch=1, max_wait_s=0.05)
    assert out == [0, 2, 4, 6, 8] and sizes == [1] * 5


def test_batcher_waits_only_for_announced_requests() -> None:
    sizes: list[int] = []

    def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    async def go() -> tuple[float, list[int]]:
        with ThreadPoolExecutor(1) as ex:
            b: QueryBatcher[int, int] = QueryBatcher(run, ex, max_batch=8, max_wait_s=1.0)
            b.start()

            async def arrive(i: int, delay: float, announce: bool) -> int:
                with b.coming() if announce else contextlib.nullcontext():
                    await asyncio.sleep(delay)  # decoding the upload
                return await b.submit(i)

            try:
                t0 = time.perf_counter()
                assert await b.submit(0) == 0  # alone: no waiting for company
                lone = time.perf_counter() - t0
                # Announced while the first is queued: they go together.
                assert await asyncio.gather(arrive(1, 0.0, True), arrive(2, 0.1, True)) == [1, 2]
                # Not announced: the first goes at once, the latecomer on its own.
                assert await asyncio.gather(arrive(3, 0.0, False), arrive(4, 0.1, False)) == [3, 4]
            finally:
                await b.stop()
            return lone, sizes

    lone, sizes = asyncio.run(go())
    assert lone < 0.5 and sizes == [1, 2, 1, 1]


def test_batcher_isolates_failures() -> None:
    out, sizes = _run_batcher(6, max_batch=8, max_wait_s=0.05, fail={3})
    assert sizes == [6]
    assert isinstance(out[3], ValueError) and [o for i, o in enumerate(out) if i != 3] == [0, 2, 4, 8, 10]


def test_batcher_whole_batch_failure_and_full_queue() -> None:
    def boom(items: list[int]) -> list[int]:
        raise RuntimeError("model crashed")

    async def go() -> tuple[list[Any], Any]:
        with ThreadPoolExecutor(1) as ex:
            b: QueryBatcher[int, int] = QueryBatcher(boom, ex, max_batch=4, max_wait_s=0.01, max_queue=3)
            b.start()
            try:
                tasks = [asyncio.ensure_future(b.submit(i)) for i in range(4)]
                out = await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await b.stop()
            return out, b.stats.to_dict()

    out, stats = asyncio.run(go())
    assert [type(o) for o in out] == [ApiError] * 4
    assert [o.status for o in out] == [500, 500, 500, 503]  # the 4th found the queue full
    assert stats["queries"] == 3
