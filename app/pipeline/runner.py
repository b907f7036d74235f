"""Drive one model process from the event loop: batches in, outcomes out, in order; recover.

A :class:`ShardRunner` owns everything between "a batch of one shard's readings" and "its
predictions", for both topologies: the embedded batcher feeds it from a queue and publishes
what it returns; the Redis worker feeds it from partition streams and publishes-and-acks.

- **Order.** Calls run in the process one after another, in the order they were submitted,
  and their futures complete in that order.
- **Checkpoints.** Every ``checkpoint_every_readings`` readings submitted or
  ``checkpoint_interval_s`` seconds, whichever comes first, the runner queues an export of the
  process's models right behind a batch (so it reflects exactly the batches before it) and
  keeps the batches completed since, as the blobs they were sent as.
- **A dead process** is rebuilt, given the checkpoint and a replay of the batches since
  (models take the readings in; nothing is published twice; fits are inline and
  deterministic, so the models end up exactly where they were), and the calls that were in
  flight run again, in order.
- **A poison reading**, one that kills the process again, is found by splitting its batch in
  halves; it gets ``status: "error"`` and its neighbours are predicted.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from typing import Any, NamedTuple, TypeVar

from app.config import ExecutorKind
from app.models.base import ModelOptions
from app.pipeline import shard, wire
from app.schemas import Reading

log = logging.getLogger(__name__)

T = TypeVar("T")

PROCESS_DIED = "the model process died on this reading"


class ProcessSpec(NamedTuple):
    """How to make a model process."""

    model_path: str
    options: ModelOptions = ModelOptions()
    model_dir: str | None = None
    nice: int = 0
    kind: ExecutorKind = ExecutorKind.process
    start_timeout_s: float = 60.0


class Done(NamedTuple):
    """A completed batch."""

    outcome: wire.BatchOutcome
    task_s: float | None
    """The call's own time in the process (None when it ran during a recovery)."""


class CheckpointCadence:
    """Checkpoint after ``every_readings`` readings or ``interval_s`` seconds, whichever first.

    Examples:
        >>> c = CheckpointCadence(every_readings=100, interval_s=3600)
        >>> c.add(60); c.due()
        False
        >>> c.add(60); c.due()
        True
        >>> c.reset(); c.due()
        False
    """

    def __init__(self, every_readings: int, interval_s: float) -> None:
        self.every_readings = every_readings
        self.interval_s = interval_s
        self.readings = 0
        self._since = time.monotonic()

    def add(self, readings: int) -> None:
        self.readings += readings

    def due(self) -> bool:
        return self.readings > 0 and (
            self.readings >= self.every_readings
            or time.monotonic() - self._since >= self.interval_s
        )

    def reset(self) -> None:
        self.readings = 0
        self._since = time.monotonic()


class _Call:
    __slots__ = (
        "fn", "args", "inner", "outer", "submitted", "blob", "count", "checkpoint", "mutates",
    )  # fmt: skip

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        outer: asyncio.Future[Any] | None,
        blob: bytes | None = None,
        count: int = 0,
        checkpoint: bool = False,
        mutates: bool = False,
    ) -> None:
        self.mutates = mutates
        self.fn = fn
        self.args = args
        self.inner: asyncio.Future[Any] | None = None
        self.outer = outer
        self.submitted = 0.0
        self.blob = blob
        self.count = count
        self.checkpoint = checkpoint


def _mp_context() -> multiprocessing.context.BaseContext:
    # forkserver: model processes never inherit the event loop's threads or sockets, and the
    # model code is imported once in the server process instead of once per process.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["app.pipeline.shard", "app.models.ridge"])
        return ctx
    return multiprocessing.get_context("spawn")


def make_executor(spec: ProcessSpec, workers: int = 1) -> Executor:
    """An executor of ``workers`` model processes (or, for benchmarks, threads or inline)."""
    if spec.kind is ExecutorKind.process:
        return ProcessPoolExecutor(
            max_workers=workers,
            mp_context=_mp_context(),
            initializer=shard.init_process,
            initargs=(spec.model_path, spec.options, spec.model_dir, os.getpid(), spec.nice),
        )
    # Benchmarks only: every shard shares this process's module state, which is safe
    # because shards own disjoint sensors.
    if shard._model_class is None:
        shard.init_process(spec.model_path, spec.options, spec.model_dir)
    if spec.kind is ExecutorKind.thread:
        return ThreadPoolExecutor(max_workers=workers)
    return _InlineExecutor()


