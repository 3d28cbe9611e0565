"""Space-filling-curve serialization of voxel grids (the point order that PTv3-style attention works in).

A curve maps every integer cell ``(x, y, z)`` of a ``2^depth``-cube to a code in ``[0, 8^depth)``; sorting points
by code puts spatial neighbours next to each other, so fixed-size windows of the sorted list ("patches") are local
neighbourhoods. Orders provided:

``"z"``              Morton / z-order: the bits of x, y, z interleaved (x most significant within each triple).
``"hilbert"``        3D Hilbert curve: consecutive codes are always face-adjacent cells (no jumps, unlike z-order).
``"z-trans"``,       the same curves on ``(y, x, z)``: a second family of patches that cuts space differently,
``"hilbert-trans"``  so that stacking blocks with different orders lets information cross patch borders.

The batch index goes in the bits above ``3 * depth``: sorting by code keeps every sample contiguous (and in batch
order), so a patch never straddles two samples unless the caller pads per sample (see :mod:`haskd.models.ptv3`).

All functions are vectorised over points; the Hilbert encoder loops only over the ``depth`` bits.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..errors import HaskdError

ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")

# 3 * depth code bits + batch bits must fit in a signed int64 (63 usable bits).
MAX_DEPTH = 16
MAX_BATCH_BITS = 63 - 3 * MAX_DEPTH


def batch_from_offset(offset: torch.Tensor) -> torch.Tensor:
    """``offset`` (B,) cumulative counts -> ``batch`` (N,) int64 sample index of every row."""
    offset = offset.long()
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return torch.repeat_interleave(torch.arange(len(offset), device=offset.device), counts)


def required_depth(grid: torch.Tensor) -> int:
    """Smallest ``depth`` with every coordinate of ``grid`` (N,3) below ``2^depth`` (at least 1)."""
    if grid.numel() == 0:
        return 1
    return max(1, int(grid.max()).bit_length())


def _check(grid: torch.Tensor, depth: int) -> None:
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise HaskdError(f"serialization expects grid coords of shape (N, 3), got {tuple(grid.shape)}")
    if not 1 <= depth <= MAX_DEPTH:
        raise HaskdError(f"serialization depth must be in 1..{MAX_DEPTH}, got {depth}")
    if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) >= (1 << depth)):
        raise HaskdError(
            f"grid coords must lie in [0, 2^{depth}) for serialization, got range "
            f"[{int(grid.min())}, {int(grid.max())}] (shift them to start at 0 or use a coarser grid)")


def _spread3(v: torch.Tensor, depth: int) -> torch.Tensor:
    """Move bit i of ``v`` to bit 3*i (zeros in between), for i < depth."""
    out = torch.zeros_like(v)
    for i in range(depth):
        out |= ((v >> i) & 1) << (3 * i)
    return out


def z_order_encode(grid: torch.Tensor, depth: Optional[int] = None) -> torch.Tensor:
    """Morton code of integer cells.

    ``grid`` (N,3) int64 ``(x, y, z)`` in ``[0, 2^depth)`` -> (N,) int64 codes in ``[0, 8^depth)`` with bit
    ``3i+2`` = bit i of x, ``3i+1`` = bit i of y, ``3i`` = bit i of z.
    """
    grid = grid.long()
    depth = required_depth(grid) if depth is None else depth
    _check(grid, depth)
    x, y, z = grid.unbind(1)
    return (_spread3(x, depth) << 2) | (_spread3(y, depth) << 1) | _spread3(z, depth)


def hilbert_encode(grid: torch.Tensor, depth: Optional[int] = None) -> torch.Tensor:
    """3D Hilbert index of integer cells (Skilling's transpose method, vectorised over points).

    ``grid`` (N,3) int64 in ``[0, 2^depth)`` -> (N,) int64 codes in ``[0, 8^depth)``. Cells with consecutive codes
    share a face. Method (J. Skilling, "Programming the Hilbert curve", AIP Conf. Proc. 707, 2004): undo the
    rotations/reflections level by level from the top bit, Gray-encode across axes, then interleave the bits.
    """
    grid = grid.long()
    depth = required_depth(grid) if depth is None else depth
    _check(grid, depth)
    x = [grid[:, 0].clone(), grid[:, 1].clone(), grid[:, 2].clone()]
    # 1) From the most significant level down: where axis i's bit is set, reflect the lower bits of axis 0;
    #    otherwise swap the lower bits of axes 0 and i. This puts every cell into its sub-cube's canonical frame.
    q = 1 << (depth - 1)
    while q > 1:
        p = q - 1
        for i in range(3):
            has_bit = (x[i] & q) != 0
            if i == 0:
                x[0] = torch.where(has_bit, x[0] ^ p, x[0])
            else:
                t = (x[0] ^ x[i]) & p
                t = torch.where(has_bit, torch.zeros_like(t), t)
                x[0] = torch.where(has_bit, x[0] ^ p, x[0] ^ t)
                x[i] = x[i] ^ t
        q >>= 1
    # 2) Gray encode across the three axes.
    x[1] = x[1] ^ x[0]
    x[2] = x[2] ^ x[1]
    t = torch.zeros_like(x[0])
    q = 1 << (depth - 1)
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x = [v ^ t for v in x]
    # 3) The "transposed" index: bit b of axis 0 is the most significant of triple b.
    return (_spread3(x[0], depth) << 2) | (_spread3(x[1], depth) << 1) | _spread3(x[2], depth)


def encode(grid: torch.Tensor, batch: Optional[torch.Tensor] = None, order: str = "z",
           depth: Optional[int] = None) -> torch.Tensor:
    """Curve code of every point, with the batch index above the ``3 * depth`` cell bits.

    ``grid`` (N,3) int64 non-negative; ``batch`` (N,) int64 sample index (None = all 0); ``order`` one of
    :data:`ORDERS`. Returns (N,) int64. ``depth`` None = the smallest that fits ``grid``; pass a fixed depth when
    codes of different batches must be comparable (a curve's shape depends on its depth).
    """
    if order not in ORDERS:
        raise HaskdError(f"unknown serialization order {order!r}; choose from {', '.join(ORDERS)}")
    grid = grid.long()
    depth = required_depth(grid) if depth is None else depth
    if order.endswith("-trans"):
        grid = grid[:, [1, 0, 2]]
    code = z_order_encode(grid, depth) if order.startswith("z") else hilbert_encode(grid, depth)
    if batch is not None:
        batch = batch.long()
        if batch.numel() and int(batch.max()) >= (1 << (63 - 3 * depth)):
            raise HaskdError(f"batch index {int(batch.max())} does not fit above {3 * depth} code bits")
        code = code | (batch << (3 * depth))
    return code


def serialize(grid: torch.Tensor, batch: Optional[torch.Tensor] = None, orders: Sequence[str] = ORDERS,
              depth: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Codes and sort permutations for several orders at once.

    Returns a dict of (K, N) int64 tensors, K = ``len(orders)``:

    - ``code``: curve code of every point (row k uses ``orders[k]``);
    - ``order``: ``order[k]`` lists point indices sorted by ``code[k]`` (``x[order[k]]`` is the serialized list);
    - ``inverse``: ``inverse[k][order[k]] = arange(N)``, i.e. ``y_sorted[inverse[k]]`` scatters back.
    """
    codes = torch.stack([encode(grid, batch, o, depth) for o in orders])
    order = torch.argsort(codes, dim=1, stable=True)
    inverse = torch.empty_like(order)
    arange = torch.arange(order.shape[1], device=order.device).expand_as(order)
    inverse.scatter_(1, order, arange)
    return {"code": codes, "order": order, "inverse": inverse}
