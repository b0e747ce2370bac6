"""Process-wide settings a training run wants, applied for the run and undone on every exit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def flushes_denormals() -> bool:
    """Whether this process's CPU float operations flush denormal numbers to zero right now."""
    return float(torch.tensor([1e-39]) * 1.0) == 0.0


@contextmanager
def training_process() -> Iterator[None]:
    """Speed settings for a fit in this process; on exit, success or failure, the environment variables and
    torch's denormal handling are exactly as they were before.

    - ``PYTORCH_NVML_BASED_CUDA_CHECK=0``: importing Lightning sets it to 1, which makes every
      ``torch.cuda.is_available()`` (asked by torch's optimisers on every step) dlopen NVML, in vain where NVML
      is missing: ~0.2 ms a step, a 30% slower epoch on a CPU. Our processes fork nothing during a fit.
    - Denormal floats flushed to zero: a dead component's Adam moments decay geometrically into denormals,
      which x86 CPUs compute ~100x slower; nothing above 1e-38 changes.
    - The number of torch CPU threads a run sets (``--threads``) is restored, and so are the BLAS and OpenMP
      thread pools of numpy and scipy (threadpoolctl) it limits.
    - Environment variables the run sets (the run version its DDP workers inherit, Lightning's seed and
      process-group variables) are removed again.
    """
    from threadpoolctl import threadpool_limits

    environ = dict(os.environ)
    denormals, threads = flushes_denormals(), torch.get_num_threads()
    pools = threadpool_limits(limits=None)  # changes nothing; restores these limits at the end
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(denormals)
        torch.set_num_threads(threads)
        pools.restore_original_limits()
        os.environ.clear()
        os.environ.update(environ)
