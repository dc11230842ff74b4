"""Splitting one train step's batch into micro-batches (the in-step mode).

With ``micro_batch_size=m`` a batch of ``B`` samples is run as ``n = B // m``
full micro-batches of ``m`` samples plus, when ``B % m``, one remainder
micro-batch of the other ``B - n * m`` samples.

Which rows go where depends on ``s``, the number of shards the batch is split
into along its rows (data parallelism: each of ``s`` devices holds a
contiguous block of ``B / s`` rows). The JAX step passes the size of the
current `keras.distribution`'s batch axis; without a distribution, and on
TensorFlow and PyTorch (whose ``tf.distribute`` replicas each split their own
part of the batch), ``s = 1``. The shard-aware rule applies when ``s``
divides both ``B`` and ``m`` (see `aligned_shards`); otherwise ``s = 1``.

- ``s = 1``: full micro-batch ``j`` is rows ``j, j + n, j + 2n, ...`` of the
  first ``n * m`` rows (those rows reshaped to ``[m, n, ...]``, index ``j``
  on axis 1); the remainder is the last ``B - n * m`` rows.
- ``s > 1``: the rule above, applied to every shard's own ``B / s`` rows with
  a per-shard micro-batch of ``m / s``: full micro-batch ``j`` is rows ``j,
  j + n, ...`` of the first ``n * m / s`` rows of shard 0, then the same rows
  of shard 1, and so on; the remainder is the last ``(B - n * m) / s`` rows of
  every shard, shard by shard. (``n`` is the same: ``(B/s) // (m/s) = B // m``.)

Taking micro-batches by stride within each shard is a reshape of the sharded
rows: every device holds its ``m / s`` rows of every full micro-batch and its
share of the remainder, so no micro-batch moves data between devices.
Consecutive slices, or the ``s = 1`` rule on a sharded batch whose first
``n * m`` rows straddle the shards (``m`` not dividing ``B``), would make XLA
move rows; so does the fallback to ``s = 1`` when ``s`` does not divide ``m``
(a micro-batch cannot then be spread evenly; docs/distributed.md). The order of samples inside the big batch does not matter to its
loss and gradient (sums over samples), so the rule changes only the layout
and, with `accum_keras.layers.AccumBatchNormalization` (which normalizes each
micro-batch by its own statistics), which samples share a micro-batch.

Everything is `keras.ops` on the batch's leaves (``x``, ``y``, sample weights;
`None` leaves stay `None`), so every backend shares it. The counts are Python
ints when the batch size is static (JAX, XLA) and tensors when it is not
(TensorFlow graphs without XLA see a `None` batch dimension); ``s > 1`` needs
a static batch size.
"""

from __future__ import annotations

from typing import Any

from keras import ops, tree


def counts(batch_size: Any, micro_batch_size: int) -> tuple[Any, Any]:
    """How a batch splits.

    Args:
        batch_size: ``B``, a Python int or a scalar integer tensor.
        micro_batch_size: ``m``.

    Returns:
        ``(full, remainder)``: the number of full micro-batches ``B // m`` and
        the size of the remainder micro-batch ``B % m`` (0: none).
    """
    return batch_size // micro_batch_size, batch_size % micro_batch_size


def aligned_shards(batch_size: Any, micro_batch_size: int, shards: int) -> int:
    """The shard count the split follows: ``shards`` if it divides ``B`` and ``m``, else 1.

    Args:
        batch_size: ``B`` (a Python int whenever ``shards > 1``).
        micro_batch_size: ``m``.
        shards: how many shards the batch's rows are split into.

    Returns:
        ``shards`` when the rows of every micro-batch can be taken within each
        shard, else 1 (the split then ignores the layout and rows move).
    """
    if shards > 1 and batch_size % shards == 0 and micro_batch_size % shards == 0:
        return shards
    return 1


def _check_shards(micro_batch_size: int, shards: int) -> None:
    if not isinstance(shards, int) or shards < 1 or micro_batch_size % shards:
        raise ValueError(
            f"`shards` must be a positive int that divides micro_batch_size={micro_batch_size} "
            f"(see `aligned_shards`), got {shards!r}."
        )


def _map_leaves(function: Any, data: Any) -> Any:
    """``function`` applied to every array of ``data``; `None` leaves stay `None`.

    `keras.tree.map_structure` hands `None` to the function (``train_on_batch``
    passes a missing sample weight as `None`).
    """
    return tree.map_structure(lambda leaf: None if leaf is None else function(leaf), data)


