"""The forward half of a micro-step, shared by the stateful backends (TensorFlow, PyTorch).

JAX's step is stateless and computes the same things through
``stateless_compute_loss`` (see `accum_keras._backends.jax`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accum_keras import _keras_internals, _loss_terms, _window


def forward(
    model,
    x,
    y,
    sample_weight,
    samples: Any,
    is_first: Any,
    accumulation_steps: Any,
    sum_over_replicas: Callable[[Any], Any] = lambda value: value,
    num_replicas: int = 1,
    track_loss: bool = True,
    window_divisor: Any = None,
    reference_divisor: Any = None,
):
    """Runs the model and its loss on one micro-batch and weighs it into the window.

    Updates the loss tracker with the real micro-batch loss, as Keras' own step
    does. Call it where the backend records gradients (inside a
    `tf.GradientTape` on TensorFlow).

    Args:
        model: the `AccumulatingModel`.
        x, y, sample_weight: the micro-batch.
        samples: number of samples in this replica's micro-batch.
        is_first: boolean tensor, whether the micro-batch opens a window.
        accumulation_steps: ``k`` (see `_window.micro_batch_weights`).
        sum_over_replicas, num_replicas: see `_window.micro_batch_weights`.
        track_loss: whether to update the loss tracker with this
            micro-batch's loss (False in the in-step mode, which logs the
            whole batch's loss once per step).
        window_divisor, reference_divisor: the window's values so far, when
            they are not the window state's (the in-step mode carries them
            in its loop).

    Returns:
        ``(y_pred, weights)``: the predictions and the `_window.MicroBatchWeights`.
    """
    state = model._accumulation_state
    y_pred = model(x, training=True) if _keras_internals.call_has_training_arg(model) else model(x)
    with _loss_terms.recorded_terms(_keras_internals.compile_loss(model)) as terms:
        loss = _keras_internals.compute_loss(model, x, y, y_pred, sample_weight, training=True)
    if track_loss:
        _keras_internals.loss_tracker(model).update_state(
            _keras_internals.unscale_loss_for_distribution(loss), sample_weight=samples
        )
    weights = _window.micro_batch_weights(
        loss,
        terms,
        samples,
        state.window_divisor.value if window_divisor is None else window_divisor,
        state.reference_divisor.value if reference_divisor is None else reference_divisor,
        is_first,
        accumulation_steps=accumulation_steps,
        sum_over_replicas=sum_over_replicas,
        num_replicas=num_replicas,
    )
    return y_pred, weights
