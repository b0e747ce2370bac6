"""Gathering a batch statistic's inputs across ranks, with gradients, for the global-batch objective."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the incoming gradients over ranks and returns this rank's slice.

    Every rank evaluates the same global objective on the gathered tensor, so the summed gradient is
    R times the true one for each shard; DDP's averaging of parameter gradients divides by R again.
    """

    @staticmethod
    def forward(ctx, shard: Tensor) -> Tensor:
        shard = shard.contiguous()
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, shard)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_samples(shard: Tensor) -> Tensor:
    """Concatenate every rank's (..., n, K) shard along the sample dimension -2, rank order, with gradients.

    With one process this is the identity. The shards must have equal shapes (the loader guarantees it).
    """
    if world_size() == 1:
        return shard
    return torch.cat(_GatherWithGrad.apply(shard).unbind(0), dim=-2)
