"""Stage guard: a row that kills the vLLM engine every time (a poison pill) is quarantined, not
retried forever.

Without it: a fatal engine error (vLLM's EngineDeadError: the engine-core process died, e.g. a
segfault or an abort in a kernel on one input) makes Ray Data LLM's engine UDF `os._exit(1)` its
actor, Ray restarts the actor (Ray Data's max_restarts=-1) and retries every task that was in
flight in it (max_task_retries=-1), the poison row included: again and again, each time after an
engine start (tens of seconds on CPU, minutes on a GPU).

With it, the engine stage keeps a crash ledger in a Ray actor the driver owns (`CrashLedger`),
so it survives the engine actor's death:

1. Before a batch reaches the engine, its rows' keys (the row id, plus the prompt name in a
   multi-prompt run) are recorded as one *attempt* in flight; when the batch is done, the attempt
   ends. An attempt whose rows begin again while it never ended died with its engine: each of its
   rows gets one death counted. Only the batches in flight in the actor that died are counted
   (they are the ones Ray retries), never those of other replicas.
2. A batch with a row at `engine.max_engine_deaths_per_batch` (K) deaths or more runs *isolated*
   (no other batch in that actor while it runs: an asyncio reader/writer lock in the actor) and
   *row by row*, each row its own attempt. The next death then names the row exactly: the one
   in flight alone.
3. On the next attempt that row is not sent again: it leaves the engine stage as a failed row,
   `__inference_error__ = "engine_crash: ..."`, and becomes a quarantine row with stage
   `engine_crash`; the batch's other rows are captioned. A poison row costs K + 1 engine
   restarts; rows of other batches in flight at those deaths are captioned (row by row once they
   reach K deaths themselves), never quarantined.

Test-only fault injection: with the environment variable CAPJOB_TEST_ENGINE_POISON set to a
row's `source_key` (or `id`), an engine actor given that row SIGKILLs its vLLM engine-core
process, a real engine death that Ray Data LLM handles as any other (EngineDeadError ->
os._exit -> actor restart -> task retry). It is not part of the config on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator, Optional

from capjob.schema import ENGINE_CRASH, PROMPT_COLUMN
from capjob.stages.caption.inproc import engine_class_in_process

log = logging.getLogger(__name__)

# Test-only (see the module docstring): the source_key or id of the row that kills the engine.
POISON_ENV = "CAPJOB_TEST_ENGINE_POISON"
POISON_SETTLE_S = 3.0
REASON_KIND = ENGINE_CRASH


def ledger_name(run_id: str) -> str:
    return f"capjob-engine-crashes-{run_id}"


class CrashLedger:
    """Which row keys are in flight in which engine attempt, and how many engine deaths each key
    has been in flight at. Plain Python (the unit tests drive it directly); runs as a Ray actor.

    An attempt is `begin`-ed before its rows reach the engine and `end`-ed after the last of them
    returned. A key that begins again while an earlier attempt holding it never ended means that
    attempt's engine died (a row is never in flight twice at once: Ray retries a task only after
    its actor died). `solo` attempts hold one row in an isolated engine: their death names it."""

    def __init__(self, max_deaths: int) -> None:
        if max_deaths < 1:
            raise ValueError(f"max_deaths must be >= 1, got {max_deaths}")
        self.max_deaths = max_deaths
        self.attempts: dict[str, tuple[list[str], bool, str]] = {}  # attempt -> (keys, solo, engine)
        self.in_flight: dict[str, str] = {}  # key -> attempt
        self.deaths: dict[str, int] = {}  # key -> engine deaths it was in flight at
        self.killers: dict[str, int] = {}  # key -> deaths, for keys in flight alone at a death
        self.dead_engines: dict[str, list[str]] = {}  # engine (actor process) -> keys in flight when it died
        self.quarantined: list[str] = []
        # What the guard costs: batches through the shared path, and the seconds their actor
        # calls took before the batch reached the engine (plan + begin) and after it (end).
        self.batches = 0
        self.before_s = 0.0
        self.after_s = 0.0
        self.after_measured = 0

    def _settle(self, keys: list[str]) -> None:
        """Count the deaths of the unfinished attempts that held any of `keys`."""
        for key in keys:
            attempt = self.in_flight.get(key)
            if attempt is None:
                continue
            held, solo, engine = self.attempts.pop(attempt)
            for k in held:
                self.in_flight.pop(k, None)
                self.deaths[k] = self.deaths.get(k, 0) + 1
            if solo:
                self.killers.update({k: self.deaths[k] for k in held})
            self.dead_engines.setdefault(engine, []).extend(held)

    def plan(self, keys: list[str]) -> dict[str, Any]:
        """How the batch of `keys` runs now: {"isolate": run it alone and row by row, "killers":
        {key: deaths} of the rows to quarantine instead of running}."""
        self._settle(keys)
        killers = {k: self.killers[k] for k in keys if k in self.killers}
        isolate = bool(killers) or max((self.deaths.get(k, 0) for k in keys), default=0) >= self.max_deaths
        return {"isolate": isolate, "killers": killers}

    def begin(self, attempt: str, keys: list[str], solo: bool, engine: str) -> None:
        self._settle(keys)
        self.attempts[attempt] = (list(keys), solo, engine)
        self.in_flight.update({k: attempt for k in keys})

    def end(self, attempt: str, before_s: Optional[float] = None, after_s: Optional[float] = None) -> None:
        """`attempt` is done. before_s: what its plan and begin calls took (the guard's delay of
        the batch); after_s: what the previous end call of the same engine actor took (an end
        cannot time itself)."""
        if before_s is not None:
            self.batches += 1
            self.before_s += before_s
        if after_s is not None:
            self.after_measured += 1
            self.after_s += after_s
        held, _, _ = self.attempts.pop(attempt, ([], False, ""))
        for k in held:
            if self.in_flight.get(k) == attempt:
                del self.in_flight[k]

    def quarantine(self, key: str) -> None:
        self.quarantined.append(key)

    def summary(self) -> dict[str, Any]:
        """For the run report: the engine deaths seen (each with the row keys in flight in that
        engine process) and the keys quarantined as engine_crash. A death no batch was retried
        after (the last one of a run that failed anyway) is not seen."""
        return {"engine_deaths": len(self.dead_engines),
                "rows_in_flight_at_deaths": [sorted(keys) for keys in self.dead_engines.values()],
                "quarantined": sorted(set(self.quarantined)), **self.cost()}

    def cost(self) -> dict[str, Any]:
        """The guard's price per batch, in milliseconds of actor-call latency: before the batch
        reaches the engine (plan + begin: on the batch's path) and after its last row (end)."""
        return {"guarded_batches": self.batches,
                "ms_before_engine_per_batch": round(1000 * self.before_s / self.batches, 2) if self.batches else None,
                "ms_after_engine_per_batch": round(1000 * self.after_s / self.after_measured, 2) if self.after_measured else None}


def start_ledger(run_id: str, max_deaths: int, **actor_options: Any) -> Any:
    """The run's crash ledger actor (named ledger_name(run_id)); the driver keeps the handle (an
    unreferenced actor is destroyed) and so owns it: it outlives every engine actor.
    actor_options: e.g. metrics.on_driver_node()."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(CrashLedger).options(name=ledger_name(run_id), **actor_options).remote(max_deaths)


class IsolationLock:
    """asyncio reader/writer lock of one engine actor: batches share the engine (`shared`) up to
    max_concurrent_batches; an isolated batch (`exclusive`) waits for those in flight, holds the
    engine alone, and new shared batches wait for it (no starvation of the isolated batch)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting_exclusive += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def row_key(row: dict[str, Any]) -> str:
    """A request row's key in the ledger: its id, plus the prompt name in a multi-prompt run
    (one image, one request per prompt)."""
    prompt = row.get(PROMPT_COLUMN)
    return str(row["id"]) if prompt is None else f"{row['id']}/{prompt}"


def crash_reason(deaths: int, max_deaths: int) -> str:
    return (f"{REASON_KIND}: the vLLM engine died {deaths} times with this row in flight, the last time with the row "
            f"alone in the engine (engine.max_engine_deaths_per_batch={max_deaths})")


def kill_engine_core() -> None:
    """Test-only fault (POISON_ENV): SIGKILL this actor's vLLM engine-core process (and any
    workers it started), as a crash in the engine would; without one, exit the actor."""
    import signal

    import psutil

    children = psutil.Process().children(recursive=True)
    log.error("%s: killing the vLLM engine (%d process(es)) on the poison row", POISON_ENV, len(children))
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGKILL)
    if not children:
        os._exit(1)


