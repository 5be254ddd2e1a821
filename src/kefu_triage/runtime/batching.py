"""Micro-batching for the HTTP server: concurrent requests are gathered into one ``TriageModel.predict``
call of up to ``max_batch`` messages, waiting at most ``max_wait_ms`` after the oldest queued request.

Inference runs in ``workers`` threads, off the event loop: while batches are being scored the next one
queues up, so under load batches fill without any waiting (the adaptive batching of Triton/TF-Serving).
A free worker takes the next batch, so up to ``workers`` batches are scored at once. With one worker,
onnxruntime's intra-op threads parallelise inside each call; with one worker per core and one intra-op
thread each, whole batches run side by side instead, which for short messages scored one per session
call (int8) wastes less CPU on synchronising threads.

Each message is scored exactly as ``TriageModel.predict`` scores it alone or in any batch: the runtime
sorts messages by token length and pads within length groups, and the results are mapped back per
request here. Stdlib only (asyncio), so the batcher can be tested without a web framework.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

PredictFn = Callable[[list[str], list[Any]], list[dict[str, Any]]]


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` messages already: the caller should answer 503 + Retry-After."""

    def __init__(self, retry_after: float):
        super().__init__(f"the request queue is full; retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class ShuttingDownError(RuntimeError):
    """The batcher was closed: no new work is accepted (in-flight work is still finished)."""


@dataclass
class _Job:
    texts: list[str]
    contexts: list[Any]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """``await submit(texts, contexts)`` -> the predictions of those messages, scored in shared batches.

    ``on_batch(n_messages, seconds)`` and ``on_queue(depth)`` are metric hooks (called on the loop).
    A request is never split: one larger than ``max_batch`` is scored as one call on its own.
    ``predict`` is called from up to ``workers`` threads at once (``TriageModel.predict`` is thread-safe).
    """

    def __init__(
        self,
        predict: PredictFn,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        workers: int = 1,
    ):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1 or workers < 1:
            raise ValueError(
                f"need max_batch >= 1, max_wait_ms >= 0, max_queue >= 1, workers >= 1; got {max_batch}, "
                f"{max_wait_ms}, {max_queue}, {workers}"
            )
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait_ms / 1000.0
        self.max_queue, self.workers = max_queue, workers
        self.on_batch, self.on_queue = on_batch, on_queue
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued = 0  # messages waiting (not yet handed to the worker)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._free: asyncio.Semaphore | None = None  # workers not scoring a batch
        self._inflight: set[asyncio.Task] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closing = False
        self._last_batch_seconds = 0.05

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        """Start the gathering loop on the running event loop."""
        self._wakeup = asyncio.Event()
        self._free = asyncio.Semaphore(self.workers)
        self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="kefu-infer")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kefu-micro-batcher")

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on an inference thread (used for the warm-up, before any batch)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, texts: Sequence[str], contexts: Sequence[Any]) -> list[dict[str, Any]]:
        if self._closing or self._task is None:
            raise ShuttingDownError("the server is shutting down")
        n = len(texts)
        if self._queued and self._queued + n > self.max_queue:
            # a rough time for the queue ahead to clear: batches needed x last batch time / workers
            batches = self._queued / self.max_batch + 1
            raise QueueFullError(max(1.0, round(batches * self._last_batch_seconds / self.workers)))
        job = _Job(list(texts), list(contexts), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued += n
        self._report_queue()
        self._wakeup.set()
        return await job.future

    async def close(self) -> None:
        """Stop accepting, score everything already queued, then stop the worker threads."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _report_queue(self) -> None:
        if self.on_queue is not None:
            self.on_queue(self._queued)

    async def _gather(self) -> list[_Job]:
        """Take the oldest job, then more while they fit in ``max_batch``, until the oldest job has waited
        ``max_wait`` (jobs that queued while the worker was busy have usually waited long enough)."""
        batch = [self._queue.popleft()]
        size = len(batch[0].texts)
        deadline = batch[0].enqueued + self.max_wait
        while size < self.max_batch:
            if self._queue:
                if size + len(self._queue[0].texts) > self.max_batch:
                    break
                job = self._queue.popleft()
                batch.append(job)
                size += len(job.texts)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        self._queued -= size
        self._report_queue()
        return batch

    async def _run(self) -> None:
        """Gather a batch whenever a worker is free; each batch is scored in its own task."""
        while True:
            await self._free.acquire()
            while not self._queue:
                if self._closing:
                    self._free.release()
                    if self._inflight:  # close() returns only when every batch has been answered
                        await asyncio.gather(*self._inflight)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._gather()
            task = asyncio.get_running_loop().create_task(self._score(batch))
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        self._free.release()

    async def _score(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        texts = [t for job in batch for t in job.texts]
        contexts = [c for job in batch for c in job.contexts]
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.predict, texts, contexts)
        except Exception as exc:  # handed to the waiting requests, the loop goes on
            if len(batch) > 1 and isinstance(exc, ValueError):
                # one request's input was refused: score the requests one by one so the others still get
                # their answer and only the culprit gets the error
                for job in batch:
                    await self._run_alone(job)
                return
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self._last_batch_seconds = time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(len(texts), self._last_batch_seconds)
        start = 0
        for job in batch:
            n = len(job.texts)
            if not job.future.done():  # the client may have gone away (cancelled)
                job.future.set_result(results[start : start + n])
            start += n

    async def _run_alone(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self.predict, job.texts, job.contexts)
        except Exception as exc:  # reported to that request only
            if not job.future.done():
                job.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(job.texts), 0.0)
        if not job.future.done():
            job.future.set_result(result)
