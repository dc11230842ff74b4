"""Applying a window: the one function every path calls.

The built-in step of every backend, a user-written ``train_step`` and
``apply_pending_window()`` all end a window here, so what an option does at
the end of a window is written once:

1. the non-finite check: with ``skip_nonfinite_updates`` (or a
   `LossScaleOptimizer`, which skips such a step itself) a window whose
   gradient holds a NaN or an infinity is counted in ``skipped_updates``;
2. the optimizer update, under that condition when the skip is ours;
3. window-aware layers (`AccumBatchNormalization`): their moving statistics
   take the window's pooled statistics on an applied window, and the pooled
   statistics are reset in every case, so a skipped window leaves no trace;
4. the counters: ``last_update_samples`` becomes the window's samples (an
   applied window's only: a skipped one is no update, and its samples are
   counted in ``skipped_samples``) and the
   window opens empty (``micro_step``, ``window_samples``, ``window_divisor``,
   and the accumulators where the backend adds into them).

Backends provide only mechanics, through functions of their module
(``model._accumulation_backend()``):
``all_finite(gradients)`` (a boolean tensor, global across replicas),
``run_when(condition, function)`` (a conditional that may update variables:
`tf.cond`, a Python ``if``, or a selection under a `keras.StatelessScope` on
JAX) and ``clear_accumulators(model)``; a backend whose optimizers must be
applied otherwise than by ``optimizer.apply`` adds ``apply_gradients``
(JAX: ``stateless_apply``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

# One optimizer's share of a window: ``(optimizer, gradients, variables)``,
# the gradients already the window's mean (`None` where a variable got none).
Update = tuple[Any, Sequence[Any], Sequence[Any]]


def apply_window(model, updates: Sequence[Update]) -> None:
    """Ends the open window: the update(s), layer statistics and counters.

    Runs wherever the backend runs a window's end (inside a compiled step,
    eagerly, or under a `keras.StatelessScope` on JAX); it only reads and
    assigns variables.

    Args:
        model: the `AccumulatingModel`.
        updates: what each optimizer applies (see `Update`); the built-in
            step has one, a user-written step one per optimizer it used.
    """
    backend = model._accumulation_backend()
    state = model._accumulation_state
    loss_scaled = any(is_loss_scale_optimizer(optimizer) for optimizer, _, _ in updates)
    finite = None
    if loss_scaled or model.skip_nonfinite_updates:
        finite = backend.all_finite([g for _, gradients, _ in updates for g in gradients])
        state.skipped_updates.assign_add(ops.cast(ops.logical_not(finite), "int32"))

    apply_gradients = getattr(backend, "apply_gradients", _apply_gradients)

    def update() -> None:
        for optimizer, gradients, variables in updates:
            apply_gradients(optimizer, list(gradients), list(variables))

    if model.skip_nonfinite_updates and not loss_scaled:
        backend.run_when(finite, update)
    else:
        # A `LossScaleOptimizer` checks the gradients (and adapts its scale)
        # itself.
        update()
    for layer in window_layers(model):
        layer.apply_window_statistics(applied=finite)
    # A skipped window is no update: the last update's samples stay.
    window_samples = state.window_samples.value
    if finite is not None:
        state.skipped_samples.assign_add(
            ops.where(finite, ops.zeros_like(window_samples), window_samples)
        )
        window_samples = ops.where(finite, window_samples, state.last_update_samples.value)
    state.last_update_samples.assign(window_samples)
    for variable in (state.window_samples, state.window_divisor, state.micro_step):
        variable.assign(ops.zeros_like(variable.value))
    backend.clear_accumulators(model)


def _apply_gradients(optimizer, gradients: list, variables: list) -> None:
    # The instance's `apply`, as plain Keras calls it (whatever wraps it);
    # a user-written step's interception is removed before its window ends.
    optimizer.apply(gradients, variables)


def window_layers(model) -> list[Any]:
    """The model's window-aware layers, found now if no step has looked yet."""
    layers = getattr(model, "_accumulation_window_layers", None)
    if layers is None:
        model._find_window_layers()
        layers = model._accumulation_window_layers
    return list(layers)


def is_loss_scale_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` is a `LossScaleOptimizer` (which skips non-finite steps)."""
    return hasattr(optimizer, "inner_optimizer") and hasattr(optimizer, "dynamic_scale")
