"""The crash ledger and isolation lock of stages/engine_guard.py (the e2e with a real engine death
is tests/test_fault_tolerance.py::test_poison_row_that_kills_the_engine_is_quarantined)."""

import asyncio

import pytest

from capjob.errors import ConfigError
from capjob.processor import quarantine_reason
from capjob.sinks import engine_stage
from capjob.stages.engine_guard import CrashLedger, IsolationLock, crash_reason, row_key
from conftest import compose


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
