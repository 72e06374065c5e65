"""Data-parallel gradient averaging in few collectives.

:func:`all_reduce_mean` replaces one ``all_reduce`` per parameter (a round trip each, dozens per
step for a ResNet) with one per bucket of gradients: gradients of one dtype and device are
flattened into buckets of about ``bucket_bytes``, each bucket is summed over the ranks with
one ``all_reduce``, divided by the world size and copied back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["all_reduce_mean", "from_rank0", "DEFAULT_BUCKET_BYTES"]

#: Bucket size of :func:`all_reduce_mean` (the default of ``DistributedDataParallel``).
DEFAULT_BUCKET_BYTES = 25 * 2**20


def all_reduce_mean(params: Iterable[Tensor], group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES, *,
                    all_reduce: Callable[[Tensor], object] | None = None,
                    world_size: int | None = None) -> None:
    """Average the ``.grad`` of ``params`` over the ranks of ``group``, in place.

    Every rank must call this with the same parameters in the same order (same shapes, dtypes
    and devices), as with any collective. A parameter whose ``.grad`` is ``None`` gets a zero
    gradient first, so every rank takes part in every bucket identically (a rank that did not
    touch a parameter contributes zero to the mean). A parameter listed twice is reduced once.

    Gradients are grouped by ``(device, dtype)`` in first-seen order and packed into buckets of
    at most ``bucket_bytes`` bytes (a larger gradient gets a bucket of its own); each bucket is
    flattened, summed with one asynchronous ``all_reduce`` (all buckets are in flight at once),
    divided by the world size and copied back into the gradients. A bucket of one contiguous
    gradient is reduced in place, without a copy. Sparse gradients are reduced one by one. With
    two ranks the result is bit for bit that of one ``all_reduce`` + ``div_`` per parameter.

    No-op (gradients untouched, ``None`` stays ``None``) when ``torch.distributed`` is
    unavailable or not initialised, or the world size is 1.

    ``all_reduce`` / ``world_size`` replace the collective, for tests and custom transports:
    ``all_reduce(tensor)`` must sum ``tensor`` over the ranks in place (it may return a work
    handle with ``.wait()``); ``world_size`` is what the sum is divided by (default: the
    group's).
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"all_reduce_mean: bucket_bytes must be an int >= 1, got {bucket_bytes!r}")
    if all_reduce is None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group) if world_size is None else world_size
        if world == 1:
            return

        def all_reduce(t, _group=group):
            return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_group, async_op=True)
    else:
        world = world_size if world_size is not None else _group_size(group)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"all_reduce_mean: world_size must be an int >= 1, got {world!r}")

    grads, seen = [], set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)

    pending = []  # (work, flat or None, grads of the bucket)
    for bucket in _buckets([g for g in grads if not g.is_sparse], bucket_bytes):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            pending.append((all_reduce(bucket[0]), None, bucket))
        else:
            flat = _flatten_dense_tensors(bucket)
            pending.append((all_reduce(flat), flat, bucket))
    for g in grads:
        if g.is_sparse:  # rare (nn.Embedding(sparse=True)); gloo sums sparse tensors
            pending.append((all_reduce(g), None, [g]))
    for work, flat, bucket in pending:
        if work is not None and hasattr(work, "wait"):
            work.wait()
        if flat is None:
            for g in bucket:
                g.div_(world)
        else:
            flat.div_(world)
            for g, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(v)


def _group_size(group) -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    raise ValueError("all_reduce_mean: with a custom all_reduce and no process group, give world_size")


def _buckets(grads: list[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Gradients by ``(device, dtype)`` (first-seen order), cut into runs of <= ``bucket_bytes``."""
    by_kind: dict[tuple, list[Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    out = []
    for same in by_kind.values():
        bucket, size = [], 0
        for g in same:
            nbytes = g.numel() * g.element_size()
            if bucket and size + nbytes > bucket_bytes:
                out.append(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += nbytes
        if bucket:
            out.append(bucket)
    return out


def from_rank0(value, group=None):
    """Rank 0's ``value`` on every rank (a small picklable object: a number, ``None``, a flag).

    For decisions every rank must take alike although each computed its own input — whether the
    validation accuracy improved, so that every rank joins the same collective checkpoint write.
    Returns ``value`` unchanged when ``torch.distributed`` is not initialised or has one rank.
    Every rank of ``group`` must call it (a collective).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    box = [value]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]

