"""The divisor behind each compiled loss term.

Keras reduces a loss term as ``sum(values * weights) / D``. Averaging the
micro-batch losses of a window is only the big-batch loss when every
micro-batch has the same ``D``; with a mask, ``mean_with_sample_weight`` or a
short last micro-batch it does not (shared notes §1). To divide once per window
we need each term's ``D`` next to its value, so the compiled losses are wrapped
in `DivisorRecorder`, which computes the value exactly as `keras.losses.Loss`
does and also reports the divisor it used.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops, tree

from accum_keras import _keras_internals

# Reductions whose divisor grows with the data: a window's divisor is the sum
# of its micro-batches' divisors.
NORMALIZED_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


@dataclasses.dataclass
class LossTerm:
    """One compiled loss term of one micro-batch.

    Attributes:
        weighted_value: the term's value times its `loss_weights` entry, as
            Keras adds it to the total loss.
        divisor: the ``D`` Keras divided by, or `None` when the term is not
            normalized (``"sum"``/``None`` reduction) or its divisor cannot be
            known (a loss that overrides ``__call__`` or reduces itself to a
            scalar); the caller then falls back to the sample count.
        normalized: whether the reduction divides by a data-dependent ``D``.
        counts_elements: whether ``D`` is the number of loss elements (no mask,
            no ``mean_with_sample_weight`` weights): such divisors grow with
            the micro-batch alike for every output.
    """

    weighted_value: Any
    divisor: Any | None
    normalized: bool
    counts_elements: bool = True


class DivisorRecorder(keras.losses.Loss):
    """Wraps one compiled loss so that each call also records its divisor.

    The value returned is the wrapped loss's own value, computed with the
    same Keras helpers in the same order, so plain Keras and the accumulating
    model see identical numbers.
    """

    def __init__(self, inner: keras.losses.Loss, weight: Any = None):
        super().__init__(name=inner.name, reduction=inner.reduction, dtype=inner.dtype)
        self.inner = inner
        self.weight = weight
        self.sink: list | None = None

    def __call__(self, y_true, y_pred, sample_weight=None):
        counts_elements = _keras_internals.get_keras_mask(y_pred) is None and not (
            self.reduction == "mean_with_sample_weight" and sample_weight is not None
        )
        if type(self.inner).__call__ is not keras.losses.Loss.__call__:
            value, divisor = self.inner(y_true, y_pred, sample_weight), None
        else:
            value, divisor = self._value_and_divisor(y_true, y_pred, sample_weight)
        if self.sink is not None:
            weighted = value if self.weight is None else value * self.weight
            self.sink.append(
                LossTerm(
                    weighted_value=weighted,
                    divisor=divisor,
                    normalized=self.reduction in NORMALIZED_REDUCTIONS,
                    counts_elements=counts_elements,
                )
            )
        return value

    def _value_and_divisor(self, y_true, y_pred, sample_weight):
        inner = self.inner
        in_mask = _keras_internals.get_keras_mask(y_pred)
        with keras.name_scope(inner.name):
            y_pred = tree.map_structure(
                lambda x: ops.convert_to_tensor(x, dtype=inner.dtype), y_pred
            )
            y_true = tree.map_structure(
                lambda x: ops.convert_to_tensor(x, dtype=inner.dtype), y_true
            )
            values = inner.call(y_true, y_pred)
            out_mask = _keras_internals.get_keras_mask(values)
            mask = _combine_masks(in_mask, out_mask)
            value = _keras_internals.reduce_weighted_values(
                values,
                sample_weight=sample_weight,
                mask=mask,
                reduction=inner.reduction,
                dtype=inner.dtype,
            )
            divisor = reduction_divisor(values, sample_weight, mask, inner.reduction, inner.dtype)
        return value, divisor

    def call(self, y_true, y_pred):
        return self.inner.call(y_true, y_pred)


def _combine_masks(in_mask, out_mask):
    if in_mask is not None and out_mask is not None:
        return in_mask & out_mask
    return in_mask if in_mask is not None else out_mask


def reduction_divisor(values, sample_weight, mask, reduction, dtype):
    """The ``D`` that `keras.losses.Loss` divides ``sum(values * w)`` by.

    Mirrors ``keras.src.losses.loss.reduce_weighted_values``.

    Args:
        values: the unreduced loss values returned by ``Loss.call``.
        sample_weight: sample weights passed to the loss, or `None`.
        mask: the Keras mask of the prediction or of ``values``, or `None`.
        reduction: the loss's reduction.
        dtype: the loss's compute dtype.

    Returns:
        A scalar tensor, or `None` when Keras does not normalize
        (``"sum"``/``None``) or the loss returned an already reduced scalar.
    """
    if reduction not in NORMALIZED_REDUCTIONS:
        return None
    values = ops.convert_to_tensor(values, dtype=dtype)
    if tuple(values.shape) in ((), (0,)):
        return None
    size = ops.cast(ops.size(values), values.dtype)
    if reduction == "mean_with_sample_weight" and (sample_weight is not None or mask is not None):
        if sample_weight is not None:
            sample_weight = ops.convert_to_tensor(sample_weight, dtype=dtype)
        if mask is not None:
            mask = ops.convert_to_tensor(mask, dtype=dtype)
        merged = _keras_internals.apply_mask(sample_weight, mask, values.dtype, reduction)
        merged = ops.cast(merged, values.dtype)
        _, merged = _keras_internals.squeeze_or_expand_to_same_rank(values, merged)
        return ops.sum(merged)
    if mask is not None and reduction != "mean_with_sample_weight":
        # Keras rescales valid entries by total/valid, so the effective
        # divisor is the number of valid entries (scaled when the mask does
        # not have the shape of the values).
        mask = ops.cast(mask, values.dtype)
        valid = ops.sum(mask)
        return size * valid / ops.cast(ops.size(mask), values.dtype)
    return size


def install_recorders(compile_loss) -> bool:
    """Wraps every built compiled loss term in a `DivisorRecorder`.

    Args:
        compile_loss: the model's ``_compile_loss`` (or `None`).

    Returns:
        Whether the compiled losses are recorded (False when there is no
        compiled loss or it is not built yet).
    """
    if compile_loss is None or not compile_loss.built:
        return False
    flat = _keras_internals.compiled_loss_entries(compile_loss)
    for index, entry in enumerate(flat):
        if not isinstance(entry.loss, DivisorRecorder):
            recorder = DivisorRecorder(entry.loss, entry.loss_weights)
            flat[index] = entry._replace(loss=recorder)
    return True


@contextlib.contextmanager
def recorded_terms(compile_loss) -> Iterator[list]:
    """Collects the `LossTerm`s the compiled loss computes inside the block."""
    sink: list = []
    recorders = []
    if compile_loss is not None and compile_loss.built:
        recorders = [
            entry.loss
            for entry in _keras_internals.compiled_loss_entries(compile_loss)
            if isinstance(entry.loss, DivisorRecorder)
        ]
    for recorder in recorders:
        recorder.sink = sink
    try:
        yield sink
    finally:
        for recorder in recorders:
            recorder.sink = None
