"""Run accounting: how many rows entered each stage, counted exactly once.

Ray retries failed tasks, so a counter bumped inside a task can count a block twice. The
ledger is keyed by a digest of the block's row ids instead: a retried block reports the same
key and overwrites its own entry.
"""

from __future__ import annotations

from collections import defaultdict

import ray


@ray.remote(num_cpus=0)
class RunLedger:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, int]] = defaultdict(dict)

    def record(self, counter: str, block_key: str, count: int) -> None:
        self._entries[counter][block_key] = count

    def totals(self) -> dict[str, int]:
        return {counter: sum(blocks.values()) for counter, blocks in self._entries.items()}


def ledger_name(run_id: str) -> str:
    return f"capjob-ledger-{run_id}"


def start_ledger(run_id: str) -> "ray.actor.ActorHandle":
    return RunLedger.options(name=ledger_name(run_id)).remote()


def record(run_id: str, counter: str, block_key: str, count: int) -> None:
    """Called from inside tasks; blocks until the ledger has the entry, so none is lost."""
    ray.get(ray.get_actor(ledger_name(run_id)).record.remote(counter, block_key, count))