class ShardRunner:
    """One model process and the calls queued on it; see the module docstring."""

    def __init__(
        self,
        shard_index: int,
        spec: ProcessSpec,
        *,
        checkpoint_every_readings: int = 200_000,
        checkpoint_interval_s: float = 5.0,
    ) -> None:
        self.shard = shard_index
        self.spec = spec
        self.cadence = CheckpointCadence(checkpoint_every_readings, checkpoint_interval_s)
        self._executor: Executor | None = None
        self._calls: deque[_Call] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._recovering = False
        self._checkpoint: bytes = b""
        self._log: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        """Calls that changed the models since the checkpoint (batches as replays)."""
        self._free_at = 0.0
        self.pid: int | None = None
        self.healthy = False
        self.batches = 0
        self.recoveries = 0
        self.rebuilds = 0
        self.poisoned = 0
        self.checkpoints = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the process and wait until it has imported the model code."""
        if self._task is not None:
            return
        await self._rebuild(first=True)
        self._task = asyncio.create_task(self._complete_in_order(), name=f"shard-{self.shard}")

    async def stop(self) -> None:
        """Fail what is still queued, stop the process (off the loop)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for call in self._calls:
            if call.inner is not None:
                call.inner.cancel()
            if call.outer is not None and not call.outer.done():
                call.outer.cancel()
        self._calls.clear()
        self.healthy = False
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(executor.shutdown, True)

    async def __aenter__(self) -> ShardRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def pending(self) -> int:
        """Calls queued and not completed."""
        return len(self._calls)

    # -- calls ---------------------------------------------------------------------------------

    def submit(self, batch: wire.Packed) -> asyncio.Future[Done]:
        """Queue a batch; its future yields the outcome once every earlier call completed.

        The future never fails for a dead process or a poison reading: those readings get
        error predictions in the outcome.
        """
        future: asyncio.Future[Done] = asyncio.get_running_loop().create_future()
        self._queue(_Call(shard.run_batch, (batch.blob,), future, batch.blob, batch.size))
        self.batches += 1
        self.cadence.add(batch.size)
        if self.cadence.due():
            # Queued right behind the batch, the export reflects exactly the batches before.
            self.cadence.reset()
            self._queue(_Call(shard.export_states, (), None, checkpoint=True))
        return future

    def call(self, fn: Callable[..., T], *args: Any, mutates: bool = False) -> asyncio.Future[T]:
        """Queue another call (export, save, load, drop) in order with the batches.

        ``mutates``: the call changes the models (an import, a drop, a replay of readings
        published elsewhere); it is kept with the batches since the checkpoint and replayed
        after a rebuild, like them.

        Raises (through the future):
            BrokenExecutor: the process died during this very call, twice.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue(_Call(fn, args, future, mutates=mutates))
        return future

    def _queue(self, call: _Call) -> None:
        self._calls.append(call)
        if not self._recovering:
            self._launch(call)
        self._wake.set()

    def _launch(self, call: _Call) -> None:
        loop = asyncio.get_running_loop()
        call.submitted = time.perf_counter()
        assert self._executor is not None, "the runner is not started"
        try:
            call.inner = loop.run_in_executor(self._executor, call.fn, *call.args)
        except (BrokenExecutor, RuntimeError) as exc:
            failed: asyncio.Future[Any] = loop.create_future()
            failed.set_exception(BrokenExecutor(str(exc)))
            call.inner = failed

    async def _complete_in_order(self) -> None:
        calls = self._calls
        while True:
            while not calls:
                self._wake.clear()
                await self._wake.wait()
            head = calls[0]
            assert head.inner is not None
            await asyncio.wait((head.inner,))
            if isinstance(head.inner.exception(), BrokenExecutor):
                await self._recover()
                continue
            calls.popleft()
            done_at = time.perf_counter()
            # Calls run one after another: a call's own time starts when it was queued or
            # when the previous one finished, whichever is later.
            task_s = done_at - max(head.submitted, self._free_at)
            self._free_at = done_at
            self._settle(head, head.inner, task_s)

    def _settle(self, call: _Call, inner: asyncio.Future[Any], task_s: float | None) -> None:
        if call.checkpoint:
            self._took_checkpoint(inner.result())
            return
        error = inner.exception()
        if call.blob is not None:
            if error is not None:
                # Not a dead process: something in the batch itself (say, it could not be
                # unpacked). Its readings get error predictions; the shard carries on.
                log.error("shard %d: a batch failed: %r", self.shard, error)
                outcome = _errors(call.blob, f"model stage failed: {type(error).__name__}")
            else:
                outcome = inner.result()
                self._logged(shard.run_batch, (call.blob, True))
            _resolve(call.outer, Done(outcome, task_s))
        elif error is not None:
            _fail(call.outer, error)
        else:
            if call.mutates:
                self._logged(call.fn, call.args)
            _resolve(call.outer, inner.result())

    def _logged(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._log.append((fn, args))

    def _took_checkpoint(self, states: bytes) -> None:
        self.checkpoints += 1
        self._checkpoint = states
        self._log = []

    # -- recovery ------------------------------------------------------------------------------

    async def _recover(self) -> None:
        """The process died: rebuild it, restore its models, rerun what was in flight."""
        started = time.perf_counter()
        self.recoveries += 1
        self._recovering = True
        in_flight = list(self._calls)
        self._calls.clear()
        # Every later call fails too (the process is gone); let them settle.
        await asyncio.gather(*(c.inner for c in in_flight if c.inner), return_exceptions=True)
        log.warning(
            "shard %d: model process died with %d calls (%d readings) in flight; recovering",
            self.shard, len(in_flight), sum(c.count for c in in_flight),
        )  # fmt: skip
        try:
            await self._restore()
            for call in in_flight:
                if call.checkpoint:
                    continue  # the next one is asked for by the cadence
                if call.blob is not None:
                    outcome = await self._isolate(wire.decode_readings(call.blob), call.blob)
                    _resolve(call.outer, Done(outcome, None))
                else:
                    try:
                        _resolve(call.outer, await self._run(call.fn, *call.args))
                        if call.mutates:
                            self._log.append((call.fn, call.args))
                    except BrokenExecutor as exc:
                        _fail(call.outer, exc)
                        await self._restore()
        finally:
            self._recovering = False
            # Calls queued meanwhile go to the new process now, in order.
            for call in self._calls:
                if call.inner is None:
                    self._launch(call)
        log.warning("shard %d: recovered in %.2f s", self.shard, time.perf_counter() - started)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # submitted to an executor already marked broken
            raise BrokenExecutor(str(exc)) from None

    async def _restore(self) -> None:
        """A fresh process with the last checkpoint and every batch completed since."""
        for attempt in range(3):
            await self._rebuild()
            try:
                if self._checkpoint:
                    await self._run(shard.import_states, self._checkpoint)
                if attempt < 2:
                    for fn, args in self._log:
                        await self._run(fn, *args)
                else:
                    log.error("shard %d: restoring without the replay", self.shard)
                    self._log = []
                return
            except BrokenExecutor:
                # The replay killed it (a model that dies on its own state): start over.
                log.error("shard %d: model process died while restoring; retrying", self.shard)
        await self._rebuild()
        self._checkpoint, self._log = b"", []

    async def _isolate(
        self, readings: list[Reading], blob: bytes | None = None
    ) -> wire.BatchOutcome:
        """Run a batch on a fresh process; if it dies again, split it to find the reading."""
        blob = blob if blob is not None else wire.encode_readings(readings)
        try:
            outcome: wire.BatchOutcome = await self._run(shard.run_batch, blob)
        except BrokenExecutor:
            await self._restore()
        else:
            self._log.append((shard.run_batch, (blob, True)))
            return outcome
        if len(readings) <= 1:
            self.poisoned += len(readings)
            log.error(
                "shard %d: a reading of sensor %s killed its model process twice; it gets an "
                "error", self.shard, readings[0].sensor_id if readings else "?",
            )  # fmt: skip
            return _errors(blob, PROCESS_DIED)
        half = len(readings) // 2
        first = await self._isolate(readings[:half])
        second = await self._isolate(readings[half:])
        return _merge(first, second)

    async def _rebuild(self, first: bool = False) -> None:
        """Replace the (dead) process with a fresh, warmed one. Its models start empty."""
        self.healthy = False
        started = time.perf_counter()
        old, self._executor = self._executor, make_executor(self.spec)
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        if not first:
            self.rebuilds += 1
        loop = asyncio.get_running_loop()
        self.pid = await asyncio.wait_for(
            loop.run_in_executor(self._executor, shard.warm), self.spec.start_timeout_s
        )
        _release_result_pipe(self._executor)
        self.healthy = True
        if not first:
            log.warning(
                "shard %d: model process replaced (pid %s) in %.2f s",
                self.shard, self.pid, time.perf_counter() - started,
            )  # fmt: skip


def _release_result_pipe(executor: Executor) -> None:
    """Close this process's copy of the write end of a process pool's result pipe, once the
    pool's process has started (it took its own copy then, and a pool of one never starts
    another).

    ``ProcessPoolExecutor`` keeps both ends of the pipe its processes send results on and
    never writes to it. While this process holds the write end open, a model process that
    dies half-way through sending a result (the OOM killer, ``kill -9``) leaves the pool's
    result thread waiting for the rest for ever: the shard hangs while ``/readyz`` says ready.
    With the dead process the only writer, that thread reads the end of the pipe and the pool
    reports the process broken, as for a death at any other moment (rebuild and replay). A
    pool without these attributes (another Python) is left as it is.
    """
    writer = getattr(getattr(executor, "_result_queue", None), "_writer", None)
    if writer is not None:
        writer.close()


def _resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)


def _errors(blob: bytes, reason: str) -> wire.BatchOutcome:
    readings = wire.decode_readings(blob)
    bodies = wire.error_bodies(readings, reason)
    return wire.BatchOutcome(wire.encode_batch(bodies), len(bodies), len(readings), 0)


def _merge(a: wire.BatchOutcome, b: wire.BatchOutcome) -> wire.BatchOutcome:
    """One outcome of two consecutive parts of a batch (recovery only)."""
    bodies = wire.decode_bodies(a.payload) + wire.decode_bodies(b.payload)
    return wire.BatchOutcome(
        wire.encode_batch(bodies),
        a.messages + b.messages,
        a.predictions + b.predictions,
        a.anomalies + b.anomalies,
        a.swaps + b.swaps,
        a.alarms_raised + b.alarms_raised,
        a.alarms_cleared + b.alarms_cleared,
        a.fit_seconds + b.fit_seconds,
        a.fit_failures + b.fit_failures,
    )


class _InlineExecutor(Executor):
    """Runs each call at once on the calling thread: the event loop blocks for its duration.

    Exists only so the benchmarks can measure what offloading saves.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future