def _by_shard(leaf: Any, shards: int) -> Any:
    """``leaf`` as ``[s, B / s, ...]``: shard ``i``'s rows at index ``i``."""
    shape = ops.shape(leaf)
    if isinstance(shape[0], int) and shape[0] % shards:
        raise ValueError(
            f"A batch of {shape[0]} rows does not split into shards={shards} equal parts."
        )
    return ops.reshape(leaf, (shards, shape[0] // shards, *shape[1:]))


def _strided(leaf: Any, full: Any, micro_batch_size: int, shards: int) -> Any:
    """Every shard's first ``full * m / s`` rows as ``[s, m / s, full, ...]``.

    With ``s = 1``, ``[m, full, ...]`` (no shard axis: the ops of a step that
    is not sharded stay what they were).
    """
    shape = ops.shape(leaf)
    if shards == 1:
        return ops.reshape(leaf[: full * micro_batch_size], (micro_batch_size, full, *shape[1:]))
    per_shard = micro_batch_size // shards
    rows = _by_shard(leaf, shards)[:, : full * per_shard]
    return ops.reshape(rows, (shards, per_shard, full, *shape[1:]))


def full_micro_batch(
    data: Any, index: Any, full: Any, micro_batch_size: int, shards: int = 1
) -> Any:
    """Full micro-batch ``index`` of ``data`` (the rule of the module docstring).

    Args:
        data: the step's batch, any nest of arrays with the batch first.
        index: which micro-batch, ``0 <= index < full`` (int or scalar tensor,
            e.g. a loop counter).
        full: the number of full micro-batches (see `counts`).
        micro_batch_size: ``m``.
        shards: ``s``, dividing ``m`` and the batch (see `aligned_shards`).

    Returns:
        ``data`` with every leaf replaced by its ``m`` rows of the micro-batch,
        shard by shard.
    """
    _check_shards(micro_batch_size, shards)

    def take(leaf):
        strided = _strided(leaf, full, micro_batch_size, shards)
        if shards == 1:
            return ops.take(strided, index, axis=1)
        picked = ops.take(strided, index, axis=2)
        return ops.reshape(picked, (micro_batch_size, *ops.shape(leaf)[1:]))

    return _map_leaves(take, data)


def stacked_full_micro_batches(data: Any, full: int, micro_batch_size: int, shards: int = 1) -> Any:
    """All full micro-batches of ``data`` at once, leaves ``[full, m, ...]``.

    For loops that scan over a leading axis (`jax.lax.scan`). Element ``j``
    is `full_micro_batch` ``j``; the transpose only relabels axes, so a batch
    sharded in ``s`` blocks of rows stays sharded along the ``m`` axis.

    Args:
        data: the step's batch.
        full: the number of full micro-batches (a Python int).
        micro_batch_size: ``m``.
        shards: ``s``, dividing ``m`` and the batch (see `aligned_shards`).

    Returns:
        ``data`` with every leaf reshaped to ``[full, m, ...]``.
    """
    _check_shards(micro_batch_size, shards)

    def stack(leaf):
        strided = _strided(leaf, full, micro_batch_size, shards)
        if shards == 1:
            return ops.transpose(strided, (1, 0, *range(2, len(strided.shape))))
        axes = (2, 0, 1, *range(3, len(strided.shape)))
        return ops.reshape(
            ops.transpose(strided, axes), (full, micro_batch_size, *ops.shape(leaf)[1:])
        )

    return _map_leaves(stack, data)


def remainder_micro_batch(data: Any, full: Any, micro_batch_size: int, shards: int = 1) -> Any:
    """The remainder micro-batch of ``data``: every shard's rows after its full micro-batches.

    Args:
        data: the step's batch.
        full: the number of full micro-batches (see `counts`).
        micro_batch_size: ``m``.
        shards: ``s``, dividing ``m`` and the batch (see `aligned_shards`).

    Returns:
        ``data`` with every leaf replaced by the ``B - full * m`` rows that no
        full micro-batch takes (with ``s = 1``, the last ones), shard by shard.
    """
    _check_shards(micro_batch_size, shards)

    def rest(leaf):
        if shards == 1:
            return leaf[full * micro_batch_size :]
        shape = ops.shape(leaf)
        rows = _by_shard(leaf, shards)[:, full * (micro_batch_size // shards) :]
        return ops.reshape(rows, (shape[0] - full * micro_batch_size, *shape[1:]))

    return _map_leaves(rest, data)
