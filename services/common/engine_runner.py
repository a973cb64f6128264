"""Runs an LLMEngine on its own thread and lets asyncio code talk to it.

Invariant: only the engine thread touches the engine. Asyncio code sends it commands (`call`)
that run between two steps, and receives each request's token outputs on its own asyncio.Queue.
The loop: run pending commands; if any request is unfinished, step once and hand the outputs
to their queues; otherwise sleep until a command arrives. A command announced with a priority
rank (`call(fn, announce=rank)`) may cut short a step in flight that carries less urgent work
and no prompt of that rank (LLMEngine.step's `arrival`), so a live request never waits for a
batch step.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class EngineRunner:
    def __init__(self, engine, loop: asyncio.AbstractEventLoop, on_step: Callable[[Any], None] | None = None):
        self.engine = engine
        self._loop = loop
        self._commands: queue.Queue = queue.Queue()
        self._outputs: dict[str, asyncio.Queue] = {}
        self._on_step = on_step
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._commands.put(None)
        self._thread.join(timeout=10)

    async def call(self, fn: Callable[[Any], Any], announce: int | None = None) -> Any:
        """Runs fn(engine) on the engine thread between steps; returns or raises what it did.
        `announce`: the priority rank of the request fn adds; a step of less urgent sequences
        in flight stops early so fn runs sooner."""
        future = self._loop.create_future()
        self._commands.put((fn, future, announce))
        return await future

    def post(self, fn: Callable[[Any], Any]) -> None:
        """Runs fn(engine) on the engine thread between steps, fire-and-forget (any thread)."""
        self._commands.put((fn, None, None))

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """A queue that will receive the TokenOutputs of request_id (register before adding it)."""
        outputs: asyncio.Queue = asyncio.Queue()
        self._outputs[request_id] = outputs
        return outputs

    def close_stream(self, request_id: str) -> None:
        self._outputs.pop(request_id, None)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopped:
                busy = self.engine.has_unfinished()
                if not self._run_commands(block=not busy):
                    return
                if self.engine.has_unfinished():
                    self._step()
                elif self._on_step is not None:
                    self._on_step(self.engine)  # idle: publish what the commands changed (e.g. a release)

    def _arrival(self) -> int | None:
        """The most urgent rank announced by a command still queued (the announcement lives
        exactly as long as its command waits), or None."""
        with self._commands.mutex:
            return min((item[2] for item in self._commands.queue if item is not None and item[2] is not None),
                       default=None)

    def _run_commands(self, block: bool) -> bool:
        try:
            item = self._commands.get(block=block)
        except queue.Empty:
            return True
        while item is not None:
            fn, future, _ = item
            try:
                result, error = fn(self.engine), None
            except Exception as exc:  # handed to the awaiting coroutine, not swallowed
                result, error = None, exc
            if future is not None:
                self._loop.call_soon_threadsafe(_settle, future, result, error)
            elif error is not None:
                log.error("engine command failed: %r", error)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _step(self) -> None:
        try:
            outputs = self.engine.step(self._arrival)
        except Exception as exc:
            # A failed step poisons every request in flight: fail them loudly instead of hanging.
            log.exception("engine step failed; failing all open streams")
            for target in list(self._outputs.values()):
                self._loop.call_soon_threadsafe(target.put_nowait, EngineFailure(str(exc)))
            self._stopped = True
            return
        for out in outputs:
            target = self._outputs.get(out.request_id)
            if target is not None:
                self._loop.call_soon_threadsafe(target.put_nowait, out)
        if self._on_step is not None:
            self._on_step(self.engine)


class EngineFailure(RuntimeError):
    """Put on a request's output queue when the engine died under it."""


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
