"""Backend-neutral window arithmetic: how micro-batch losses add up to the big batch.

A window is the run of micro-batches that ends in one optimizer update. The big
batch made of the window's micro-batches ``n = 1..m`` has the loss

    L = sum_n S_n / T_m + R,        T_m = sum_n D_n,

where ``S_n`` is micro-batch ``n``'s unnormalized loss sum, ``D_n`` its Keras
divisor (number of loss elements, valid mask entries or sum of sample weights)
and ``R`` the regularization and `add_loss` terms. Keras hands us
``L_n = S_n / D_n + R_n`` per micro-batch, so the exact window gradient is

    grad L = sum_n D_n * grad L_n / T_m

(when ``R`` depends only on the weights, as kernel regularizers do, its
gradient is the same on every micro-batch of a window, so weighting it by
``D_n / T_m`` counts it exactly once; a data-dependent ``add_loss`` is
weighted by the micro-batches' divisors, which is the big batch's mean when
the divisors count samples). Each micro-step therefore
differentiates the *accumulation objective* ``(D_n / D_ref) * L_n`` and adds the
gradient to the accumulators; the window is applied with the gradient scaled by
``D_ref / T_m``. ``D_ref`` is ``k`` times the window's first divisor: for a full
window of equal micro-batches each micro-batch's backward pass then sees the
per-sample magnitudes of the big batch's (so float16 overflows where the big
batch would, not earlier) and the accumulators hold the big batch's gradient. Loss terms with a ``"sum"`` reduction are not normalized by the big
batch either: their objective weight is ``T_n / D_ref``, exact when a model has
only such terms.

Everything here is expressed in `keras.ops`, so every backend shares it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from keras import ops

from accum_keras._loss_terms import LossTerm


@dataclasses.dataclass
class MicroBatchWeights:
    """How one micro-batch enters its window.

    Attributes:
        objective: the scalar to differentiate (its gradient is accumulated).
        divisor: ``D_n``, added to the window divisor.
        reference_divisor: ``D_ref`` of the window after this micro-batch.
        local_divisor: this replica's own share of ``divisor`` (the in-step
            mode logs each replica's big-batch loss as Keras does, normalized
            by its own divisors).
    """

    objective: Any
    divisor: Any
    reference_divisor: Any
    local_divisor: Any = None


def micro_batch_divisor(
    terms: Sequence[LossTerm], num_samples: Any, is_first_in_window: Any, num_replicas: int = 1
) -> Any:
    """The divisor ``D_n`` one replica contributes for one micro-batch.

    Args:
        terms: the compiled loss terms recorded for the micro-batch (empty when
            the model computes its loss itself).
        num_samples: number of samples in the micro-batch.
        is_first_in_window: boolean tensor, whether this micro-batch opens a
            window.
        num_replicas: replicas the global micro-batch is split across.

    Returns:
        A float32 scalar: the sum of the normalized terms' divisors; the
        sample count for a loss computed by the model itself (read as a mean
        over samples); for models whose terms all use a ``"sum"`` reduction,
        ``1 / num_replicas`` on the first micro-batch of a window and 0 after
        it, so that the window divisor, summed over replicas, stays 1.
    """
    samples = ops.cast(num_samples, "float32")
    normalized = [term for term in terms if term.normalized]
    _warn_if_inexact(terms)
    if normalized:
        divisors = [
            samples if term.divisor is None else ops.cast(term.divisor, "float32")
            for term in normalized
        ]
        return sum(divisors[1:], divisors[0])
    if terms:
        return ops.cast(is_first_in_window, "float32") / num_replicas
    return samples


def _warn_if_inexact(terms: Sequence[LossTerm]) -> None:
    """Warns (once per trace) about the two loss layouts one accumulator cannot make exact."""
    normalized = [term for term in terms if term.normalized]
    if normalized and len(normalized) < len(terms):
        warnings.warn(
            "accum_keras: this model mixes loss terms reduced with 'sum' and "
            "normalized ones; the accumulated update normalizes the window by the "
            "normalized terms' divisor and is not exactly the big batch's.",
            stacklevel=3,
        )
    elif len(normalized) > 1 and not all(term.counts_elements for term in normalized):
        warnings.warn(
            "accum_keras: several loss terms are normalized by masks or by sample "
            "weights (mean_with_sample_weight); the window is normalized by the sum "
            "of their divisors, exact only when they are proportional across "
            "micro-batches.",
            stacklevel=3,
        )


def micro_batch_weights(
    loss: Any,
    terms: Sequence[LossTerm],
    num_samples: Any,
    window_divisor: Any,
    reference_divisor: Any,
    is_first_in_window: Any,
    accumulation_steps: Any = 1,
    sum_over_replicas: Callable[[Any], Any] = lambda value: value,
    num_replicas: int = 1,
) -> MicroBatchWeights:
    """Builds the accumulation objective of one micro-batch on one replica.

    With several replicas the window is the global one: divisors are summed
    over replicas (a scalar all-reduce per micro-batch), and Keras' division
    of each replica's compiled loss by the number of replicas is undone, so
    that summing the replicas' gradients at the update gives the global
    big batch's gradient.

    Args:
        loss: the micro-batch loss exactly as Keras computes it.
        terms: the recorded compiled loss terms (see `micro_batch_divisor`).
        num_samples: number of samples in this replica's micro-batch.
        window_divisor: ``T_{n-1}``, the global window divisor so far.
        reference_divisor: the window's ``D_ref`` so far (ignored on the first
            micro-batch).
        is_first_in_window: boolean tensor.
        accumulation_steps: ``k``; the reference divisor of a window is ``k``
            times its first micro-batch's, so that a full window's objective
            has the big batch's scale.
        sum_over_replicas: sums a per-replica tensor over replicas.
        num_replicas: number of replicas.

    Returns:
        A `MicroBatchWeights` whose ``divisor`` is the global ``D_n``.
    """
    local_divisor = micro_batch_divisor(terms, num_samples, is_first_in_window, num_replicas)
    own_divisor = local_divisor
    divisor = sum_over_replicas(local_divisor)
    first_reference = divisor * ops.cast(accumulation_steps, "float32")
    reference = ops.where(
        is_first_in_window,
        ops.where(divisor > 0, first_reference, ops.ones_like(divisor)),
        reference_divisor,
    )
    # Keras divides compiled losses (and regularization) by the number of
    # replicas; a loss the model computes itself is left as it is.
    local_divisor = local_divisor * (num_replicas if terms else 1)
    loss = ops.cast(loss, "float32")
    unnormalized = [
        ops.cast(term.weighted_value, "float32") for term in terms if not term.normalized
    ]
    if unnormalized:
        summed = sum(unnormalized[1:], unnormalized[0])
        new_window_divisor = window_divisor + divisor
        objective = (local_divisor * (loss - summed) + new_window_divisor * summed) / reference
    else:
        objective = loss * (local_divisor / reference)
    return MicroBatchWeights(objective, divisor, reference, own_divisor)


def split_step_loss(objective_sum: Any, reference_divisor: Any, local_divisor_sum: Any) -> Any:
    """The big batch's loss on one replica, from its micro-batches (the in-step mode).

    ``sum_n objective_n * D_ref`` is ``sum_n D_n * L_n`` with this replica's
    divisors and its unscaled losses (see `micro_batch_weights`); divided by
    their sum it is the loss Keras computes (and logs) for the replica's
    whole batch: ``sum_n S_n / sum_n D_n + R``. 0 when every element is
    masked, like Keras' ``divide_no_nan``.

    Args:
        objective_sum: the sum of the step's micro-batch objectives.
        reference_divisor: the step's ``D_ref``.
        local_divisor_sum: the sum of the replica's ``local_divisor``.
    """
    return ops.divide_no_nan(
        ops.cast(objective_sum, "float32") * ops.cast(reference_divisor, "float32"),
        ops.cast(local_divisor_sum, "float32"),
    )


def update_scale(window_divisor: Any, reference_divisor: Any) -> Any:
    """The factor ``D_ref / T_m`` turning accumulators into the window gradient.

    A window whose divisor is zero (every loss element masked) yields 0,
    like Keras' ``divide_no_nan``.
    """
    return ops.divide_no_nan(
        ops.cast(reference_divisor, "float32"), ops.cast(window_divisor, "float32")
    )
