"""Issue 22 experiment, bench only: with GPU_BENCH_NO_PIN=1 and this folder first on PYTHONPATH,
every Python process (Ray workers and vLLM's spawned engine core included: they inherit both)
batches the vision encoder's inputs in ordinary host memory instead of freshly pinned memory
(vLLM 0.26.0 MultiModal{Flat,Batched}Field._reduce_data, called with pin_memory=True by
EncoderRunner.execute_mm_encoder). The patch is applied when vllm.multimodal.inputs is first
imported; nothing else changes. bench/gpu_bench.py's unpinned_mm_batches does the same in-process
for raw vLLM."""

import importlib.abc
import importlib.util
import os
import sys


def _patch(module):
    for name in ("MultiModalFlatField", "MultiModalBatchedField"):
        cls = getattr(module, name)
        original = cls._reduce_data

        def _reduce_data(self, batch, *, pin_memory, _original=original):
            return _original(self, batch, pin_memory=False)

        cls._reduce_data = _reduce_data


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "vllm.multimodal.inputs":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = patched
        return spec


if os.environ.get("GPU_BENCH_NO_PIN") == "1":
    sys.meta_path.insert(0, _Hook())
