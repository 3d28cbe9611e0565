"""Rank-balanced sampling for DDP (``data.balance_ranks``, ours; not in Pointcept).

Under DDP every step waits for the slowest rank. ``DistributedSampler`` gives each rank every ``world``-th sample of
a shuffled list, so one rank may get the two largest rooms of a step and the other two small ones: on the 2-core
machine two processes ran 1.64x one core with that split and 1.84x with this one (docs/performance.md section 00). :class:`BalancedRankSampler` draws the same shuffled list on every rank,
cuts it into global batches of ``world * batch_size`` samples, and splits each global batch by size
(:func:`split_by_size`): the largest sample first, each to the rank with the least work so far that still has room.
Every rank gets ``batch_size`` samples a step; the global batch, hence what the step averages over, is the one
``DistributedSampler`` would have drawn from the same permutation.
"""
from __future__ import annotations

import math

import torch


def split_by_size(indices, sizes, world: int, per_rank: int) -> list:
    """``indices`` (at most ``world * per_rank``) split into ``world`` lists of at most ``per_rank``, balancing the sum
    of ``sizes[i]``: longest-first, each to the least-loaded rank with room (ties: the lower rank; a rank's list keeps
    the order of assignment)."""
    order = sorted(indices, key=lambda i: -sizes[i])
    ranks, load = [[] for _ in range(world)], [0] * world
    for i in order:
        r = min((k for k in range(world) if len(ranks[k]) < per_rank), key=lambda k: (load[k], k))
        ranks[r].append(i)
        load[r] += sizes[i]
    return ranks


class BalancedRankSampler(torch.utils.data.Sampler):
    """This rank's samples, ``batch_size`` a step, from global batches split by size. ``sizes``: one cost per sample
    index (e.g. the points of its scene). The epoch's permutation depends on ``seed`` and :meth:`set_epoch` only, so
    every rank draws the same one; the list is padded by wrapping around to whole global batches."""

    def __init__(self, sizes, num_replicas: int, rank: int, batch_size: int, seed: int = 0):
        self.sizes = list(sizes)
        self.world, self.rank, self.batch_size, self.seed = num_replicas, rank, batch_size, seed
        self.epoch = 0
        self.steps = math.ceil(len(self.sizes) / (self.world * self.batch_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.sizes), generator=g).tolist()
        span = self.world * self.batch_size
        perm = (perm * math.ceil(self.steps * span / max(len(perm), 1)))[: self.steps * span]
        for s in range(self.steps):
            yield from split_by_size(perm[s * span:(s + 1) * span], self.sizes, self.world, self.batch_size)[self.rank]
