"""TensorFlow mechanics of the accumulating ``train_step``.

What a window *is* lives in `accum_keras._window`; this module only says how a
TensorFlow step computes the gradient of a micro-batch's accumulation
objective, adds it to the accumulators and, every ``k``-th micro-batch, hands
the window's gradient to the optimizer — inside the compiled step, so
``steps_per_execution`` and XLA work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf
from keras.src import tree
from keras.src.losses import loss as keras_loss
from keras.src.trainers.data_adapters import data_adapter_utils

from accum_keras import _loss_terms, _window


def distribution_scope(model):
    """The scope accumulators are created in."""
    return model.distribute_strategy.scope()


def num_samples(x) -> Any:
    """Samples in a micro-batch, counted as Keras' loss tracker counts them."""
    first = next(leaf for leaf in tree.flatten(x) if leaf is not None)
    return tf.shape(first)[0]


def train_step(model, data):
    """One micro-batch: accumulate its gradient, apply the window when full."""
    model._prepare_accumulation_while_tracing(data)
    state = model._accumulation_state
    optimizer = model.optimizer
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    samples = num_samples(x)
    is_first = tf.equal(state.micro_step.value, 0)

    with tf.GradientTape() as tape:
        if model._call_has_training_arg:
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
        with _loss_terms.recorded_terms(model._compile_loss) as terms:
            loss = model._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        model._loss_tracker.update_state(
            keras_loss.unscale_loss_for_distribution(loss), sample_weight=samples
        )
        weights = _window.micro_batch_weights(
            loss,
            terms,
            samples,
            state.window_divisor.value,
            state.reference_divisor.value,
            is_first,
        )
        objective = optimizer.scale_loss(weights.objective)

    variables = state.accumulated_variables
    gradients = tape.gradient(objective, variables)
    gradients = _unscale(optimizer, gradients)
    model._accumulation_has_gradient = [g is not None for g in gradients]
    _add_to_accumulators(state.gradients, gradients)

    state.window_divisor.assign_add(weights.divisor)
    state.reference_divisor.assign(weights.reference_divisor)
    state.window_samples.assign_add(samples)
    state.samples_seen.assign_add(tf.cast(samples, "float32"))
    state.micro_step.assign_add(1)

    tf.cond(
        state.micro_step.value >= state.accumulation_steps.value,
        lambda: _apply_window_and_report(model),
        lambda: tf.constant(False),
    )
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _unscale(optimizer, gradients: Sequence[Any]) -> list[Any]:
    """Removes a `LossScaleOptimizer`'s scale so accumulators hold true gradients."""
    scale = getattr(optimizer, "loss_scale_factor", None)
    if scale is None:
        return list(gradients)
    return [None if g is None else g / tf.cast(scale, g.dtype) for g in gradients]


def _add_to_accumulators(accumulators, gradients) -> None:
    for accumulator, gradient in zip(accumulators, gradients):
        if gradient is None:
            continue
        if isinstance(gradient, tf.IndexedSlices):
            accumulator.value.scatter_add(
                tf.IndexedSlices(
                    tf.cast(gradient.values, "float32"),
                    gradient.indices,
                    gradient.dense_shape,
                )
            )
        else:
            accumulator.assign_add(tf.cast(gradient, "float32"))


def _apply_window_and_report(model):
    apply_window(model)
    return tf.constant(True)


def apply_window(model) -> None:
    """Hands the window's gradient to the optimizer and opens a new window.

    Variables that received no gradient in the traced step get `None`, exactly
    as plain Keras passes them, so the optimizer skips them.
    """
    state = model._accumulation_state
    has_gradient = getattr(model, "_accumulation_has_gradient", None)
    if has_gradient is None or len(has_gradient) != len(state.gradients):
        has_gradient = [True] * len(state.gradients)
    scale = _window.update_scale(state.window_divisor.value, state.reference_divisor.value)
    gradients = [
        tf.cast(accumulator.value * scale, variable.dtype) if present else None
        for accumulator, variable, present in zip(
            state.gradients, state.accumulated_variables, has_gradient
        )
    ]
    model.optimizer.apply(gradients, state.accumulated_variables)
    for accumulator in state.gradients:
        accumulator.assign(tf.zeros_like(accumulator.value))
    state.last_update_samples.assign(state.window_samples.value)
    state.window_samples.assign(0)
    state.window_divisor.assign(0.0)
    state.micro_step.assign(0)


def make_apply_function(model):
    """A compiled function that applies the open window (used at epoch ends)."""
    if model.run_eagerly:
        return lambda: apply_window(model)
    return tf.function(lambda: apply_window(model))
