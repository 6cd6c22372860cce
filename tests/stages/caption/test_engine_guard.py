"""The crash ledger and isolation lock of stages/engine_guard.py (the e2e with a real engine death
is tests/test_fault_tolerance.py::test_killed_worker_and_poison_row_cost_one_row)."""

import asyncio

import pytest

from capjob.errors import ConfigError
from capjob.schema import quarantine_reason
from capjob.schema import engine_stage
from capjob.stages.caption.engine_guard import CrashLedger, IsolationLock, crash_reason, row_key
from helpers.config import compose


def test_poison_row_is_named_after_k_plus_one_deaths_and_neighbours_are_not():
    ledger = CrashLedger(max_deaths=2)
    poison, innocent, elsewhere = ["p1", "p2", "p3"], ["b1", "b2"], ["c1", "c2"]
    # Engine A holds the poison batch and an innocent one; engine B another batch.
    for engine in ("A:1", "A:2"):  # two deaths of engine A (the actor restarted in a new process)
        assert ledger.plan(poison)["isolate"] is False and ledger.plan(innocent)["isolate"] is False
        ledger.begin(f"p@{engine}", poison, False, engine)
        ledger.begin(f"b@{engine}", innocent, False, engine)
        ledger.begin(f"c@{engine}", elsewhere, False, "B:1")
        ledger.end(f"c@{engine}")  # engine B finished its batch
    # The retries after the second death: both batches were in flight at 2 deaths -> isolated.
    assert ledger.plan(poison) == {"isolate": True, "killers": {}}
    assert ledger.plan(innocent) == {"isolate": True, "killers": {}}
    assert ledger.plan(elsewhere) == {"isolate": False, "killers": {}}
    # Isolated, row by row: the innocent rows finish, the poison row dies alone.
    for key in innocent + ["p1"]:
        ledger.begin(f"{key}@A:3", [key], True, "A:3")
        ledger.end(f"{key}@A:3")
    ledger.begin("p2@A:3", ["p2"], True, "A:3")  # engine A dies a third time here
    assert ledger.plan(poison) == {"isolate": True, "killers": {"p2": 3}}
    assert ledger.plan(innocent) == {"isolate": True, "killers": {}}  # never a killer
    ledger.quarantine("p2")
    ledger.begin("p3@A:4", ["p3"], True, "A:4")
    ledger.end("p3@A:4")
    summary = ledger.summary()
    assert summary["engine_deaths"] == 3 and summary["quarantined"] == ["p2"]
    assert summary["rows_in_flight_at_deaths"] == [["b1", "b2", "p1", "p2", "p3"]] * 2 + [["p2"]]
    assert ledger.in_flight == {} and ledger.attempts == {}


def test_finished_attempt_run_again_is_no_death():
    # Ray may run a finished task again (its output object was lost): no engine died.
    ledger = CrashLedger(max_deaths=1)
    ledger.begin("a", ["x", "y"], False, "A:1")
    ledger.end("a")
    assert ledger.plan(["x", "y"]) == {"isolate": False, "killers": {}}
    ledger.begin("b", ["x", "y"], False, "A:1")
    assert ledger.summary()["engine_deaths"] == 0


def test_one_death_each_for_every_batch_in_flight_in_the_dead_engine():
    # K=1: the first death isolates every batch that was in flight in that engine.
    ledger = CrashLedger(max_deaths=1)
    ledger.begin("a", ["a1"], False, "A:1")
    ledger.begin("b", ["b1"], False, "A:1")
    assert ledger.plan(["a1"])["isolate"] and ledger.plan(["b1"])["isolate"]
    assert ledger.deaths == {"a1": 1, "b1": 1} and ledger.summary()["engine_deaths"] == 1


def test_row_key_tells_the_requests_of_one_image_apart():
    assert row_key({"id": "k@abc"}) == "k@abc"
    assert row_key({"id": "k@abc", "__prompt": "short"}) == "k@abc/short"


def test_engine_crash_reason_is_its_own_quarantine_stage():
    reason = quarantine_reason(crash_reason(3, 2))
    assert reason.startswith("engine_crash: the vLLM engine died 3 times") and engine_stage(reason) == "engine_crash"
    assert engine_stage(quarantine_reason("ValueError: prompt too long")) == "engine"
    assert engine_stage("json: Expecting value") == "engine"


def test_max_engine_deaths_must_be_positive():
    from capjob.config import to_typed

    with pytest.raises(ConfigError, match="engine.max_engine_deaths_per_batch"):
        to_typed(compose(["engine.max_engine_deaths_per_batch=0"]))
    assert to_typed(compose([])).engine.max_engine_deaths_per_batch == 2
    with pytest.raises(ValueError):
        CrashLedger(max_deaths=0)


