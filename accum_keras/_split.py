"""Splitting one train step's batch into micro-batches (the in-step mode).

With ``micro_batch_size=m`` a batch of ``B`` samples is run as ``n = B // m``
full micro-batches of ``m`` samples plus, when ``B % m``, one remainder
micro-batch of the last ``B - n * m`` samples.

Full micro-batches are taken by stride, not as consecutive slices: the first
``n * m`` rows are reshaped to ``[m, n, ...]`` and micro-batch ``j`` is index
``j`` on axis 1, i.e. rows ``j, j + n, j + 2n, ...``. A batch sharded along its
first axis (data parallelism: each device holds a contiguous block of rows)
keeps that sharding on axis 0 of the reshaped array, so every device holds its
share of every micro-batch and taking one moves no data between devices;
consecutive slices would put each micro-batch on few devices. The order of
samples inside the big batch does not matter to its loss and gradient (sums
over samples), so the stride changes nothing but the layout.

Everything is `keras.ops` on the batch's leaves (``x``, ``y``, sample weights;
`None` leaves stay `None`), so every backend shares it. The counts are Python
ints when the batch size is static (JAX, XLA) and tensors when it is not
(TensorFlow graphs without XLA see a `None` batch dimension).
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


def _map_leaves(function: Any, data: Any) -> Any:
    """``function`` applied to every array of ``data``; `None` leaves stay `None`.

    `keras.tree.map_structure` hands `None` to the function (``train_on_batch``
    passes a missing sample weight as `None`).
    """
    return tree.map_structure(lambda leaf: None if leaf is None else function(leaf), data)


def _strided(leaf: Any, full: Any, micro_batch_size: int) -> Any:
    """The first ``full * m`` rows of ``leaf`` as ``[m, full, ...]``."""
    shape = ops.shape(leaf)
    rows = leaf[: full * micro_batch_size]
    return ops.reshape(rows, (micro_batch_size, full, *shape[1:]))


def full_micro_batch(data: Any, index: Any, full: Any, micro_batch_size: int) -> Any:
    """Full micro-batch ``index`` of ``data``: rows ``index, index + full, ...``.

    Args:
        data: the step's batch, any nest of arrays with the batch first.
        index: which micro-batch, ``0 <= index < full`` (int or scalar tensor,
            e.g. a loop counter).
        full: the number of full micro-batches (see `counts`).
        micro_batch_size: ``m``.

    Returns:
        ``data`` with every leaf replaced by its ``m`` rows of the micro-batch.
    """
    return _map_leaves(
        lambda leaf: ops.take(_strided(leaf, full, micro_batch_size), index, axis=1), data
    )


def stacked_full_micro_batches(data: Any, full: int, micro_batch_size: int) -> Any:
    """All full micro-batches of ``data`` at once, leaves ``[full, m, ...]``.

    For loops that scan over a leading axis (`jax.lax.scan`). Element ``j``
    is `full_micro_batch` ``j``; the transpose only relabels axes, so a
    sharded batch stays sharded along the ``m`` axis.

    Args:
        data: the step's batch.
        full: the number of full micro-batches (a Python int).
        micro_batch_size: ``m``.

    Returns:
        ``data`` with every leaf reshaped to ``[full, m, ...]``.
    """

    def stack(leaf):
        strided = _strided(leaf, full, micro_batch_size)
        axes = (1, 0, *range(2, len(strided.shape)))
        return ops.transpose(strided, axes)

    return _map_leaves(stack, data)


def remainder_micro_batch(data: Any, full: Any, micro_batch_size: int) -> Any:
    """The remainder micro-batch of ``data``: its rows after the first ``full * m``.

    Args:
        data: the step's batch.
        full: the number of full micro-batches (see `counts`).
        micro_batch_size: ``m``.

    Returns:
        ``data`` with every leaf replaced by its last ``B - full * m`` rows.
    """
    return _map_leaves(lambda leaf: leaf[full * micro_batch_size :], data)
