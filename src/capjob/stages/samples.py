"""Stage: the sample of rows a run shows in its contact sheet (reporting/contact_sheet.py).

While the run streams, a sample of rows (chosen by a hash of their id, so spread over the whole
input) carry a 256 px JPEG thumbnail (THUMBNAIL_COLUMN) from the request builder to the sink,
which offers them, with their captions and write time, to the run's SampleKeeper actor; it keeps
the schema.THUMBNAIL_CANDIDATES of smallest hash. Ray is imported inside the keeper's functions:
the sink's module loads without a cluster in unit tests.
"""

from __future__ import annotations

import io
from typing import Any, Optional

from capjob.schema import THUMBNAIL_CANDIDATES, row_hash

THUMBNAIL_PX = 256


def thumbnail_every(expected_rows: Optional[int]) -> int:
    """1 in how many rows carries a thumbnail: about schema.THUMBNAIL_CANDIDATES per run; every row
    when the row count is unknown (a 256 px JPEG is ~1 ms of CPU next to the decode, and the
    sink passes on only the sample the contact sheet keeps)."""
    if not expected_rows:
        return 1
    return max(1, -(-expected_rows // THUMBNAIL_CANDIDATES))


def is_thumbnail_row(row_id: str, every: int) -> bool:
    return every <= 1 or row_hash(row_id) % every == 0


def thumbnail_jpeg(image: Any) -> bytes:
    small = image.copy()
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=82)
    return buf.getvalue()


THUMBNAIL_PX = 256



# The sample the run keeps for its contact sheet: the rows of smallest id hash (a uniform
# random sample, whatever the run's size or order), THUMBNAIL_CANDIDATES of them.
def _keeper_name(run_id: str) -> str:
    return f"capjob-samples-{run_id}"


class SampleKeeper:
    """Ray actor (num_cpus=0, one per run): the `keep` offered samples of smallest hash. Memory
    is bounded by keep x one thumbnail (~12 KB) whatever the run's size."""

    def __init__(self, keep: int):
        self.keep = keep
        # (-hash, id, arrival, sample): a max-heap. The arrival number breaks ties between two
        # rows of one id (the same key and bytes in two blocks, dedup=off), never the samples.
        self.heap: list[tuple[int, str, int, dict[str, Any]]] = []
        self.offered = 0

    def offer(self, samples: list[dict[str, Any]]) -> None:
        import heapq

        for s in samples:
            self.offered += 1
            item = (-s["hash"], s["id"], self.offered, s)
            if len(self.heap) < self.keep:
                heapq.heappush(self.heap, item)
            elif item > self.heap[0]:
                heapq.heapreplace(self.heap, item)

    def samples(self) -> list[dict[str, Any]]:
        return [s for _, _, _, s in self.heap]


def start_sample_keeper(run_id: str, **actor_options: Any) -> Any:
    """The run's SampleKeeper (started by the driver, before the write starts); None without
    Ray. actor_options: e.g. metrics.on_driver_node()."""
    import ray

    if not ray.is_initialized():
        return None
    return (ray.remote(num_cpus=0)(SampleKeeper).options(name=_keeper_name(run_id), get_if_exists=True, **actor_options)
            .remote(THUMBNAIL_CANDIDATES))


def offer_samples(run_id: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """From a write task: hand samples to the run's keeper (waits, so none is lost); returns
    the ones no keeper took (no Ray, or no keeper: unit tests), for the write's result."""
    if not samples:
        return []
    import ray

    if ray.is_initialized():
        try:
            ray.get(ray.get_actor(_keeper_name(run_id)).offer.remote(samples))
        except (ValueError, ray.exceptions.RayActorError):
            # No keeper, or one that died with its owner's handle (a sink made again under the
            # same run id drops the first one's): the samples travel in the write's result.
            return samples
        return []
    return samples


def kept_samples(run_id: str, returned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """On the driver after the write: the keeper's sample plus any returned by the writes,
    ordered by write time."""
    import ray

    samples = list(returned)
    if ray.is_initialized():
        try:
            samples += ray.get(ray.get_actor(_keeper_name(run_id)).samples.remote())
        except (ValueError, ray.exceptions.RayActorError):
            pass
    return sorted(samples, key=lambda s: (s["time"], s["id"]))