# The input columns vLLMEngineWrapper._prepare_llm_request pops from each row it sends to the
# engine (Ray 2.58.1, ray/llm/_internal/batch/stages/vllm_engine_stage.py).
ENGINE_REQUEST_KEYS = ("prompt", "tokenized_prompt", "multimodal_data", "image", "mm_processor_kwargs", "multimodal_uuids",
                       "tokenization_kwargs", "sampling_params", "pooling_params")


@functools.cache
def guarded_engine_udf() -> type:
    """Ray Data LLM's vLLMEngineStageUDF with the crash ledger (a function: importing Ray Data
    LLM's engine stage costs seconds, paid only where a processor is built)."""
    from ray.llm._internal.batch.stages.common import truncate_str
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF, vLLMOutputData

    class vLLMEngineStageUDFWithCrashLedger(vLLMEngineStageUDF):
        """Ray Data LLM's engine stage UDF guarded by the run's CrashLedger. Its name starts with
        the original's: Ray Data names the operator after it ("MapBatches(vLLMEngineStageUDF...)"),
        and reports, benchmarks and tests find the engine operator by that name."""

        def __init__(self, *args: Any, crash_ledger: str, max_engine_deaths: int, in_process_engine_core: bool = False,
                     **kwargs: Any) -> None:
            import ray

            self.in_process = in_process_engine_core
            with engine_class_in_process() if in_process_engine_core else contextlib.nullcontext():
                super().__init__(*args, **kwargs)
            self.ledger = ray.get_actor(crash_ledger)
            self.max_engine_deaths = max_engine_deaths
            self.isolation = IsolationLock()
            # The actor process: the attempts of one engine death share it (Ray restarts the
            # actor in a new process).
            self.engine_id = f"{ray.get_runtime_context().get_actor_id()}:{os.getpid()}"
            self.poison: Optional[str] = os.environ.get(POISON_ENV) or None
            self.last_end_s: Optional[float] = None  # what this actor's previous end call took

        async def _poison_check(self, rows: list[dict[str, Any]]) -> None:
            if self.poison and any(self.poison in (r.get("source_key"), r.get("id")) for r in rows):
                if self.in_process:  # the engine core is this process: its next step fails (inproc.py)
                    log.error("%s: failing the in-process vLLM engine on the poison row", POISON_ENV)
                    self.llm.engine.crash(RuntimeError(f"{POISON_ENV}: poison row"))
                else:
                    kill_engine_core()
                # Let vLLM's client see the death before the batch is sent, so that its requests
                # fail with EngineDeadError as in a real crash; sent while vLLM was still shutting
                # its client down, they waited forever once (the e2e run hit its 600 s timeout).
                await asyncio.sleep(POISON_SETTLE_S)

        def _crash_row(self, row: dict[str, Any], deaths: int, batch_uuid: uuid.UUID) -> dict[str, Any]:
            # The failed-row shape of vLLMEngineStageUDF._generate_with_error_handling, so
            # failed rows of either kind have the same columns. `row` is the batch's own input
            # dict, which Ray Data LLM updates with this output: drop what the engine's request
            # takes out of a row it runs, or this row alone would keep its image and sampling
            # params, and its batch becomes a block that no other block of the operator can be
            # concatenated with (ArrowTypeError, the actor's task fails).
            prompt = row.get("prompt") or ""
            for key in ENGINE_REQUEST_KEYS:
                row.pop(key, None)
            empty = vLLMOutputData(prompt=truncate_str(prompt, 200), prompt_token_ids=None, num_input_tokens=0)
            return {**empty.model_dump(), "request_id": -1, self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN],
                    "batch_uuid": batch_uuid.hex, "time_taken_llm": -1, "params": "",
                    "__inference_error__": crash_reason(deaths, self.max_engine_deaths)}

        async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
            keys = [row_key(r) for r in batch]
            started = time.perf_counter()
            plan = await self.ledger.plan.remote(keys)
            if not plan["isolate"]:
                async with self.isolation.shared():
                    attempt = uuid.uuid4().hex
                    await self.ledger.begin.remote(attempt, keys, False, self.engine_id)
                    before = time.perf_counter() - started
                    # An engine death ends the process (os._exit in Ray Data LLM, or a kill):
                    # no finally runs, the attempt stays open, and its retry counts the death.
                    try:
                        await self._poison_check(batch)
                        async for out in super().udf(batch):
                            yield out
                    finally:
                        ended = time.perf_counter()
                        await self.ledger.end.remote(attempt, before, self.last_end_s)
                        self.last_end_s = time.perf_counter() - ended
                return
            batch_uuid = uuid.uuid4()
            log.warning("engine guard: a batch of %d row(s) was in flight at %d+ engine deaths: running it alone, row by row",
                        len(batch), self.max_engine_deaths)
            async with self.isolation.exclusive():
                for row, key in zip(batch, keys):
                    if key in plan["killers"]:
                        await self.ledger.quarantine.remote(key)
                        log.error("engine guard: quarantining row %s: %s", key, crash_reason(plan["killers"][key], self.max_engine_deaths))
                        yield self._crash_row(row, plan["killers"][key], batch_uuid)
                        continue
                    attempt = uuid.uuid4().hex
                    await self.ledger.begin.remote(attempt, [key], True, self.engine_id)
                    try:
                        await self._poison_check([row])
                        out = await self._generate_with_error_handling(row, batch_uuid)
                    finally:
                        await self.ledger.end.remote(attempt)
                    yield out

    return vLLMEngineStageUDFWithCrashLedger


def guard_engine_stage(processor: Any, crash_ledger: str, max_engine_deaths: int, in_process_engine_core: bool = False) -> None:
    """Swap the processor's vLLM engine stage UDF for the guarded one (same constructor
    arguments, plus the ledger's actor name, K, and whether the engine core runs in the actor's
    process: stages/caption/inproc.py)."""
    stage = processor.stages["vLLMEngineStage"]
    # Not `stage.fn = ...`: the stage model validates assignments by re-running its
    # post_init, which would resolve the Ray remote args again (a CPU engine would then ask
    # for a GPU).
    object.__setattr__(stage, "fn", guarded_engine_udf())
    object.__setattr__(stage, "fn_constructor_kwargs", {**stage.fn_constructor_kwargs, "crash_ledger": crash_ledger,
                                                        "max_engine_deaths": max_engine_deaths,
                                                        "in_process_engine_core": in_process_engine_core})
