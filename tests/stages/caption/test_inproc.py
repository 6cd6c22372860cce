"""The in-process engine core's adapter (stages/caption/inproc.py): requests from an event loop
reach one engine thread and come back as their final outputs. The engine here is a stand-in with
LLMEngine's add_request/step surface; the real LLMEngine runs in every e2e test (the offline
preset turns the switch on)."""

import asyncio
import threading
from types import SimpleNamespace

import pytest
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from vllm.v1.engine.exceptions import EngineDeadError

from capjob.stages.caption.inproc import InprocAsyncLLM


class StandInEngine:
    """Finishes each request `steps` engine steps after it was added; fails a prompt named
    "bad" at add_request, and every step once `crash` is set."""

    def __init__(self, steps: int = 2) -> None:
        self.steps, self.left, self.params = steps, {}, {}
        self.threads: set[str] = set()
        self.crash = False

    def add_request(self, request_id, prompt, params, lora_request=None, tokenization_kwargs=None):
        self.threads.add(threading.current_thread().name)
        if prompt == "bad":
            raise ValueError("prompt too long")
        self.left[request_id], self.params[request_id] = self.steps, params

    def step(self):
        self.threads.add(threading.current_thread().name)
        if self.crash:
            raise RuntimeError("CUDA error: an illegal memory access")
        done = []
        for rid in list(self.left):
            self.left[rid] -= 1
            if self.left[rid] == 0:
                del self.left[rid]
                done.append(SimpleNamespace(request_id=rid, finished=True, text=f"caption of {rid}"))
        return done


async def final(engine: InprocAsyncLLM, rid: str, prompt: str = "p"):
    outputs = [o async for o in engine.generate(rid, prompt, SamplingParams(max_tokens=4))]
    assert len(outputs) == 1
    return outputs[0]


def test_requests_come_back_as_their_final_outputs_from_one_engine_thread():
    stand_in = StandInEngine()
    engine = InprocAsyncLLM(stand_in)

    async def main():
        return await asyncio.gather(*(final(engine, str(i)) for i in range(20)))

    outputs = asyncio.run(main())
    engine.shutdown()
    assert [o.text for o in outputs] == [f"caption of {i}" for i in range(20)]
    assert stand_in.threads == {"capjob-inproc-engine"}  # add_request and step never race
    assert {p.output_kind for p in stand_in.params.values()} == {RequestOutputKind.FINAL_ONLY}
    assert not engine.thread.is_alive()


def test_a_request_the_engine_refuses_fails_alone():
    engine = InprocAsyncLLM(StandInEngine())

    async def main():
        return await asyncio.gather(final(engine, "a"), final(engine, "b", "bad"), final(engine, "c"), return_exceptions=True)

    a, b, c = asyncio.run(main())
    engine.shutdown()
    assert a.text == "caption of a" and c.text == "caption of c"
    assert isinstance(b, ValueError) and "prompt too long" in str(b)


def test_an_engine_failure_is_vllms_engine_dead_error_for_every_waiting_request_and_every_later_one():
    stand_in = StandInEngine(steps=10**9)  # never finishes before the crash
    engine = InprocAsyncLLM(stand_in)

    async def main():
        waiting = [asyncio.create_task(final(engine, str(i))) for i in range(3)]
        await asyncio.sleep(0.2)
        stand_in.crash = True
        return await asyncio.gather(*waiting, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) and "illegal memory access" in repr(r.__cause__) for r in results), results
    engine.thread.join(timeout=5)
    with pytest.raises(EngineDeadError) as later:  # Ray Data LLM exits the actor on it; Ray restarts the engine
        asyncio.run(final(engine, "later"))
    assert "illegal memory access" in repr(later.value.__cause__)


def test_crash_fails_the_next_step_like_a_failing_kernel():
    engine = InprocAsyncLLM(StandInEngine(steps=10**9))
    engine.crash(RuntimeError("poison row"))
    with pytest.raises(EngineDeadError) as dead:
        asyncio.run(final(engine, "x"))
    assert "poison row" in repr(dead.value.__cause__)
    engine.thread.join(timeout=5)
    assert not engine.thread.is_alive()
