"""Dynamic batching of concurrent queries: :class:`QueryBatcher` and its :class:`BatchStats`.

Concurrent submissions are grouped into batches of at most ``max_batch``; a forming
batch is held open (at most ``max_wait_s`` after its oldest item) only while announced
requests are still being decoded. Each batch runs in one call on an executor (the model
thread), so the event loop never runs the model and keeps accepting.
"""

import asyncio
import collections
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from reid_search.limits import DEFAULT_MAX_QUEUE
from reid_search.app.service.guard import ApiError, as_api_error

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    arrived: float


@dataclass
class BatchStats:
    """Counters of a :class:`QueryBatcher` (for ``/stats`` and the load test)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    sizes: collections.Counter = field(default_factory=collections.Counter)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"batches": self.batches, "queries": self.items, "largest_batch": self.largest,
                "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0}


class QueryBatcher(Generic[T, R]):
    """Groups concurrent submissions into batches run by ``run`` on ``executor``.

    Whatever queued while the previous batch ran goes next (up to ``max_batch``).
    The loop waits for more only while requests are on their way (announced with
    :meth:`coming`: uploaded and being decoded), and at most ``max_wait_s``
    after the oldest waiting item arrived; so a lone client never waits for
    company that is not coming. ``run(items)`` returns one result or exception
    per item, in order; an exception raised by ``run`` itself fails the whole
    batch. Must be started and used on one event loop.
    """

    def __init__(self, run: Callable[[list[T]], Sequence[R | BaseException]], executor: ThreadPoolExecutor, *,
                 max_batch: int = 32, max_wait_s: float = 0.005, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, not {max_wait_s}")
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._pending: collections.deque[_Pending[T]] = collections.deque()
        self._coming = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="query-batcher")

    async def stop(self) -> None:
        """Stop the loop; waiting submissions fail with 503."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(ApiError(503, "shutting-down", "the server is shutting down"))

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Announce an item being prepared inside the block (submit it right after), so a forming batch waits for it."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1
            if self._wake is not None:
                self._wake.set()

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result.

        Raises:
            ApiError: 503 when the queue is full or the batcher is not running;
                whatever ``run`` returned or raised for this item.
        """
        if self._task is None or self._wake is None:
            raise ApiError(503, "not-running", "the query batcher is not running")
        if len(self._pending) >= self.max_queue:
            raise ApiError(503, "busy", f"{self.max_queue} queries already wait; retry later")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append(_Pending(item, fut, loop.time()))
        self._wake.set()
        return await fut

    async def _wait(self, timeout: float | None) -> None:
        assert self._wake is not None
        self._wake.clear()
        if timeout is None:
            await self._wake.wait()
            return
        # Waiting on an Event (not on a queue) so a timeout cannot drop an item.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._wait(None)
            # The window counts from the oldest arrival, so requests that queued
            # while the model was busy do not wait again; and it only holds the
            # batch open while announced requests are still being decoded.
            deadline = self._pending[0].arrived + self.max_wait_s
            while len(self._pending) < self.max_batch and self._coming > 0 and (left := deadline - loop.time()) > 0:
                await self._wait(left)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [p for p in batch if not p.future.done()]  # abandoned by their clients
            if not batch:
                continue
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            self.stats.sizes[len(batch)] += 1
            try:
                results = await loop.run_in_executor(self.executor, self.run, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(ApiError(503, "shutting-down", "the server is shutting down"))
                raise
            except Exception as exc:
                results = [as_api_error(exc, f"a query batch of {len(batch)}")] * len(batch)
            for p, res in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(res, BaseException):
                    p.future.set_exception(res)
                else:
                    p.future.set_result(res)
