"""Stage part: the vLLM engine core inside the engine actor's own process (engine.in_process_engine_core).

Ray Data LLM's engine stage drives vLLM's ``AsyncLLM``, which always runs the engine core in a
second process (vLLM 0.26.0, ``vllm/v1/engine/async_llm.py``: ``make_async_mp_client``), and
vLLM forces that process to be started with ``spawn`` inside a Ray actor
(``vllm/utils/system_utils.py: _maybe_force_spawn``): the new process imports vLLM, torch and
transformers once more before the engine can load the model. vLLM's synchronous ``LLMEngine``
(what ``vllm.LLM`` uses) keeps the engine core in the calling process instead
(``InprocClient``: ``multiprocess_mode=False``). ``InprocAsyncLLM`` puts the surface Ray Data
LLM's ``vLLMEngineWrapper`` calls for generation (``from_engine_args``, ``generate``,
``do_log_stats``, ``shutdown``) over an ``LLMEngine`` stepped by one thread of the actor, so an
engine replica is one process and imports vLLM once. What it costs and saves: docs/benchmarks.md, "Start-up:
capjob vs raw vLLM on the CPU".

What changes with it: the actor's event loop and the engine share one process (the engine
thread releases the GIL in torch's kernels, but Python work of the two interleaves), so it is
meant for CPU engines and short runs, where start-up dominates; a GPU engine keeps vLLM's own
process, which overlaps scheduling with the GPU's work. An engine crash ends the actor's process
itself rather than a child: Ray restarts the actor, and the engine guard counts the death as it
counts an engine-core death (stages/caption/engine_guard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from typing import Any, AsyncIterator, Iterator, Optional

log = logging.getLogger(__name__)


def engine_dead(cause: BaseException) -> Exception:
    """vLLM's EngineDeadError naming `cause`: Ray Data LLM's engine stage treats it as fatal and
    exits the actor, which Ray restarts with a fresh engine (ray/llm/_internal/batch/stages/
    vllm_engine_stage.py, _generate_with_error_handling), as it does when AsyncLLM's engine-core
    process dies."""
    from vllm.v1.engine.exceptions import EngineDeadError

    error = EngineDeadError(f"in-process engine core: {cause!r}")
    error.__cause__ = cause
    return error


class InprocAsyncLLM:
    """``AsyncLLM``'s generate/shutdown surface over a ``vllm.v1.engine.llm_engine.LLMEngine``
    whose engine core runs in this process. Requests come from the actor's event loop (any
    thread) through a queue; one daemon thread owns the engine (``add_request`` and ``step``
    are not thread-safe) and resolves each request's future with its final ``RequestOutput``."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.failure: Optional[BaseException] = None
        self.fault: Optional[BaseException] = None  # crash(): raised by the next step
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="capjob-inproc-engine", daemon=True)
        self.thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: Any, stat_loggers: Optional[list] = None, **_: Any) -> "InprocAsyncLLM":
        from vllm.v1.engine.llm_engine import LLMEngine

        # An AsyncEngineArgs is an EngineArgs; multiprocess_mode=False is LLMEngine's default.
        return cls(LLMEngine.from_engine_args(engine_args, stat_loggers=stat_loggers, enable_multiprocessing=False))

    async def generate(self, request_id: str, prompt: Any, sampling_params: Any,
                       lora_request: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        """Yields the request's final RequestOutput (AsyncLLM yields partial ones too; Ray Data
        LLM reads only the finished one). Raises vLLM's EngineDeadError once the engine failed."""
        from vllm.sampling_params import RequestOutputKind

        if self.failure is not None:
            raise engine_dead(self.failure)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        params = sampling_params.clone()  # the caller's params stay as they were
        params.output_kind = RequestOutputKind.FINAL_ONLY
        self.inbox.put((str(request_id), prompt, params, lora_request, kwargs, loop, future))
        if self.failure is not None:
            _settle(future, None, engine_dead(self.failure))
        yield await future

    def crash(self, error: BaseException) -> None:
        """Test-only fault (engine_guard's POISON_ENV): the engine's next step raises `error`, as a
        failing kernel would."""
        self.fault = error

    async def do_log_stats(self) -> None:
        # Stats are logged by LLMEngine.step at vLLM's interval; nothing to flush here.
        return None

    def shutdown(self) -> None:
        self.stopping.set()
        self.inbox.put(None)
        self.thread.join(timeout=30)

    # -- the engine thread --------------------------------------------------------------------

    def _new_requests(self, block: bool) -> Iterator[tuple]:
        with contextlib.suppress(queue.Empty):
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if item is not None:
                    yield item
                item = self.inbox.get_nowait()

    def _run(self) -> None:
        waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        try:
            while not self.stopping.is_set():
                for request_id, prompt, params, lora, kwargs, loop, future in self._new_requests(block=not waiting):
                    try:
                        self.engine.add_request(request_id, prompt, params, lora_request=lora,
                                                tokenization_kwargs=kwargs.get("tokenization_kwargs"))
                    except Exception as error:  # noqa: BLE001 - one bad request fails its own future, not the engine
                        loop.call_soon_threadsafe(_settle, future, None, error)
                        continue
                    waiting[request_id] = (loop, future)
                if not waiting:
                    continue
                if self.fault is not None:
                    raise self.fault
                for output in self.engine.step():
                    if output.finished and output.request_id in waiting:
                        loop, future = waiting.pop(output.request_id)
                        loop.call_soon_threadsafe(_settle, future, output, None)
        except BaseException as error:
            # The engine is gone: every request waiting or queued learns why (a request queued
            # after this drain sees self.failure itself, in generate).
            self.failure = error
            stopped = engine_dead(error)
            for loop, future in waiting.values():
                loop.call_soon_threadsafe(_settle, future, None, stopped)
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self.inbox.get_nowait()
                    if item is not None:
                        item[5].call_soon_threadsafe(_settle, item[6], None, stopped)
            log.error("in-process vLLM engine core failed: %r", error, exc_info=error)


def _settle(future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@contextlib.contextmanager
def engine_class_in_process() -> Iterator[None]:
    """Within the block, ``vllm.AsyncLLMEngine`` (what Ray Data LLM's vLLMEngineWrapper builds its
    engine with, read at construction) is ``InprocAsyncLLM``. Only the engine actor's own process
    enters it, around the engine stage UDF's constructor."""
    import vllm

    original = vllm.AsyncLLMEngine
    vllm.AsyncLLMEngine = InprocAsyncLLM
    try:
        yield
    finally:
        vllm.AsyncLLMEngine = original
