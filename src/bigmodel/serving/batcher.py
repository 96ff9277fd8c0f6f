"""Dynamic batching: concurrent requests' inputs are queued and run through the model together.

A worker takes the first waiting input and everything already queued (up to `max_batch_size`). It waits for more —
at most `max_delay_ms` from the first input's arrival — only while other requests are on their way in (accepted,
still being parsed or decoded: `incoming()`); with nothing on its way it runs at once, so a lone client pays no
delay. Under load, inputs pile up while a batch computes and the next batch takes them all. The model runs in one
worker thread, so the event loop keeps accepting requests meanwhile. `max_batch_size=1` is one-by-one serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class _Item:
    value: Any
    future: asyncio.Future[Any]
    arrived: float


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be ≥ 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay = max(0.0, max_delay_ms) / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigmodel-infer")
        self._incoming = 0  # requests accepted but not yet queued

    def incoming(self) -> _Incoming:
        """`with batcher.incoming(): ... await batcher.submit(...)` — tells the worker a request is on its way."""
        return _Incoming(self)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._worker())

    async def stop(self) -> None:
        """Finish everything already queued, then stop the worker."""
        if self._queue is not None and self._task is not None:
            await self._queue.put(None)
            await self._task
        self._pool.shutdown(wait=True)

    async def submit(self, values: list[Any], incoming: _Incoming | None = None) -> list[Any]:
        """Queue each value; return their results in order (an exception for one value fails the whole call)."""
        assert self._queue is not None, "start() the batcher first"
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(v, loop.create_future(), now) for v in values]
        if incoming is not None:
            incoming.done()  # queued now: no longer "on its way"
        for it in items:
            self._queue.put_nowait(it)
        return list(await asyncio.gather(*(it.future for it in items)))

    async def _worker(self) -> None:
        assert self._queue is not None
        q = self._queue
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await q.get()
            if first is None:
                break
            batch = [first]
            deadline = first.arrived + self.max_delay
            while len(batch) < self.max_batch_size:
                try:
                    nxt = q.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0 or self._incoming == 0:
                        break  # nothing on its way: run now rather than wait for nobody
                    try:
                        nxt = await asyncio.wait_for(q.get(), timeout=remaining)
                    except TimeoutError:
                        break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                results = await loop.run_in_executor(self._pool, self.run_batch, [b.value for b in batch])
            except Exception as e:  # one failing batch must not kill the worker
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for b, r in zip(batch, results, strict=True):
                if not b.future.done():
                    b.future.set_result(r)


class _Incoming:
    """Counts a request as on its way from `with` until `submit(..., incoming=...)` queues it (or the block ends)."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self.b = batcher
        self.open = False

    def __enter__(self) -> _Incoming:
        self.b._incoming += 1
        self.open = True
        return self

    def done(self) -> None:
        if self.open:
            self.b._incoming -= 1
            self.open = False

    def __exit__(self, *exc: object) -> None:
        self.done()