def test_isolated_batch_waits_for_shared_ones_and_holds_the_engine_alone():
    async def scenario():
        lock, log = IsolationLock(), []
        release_first = asyncio.Event()

        async def shared(name, hold=None):
            async with lock.shared():
                log.append(f"{name}+")
                if hold:
                    await hold.wait()
                await asyncio.sleep(0)
                log.append(f"{name}-")

        async def exclusive(name):
            async with lock.exclusive():
                log.append(f"{name}+")
                await asyncio.sleep(0.01)
                log.append(f"{name}-")

        first = asyncio.create_task(shared("s1", release_first))
        await asyncio.sleep(0.01)
        iso = asyncio.create_task(exclusive("x"))
        await asyncio.sleep(0.01)
        later = asyncio.create_task(shared("s2"))  # arrives while x waits: must wait for x
        await asyncio.sleep(0.01)
        assert log == ["s1+"]
        release_first.set()
        await asyncio.gather(first, iso, later)
        return log

    assert asyncio.run(scenario()) == ["s1+", "s1-", "x+", "x-", "s2+", "s2-"]


def test_crash_row_keeps_the_columns_of_a_row_the_engine_ran():
    """A quarantined engine_crash row leaves the engine stage with the columns of a row the
    engine ran: Ray Data LLM's own request preparation (the real `_prepare_llm_request`) takes
    the prompt, image and sampling params out of each row it sends, and the crash row drops the
    same. Once it kept them, its batch became a block of another type (image arrays, a params
    dict) that the operator could not concatenate with its other blocks: the engine actor's task
    failed with ArrowTypeError after the poison row was quarantined (found in session 10, when
    a run had more than one batch per block)."""
    import uuid

    import numpy as np
    from ray.data._internal.arrow_ops import transform_pyarrow
    from ray.data.block import BlockAccessor
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineWrapper, vLLMTaskType

    from capjob.stages.caption.engine_guard import guarded_engine_udf

    udf = object.__new__(guarded_engine_udf())
    udf.max_engine_deaths = 1

    class Preparation(vLLMEngineWrapper):  # the wrapper's request preparation, without an engine
        def __init__(self) -> None:
            self.task_type, self.request_id, self.idx_in_batch_column = vLLMTaskType.GENERATE, 0, udf.IDX_IN_BATCH_COLUMN
            self._image_row_column_warning_logged = True

        async def _maybe_get_lora_request(self, row):
            return None

    def input_row(i: int) -> dict:
        return {"id": f"row-{i}", "reference": None, "prompt": "<|im_start|>user ...", "image": [np.zeros((28, 28, 3), np.uint8)],
                "multimodal_uuids": {"image": [f"sha1:{i}"]}, "sampling_params": {"max_tokens": 8, "temperature": 0.0},
                udf.IDX_IN_BATCH_COLUMN: i}

    ran = input_row(0)
    asyncio.run(Preparation()._prepare_llm_request(ran))
    ran.update({"prompt": "<|im_start|>user ...", "prompt_token_ids": [1, 2], "num_input_tokens": 2, "generated_tokens": [3],
                "generated_text": "a red circle", "num_generated_tokens": 1, "embeddings": None, "metrics": None,
                "logprobs": None, "prompt_logprobs": None, "request_id": 0, "batch_uuid": "b", "time_taken_llm": 0.5,
                "params": "SamplingParams(...)", "__inference_error__": ""})
    crashed = input_row(1)
    crashed.update(udf._crash_row(crashed, 2, uuid.uuid4()))
    assert set(crashed) == set(ran)
    assert crashed["__inference_error__"].startswith("engine_crash: the vLLM engine died 2 times")
    assert crashed["prompt"] == "<|im_start|>user ..."  # the failed prompt's opening stays, for the quarantine row
    # The two rows as blocks of the operator's output ({"__data": rows}, StatefulStageUDF's shape): one type.
    blocks = [BlockAccessor.batch_to_block({"__data": rows}) for rows in ([ran], [crashed], [ran, crashed])]
    assert all(not str(b.schema.field("__data").type).startswith("extension") for b in blocks)
    assert transform_pyarrow.concat(blocks, promote_types=True).num_rows == 4


def test_guard_cost_per_batch_is_the_mean_of_its_measured_calls():
    ledger = CrashLedger(max_deaths=2)
    assert ledger.summary()["ms_before_engine_per_batch"] is None  # nothing ran: no price
    ledger.begin("a", ["r1"], False, "e1")
    ledger.end("a", 0.002, None)  # an actor's first batch: no earlier end to time
    ledger.begin("b", ["r2"], False, "e1")
    ledger.end("b", 0.004, 0.001)
    ledger.begin("c", ["r3"], True, "e1")
    ledger.end("c")  # the isolated path is not priced (it runs only after engine deaths)
    cost = ledger.summary()
    assert (cost["guarded_batches"], cost["ms_before_engine_per_batch"], cost["ms_after_engine_per_batch"]) == (2, 3.0, 1.0)
    assert not ledger.in_flight
