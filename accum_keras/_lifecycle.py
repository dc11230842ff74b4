"""The life of a window, written down in one place.

A window is the run of micro-batches that ends in one optimizer update. Its
state (`accum_keras._state.AccumulationState`) is one of

    EMPTY      no micro-batch pending          (``micro_step == 0``)
    OPEN(n)    n micro-batches accumulated     (``0 < n < k``)

where ``k`` is the model's ``accumulation_steps``. A window never holds ``k``
or more micro-batches once an event has been handled: it is applied as soon
as it does. The events, and what each does:

| event | where | transition |
|---|---|---|
| add a micro-batch | the compiled train step | OPEN(n) -> OPEN(n+1); at n+1 = k: apply -> EMPTY |
| epoch end | ``fit()``, after the epoch's last step, before validation; also when a callback sets ``stop_training`` | OPEN(n) -> apply -> EMPTY (a short window, as the big batch's short last batch) |
| apply | ``model.apply_pending_window()`` | OPEN(n) -> apply -> EMPTY |
| discard | ``model.discard_pending_window()`` | OPEN(n) -> EMPTY, no update |
| resize k -> k' | ``model.accumulation_steps = k'`` (also from a callback, or a k schedule) | OPEN(n) with n >= k': apply -> EMPTY; else OPEN(n), now closing at k' |
| recompile | ``compile()`` with a window open | apply with the optimizer and variables that accumulated it -> EMPTY |
| trainable set changes | freeze/unfreeze, seen when the train function is rebuilt | apply with the variables that accumulated it -> EMPTY |
| save | ``save``, ``save_weights``, ``BackupAndRestore`` | unchanged; the window is saved with the model |
| load | ``load_model``, ``load_weights`` | the saved window; EMPTY with a warning when a saved OPEN window's accumulators don't match the trainable variables; EMPTY for a checkpoint without a window (plain Keras, k = 1); a loaded OPEN(n) with n >= k is applied before the next step |
| restore at ``fit()`` start | ``BackupAndRestore`` | EMPTY: Keras replays the interrupted epoch from its first batch, so the restored window's micro-batches will be seen again |
| interrupt | an exception escapes ``fit()`` (``KeyboardInterrupt``, an error) | unchanged: nothing is lost; the next ``fit()`` or ``train_on_batch`` continues the window, and ``fit()`` warns that it does |

Applying and discarding are the only ways out of OPEN. Everything here runs
eagerly, between compiled steps. Every apply (the step's, a user-written
step's, this module's) ends in `accum_keras._apply.apply_window`, which owns
the skip, the layers' statistics and the counters; how a backend computes the
window's gradient lives in ``accum_keras._backends``.
"""

from __future__ import annotations

import warnings

from keras import ops

from accum_keras import _custom_step


def pending_micro_steps(model) -> int:
    """Micro-batches accumulated in the open window (a host read)."""
    state = model._accumulation_state
    if not state.built:
        return 0
    return int(ops.convert_to_numpy(state.micro_step))


def apply_pending(model) -> bool:
    """Applies the open window now, as one (possibly short) update.

    Returns:
        Whether a window was applied.
    """
    pending = pending_micro_steps(model) > 0
    if pending and _custom_step.fills_open_window(model):
        _custom_step.apply_window(model)
    elif pending:
        if model._accumulation_apply_function is None:
            model._accumulation_apply_function = model._accumulation_backend().make_apply_function(
                model
            )
        model._accumulation_apply_function()
    # The window is empty now, whatever a backend's host mirror of the
    # counter assumed (an epoch's last call may run fewer steps than
    # `steps_per_execution`).
    model._accumulation_host_micro_step = 0
    return pending


def discard_pending(model) -> int:
    """Drops the open window without an update.

    Returns:
        The number of micro-batches dropped.
    """
    dropped = pending_micro_steps(model)
    if dropped:
        _reset_window(model)
    _reset_layer_statistics(model)
    return dropped


def _reset_window(model) -> None:
    state = model._accumulation_state
    for variable in (
        state.micro_step,
        state.window_divisor,
        state.reference_divisor,
        state.window_samples,
    ):
        variable.assign(ops.zeros_like(variable.value))
    model._accumulation_backend().clear_accumulators(model)
    model._forget_host_window()


def _reset_layer_statistics(model) -> None:
    for layer in getattr(model, "_accumulation_window_layers", ()):
        layer.discard_window_statistics()


def settle(model) -> bool:
    """Applies an open window that already holds ``k`` or more micro-batches.

    Reached after ``k`` was lowered or a window was loaded into a model with
    a smaller ``k``; without it the next micro-batch would join a window that
    is already full.

    Returns:
        Whether a window was applied.
    """
    if pending_micro_steps(model) >= model.accumulation_steps:
        return apply_pending(model)
    return False


def resize(model, accumulation_steps: int) -> None:
    """Sets ``k``; a window that already holds ``k`` micro-batches is applied."""
    state = model._accumulation_state
    if state.built:
        state.accumulation_steps.assign(accumulation_steps)
    if getattr(model, "optimizer", None) is not None:
        settle(model)


def check_open_window_at_fit_start(model) -> None:
    """Warns that ``fit()`` continues a window left open before it started."""
    pending = pending_micro_steps(model)
    if pending:
        warnings.warn(
            f"accum_keras: fit() starts with {pending} micro-batch(es) pending in an "
            "open window (left by an interrupted fit() or by train_on_batch); they "
            "are applied with this fit's first window. Call "
            "model.apply_pending_window() or model.discard_pending_window() "
            "before fit() to choose otherwise.",
            stacklevel=4,
        )


def mismatched_window_warning(saved: int, pending: int, expected: int) -> None:
    """The one warning a load gives when it cannot restore a saved open window."""
    warnings.warn(
        f"accum_keras: the checkpoint holds an open window of {pending} "
        f"micro-batch(es) with {saved} accumulators, but the model has {expected} "
        "trainable variables of other shapes; the weights and optimizer were "
        "loaded, the window starts empty (its micro-batches are not applied).",
        stacklevel=2,
    )
