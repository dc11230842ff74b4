"""PyTorch mechanics of the accumulating ``train_step``.

What a window *is* lives in `accum_keras._window`; this module only says how an
eager PyTorch step computes the gradient of a micro-batch's accumulation
objective, adds it to the accumulators and, every ``k``-th micro-batch, hands
the window's gradient to the optimizer.

No host-device synchronization per micro-batch. Whether a micro-batch closes
its window is decided in Python from a host mirror of ``micro_step`` (the
model's ``_accumulation_host_micro_step``), never from a device tensor; the
mirror is re-read from the variable (one synchronization) only when it may
have changed outside the step: at ``fit()`` start and when window state is
built or loaded. Everything else (the window's divisors, counters, the update
scale) stays on the device.

The accumulators are the parameters' ``.grad``. For the duration of the
backward pass each parameter's ``.grad`` *is* its accumulator
(`AccumulationState.gradients`, the tensors that are saved), so autograd adds
the micro-batch's gradient into it in place: no per-step gradient tensors are
kept alive next to the accumulators and no separate add runs, and the memory
is that of plain Keras (parameters plus one gradient buffer each). ``.grad`` is
reset to `None` after the backward pass, so nothing else (``zero_grad``, a
plain Keras step) can touch the window. Variables that get no gradient (found
on the first micro-step, by gradient hooks) are passed to the optimizer as
`None`, as plain Keras does. Parameters whose accumulator has another dtype
(float32 accumulators of a bfloat16 model, or bfloat16 ones of a float32
model; see ``accumulator_dtype``) or that are not dense use
``torch.autograd.grad`` and an explicit add instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from keras import tree
from keras.utils import unpack_x_y_sample_weight

from accum_keras import _apply, _keras_internals, _overwrite, _split, _state, _window
from accum_keras._backends import _stateful

#: The step assigns variables: a user-written ``train_step``'s optimizer
#: calls can be intercepted and accumulated (`accum_keras._custom_step`).
STATEFUL_STEPS = True


def distribution_scope(model):
    """The scope accumulators are created in (none on PyTorch)."""
    return contextlib.nullcontext()


def num_samples(x) -> int:
    """Samples in a micro-batch, counted as Keras' loss tracker counts them."""
    first = next(leaf for leaf in tree.flatten(x) if leaf is not None)
    return first.shape[0]


def _host_micro_step(model) -> int:
    micro_step = getattr(model, "_accumulation_host_micro_step", None)
    if micro_step is None:
        # The one synchronization: after fit() starts or state was loaded.
        micro_step = int(model._accumulation_state.micro_step.value.item())
        model._accumulation_host_micro_step = micro_step
    return micro_step


def train_step(model, data):
    """One micro-batch: accumulate its gradient, apply the window when full."""
    model._prepare_accumulation_while_tracing(data)
    state = model._accumulation_state
    optimizer = model.optimizer
    x, y, sample_weight = unpack_x_y_sample_weight(data)
    samples = num_samples(x)
    micro_step = _host_micro_step(model)
    is_first = state.micro_step.value == 0  # a device tensor, no sync

    y_pred, weights = _stateful.forward(
        model,
        x,
        y,
        sample_weight,
        samples,
        is_first,
        accumulation_steps=model._accumulation_steps,
    )
    # A loss-scaling optimizer's scale is constant within a window: the
    # accumulators hold scaled gradients and the optimizer unscales (and
    # checks) the window's sum, exactly as it would a single gradient.
    objective = optimizer.scale_loss(weights.objective)
    _accumulate(model, objective)

    with torch.no_grad():
        # In place, with Python numbers as kernel arguments: no host-to-device
        # copies either.
        state.window_divisor.value.add_(weights.divisor.detach())
        state.reference_divisor.value.copy_(weights.reference_divisor.detach())
        state.window_samples.value.add_(samples)
        low, blocks = _state.count_samples(
            state.samples_seen.value, state.samples_seen_blocks.value, samples
        )
        state.samples_seen.value.copy_(low)
        state.samples_seen_blocks.value.copy_(blocks)
        state.micro_step.value.add_(1)
    model._accumulation_host_micro_step = micro_step + 1
    if micro_step + 1 >= model._accumulation_steps:
        apply_window(model)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def split_train_step(model, data):
    """The in-step mode: the whole batch's step, run as micro-batches in a loop.

    A Python loop over the micro-batches of `accum_keras._split` (the batch
    size is known on the host), each accumulated as a streaming micro-batch
    is (autograd adds into the accumulators), then one `apply_window`. The
    loss tracker is updated once, with the batch's loss and size; the
    compiled metrics per micro-batch (sums over samples).

    Returns:
        The step's logs, as Keras' ``train_step`` returns them.
    """
    model._prepare_accumulation_while_tracing(data)
    state = model._accumulation_state
    optimizer = model.optimizer
    size = model.micro_batch_size
    x, _, _ = unpack_x_y_sample_weight(data)
    batch = num_samples(x)
    full, remainder = _split.counts(batch, size)
    micro_batches = [_split.full_micro_batch(data, index, full, size) for index in range(full)]
    if remainder:
        micro_batches.append(_split.remainder_micro_batch(data, full, size))
    objective_sum = divisor_sum = 0.0
    for index, micro_batch in enumerate(micro_batches):
        mx, my, sample_weight = unpack_x_y_sample_weight(micro_batch)
        samples = num_samples(mx)
        y_pred, weights = _stateful.forward(
            model,
            mx,
            my,
            sample_weight,
            samples,
            torch.tensor(index == 0),
            accumulation_steps=len(micro_batches),
            track_loss=False,
        )
        _accumulate(model, optimizer.scale_loss(weights.objective))
        with torch.no_grad():
            state.window_divisor.value.add_(weights.divisor.detach())
            state.reference_divisor.value.copy_(weights.reference_divisor.detach())
            objective_sum = objective_sum + weights.objective.detach()
            divisor_sum = divisor_sum + weights.local_divisor.detach()
            model.compute_metrics(mx, my, y_pred, sample_weight=sample_weight)
    with torch.no_grad():
        state.window_samples.value.add_(batch)
        low, blocks = _state.count_samples(
            state.samples_seen.value, state.samples_seen_blocks.value, batch
        )
        state.samples_seen.value.copy_(low)
        state.samples_seen_blocks.value.copy_(blocks)
        state.micro_step.value.add_(len(micro_batches))
        loss = _window.split_step_loss(objective_sum, state.reference_divisor.value, divisor_sum)
        _keras_internals.loss_tracker(model).update_state(loss, sample_weight=batch)
    apply_window(model)
    return model.get_metrics_result()


def _accumulate(model, objective) -> None:
    """Adds the gradient of ``objective`` to the accumulators."""
    state = model._accumulation_state
    parameters = [v.value for v in state.accumulated_variables]
    accumulators = [a.value for a in state.gradients]
    key = tuple(id(v) for v in state.accumulated_variables)
    known = getattr(state, "torch_has_gradient", None)
    # A variable Keras overwrites with its gradient keeps the window maximum
    # (`accum_keras._overwrite`): autograd must not add into it.
    maxima = [_overwrite.is_overwritten(v) for v in state.accumulated_variables]
    is_first = state.micro_step.value == 0  # a device tensor, no sync
    if not _can_alias(parameters, accumulators):
        gradients = torch.autograd.grad(objective, parameters, allow_unused=True)
        loss_scale = _loss_scale(model.optimizer)
        with torch.no_grad():
            for accumulator, gradient, maximum in zip(accumulators, gradients, maxima):
                if gradient is None:
                    continue
                if maximum:
                    accumulator.copy_(_overwrite.window_maximum(accumulator, gradient, is_first))
                else:
                    _add_(accumulator, gradient, loss_scale)
        state.torch_has_gradient = (key, [g is not None for g in gradients])
        return
    # The first step after the variables changed also finds out which
    # variables receive a gradient (hooks fire only for those).
    received = None if known is not None and known[0] == key else [False] * len(parameters)
    hooks = []
    if received is not None:
        for index, parameter in enumerate(parameters):
            hooks.append(
                parameter.register_post_accumulate_grad_hook(
                    lambda _, index=index: received.__setitem__(index, True)
                )
            )
    for parameter, accumulator, maximum in zip(parameters, accumulators, maxima):
        parameter.grad = None if maximum else accumulator
    try:
        objective.backward()
        with torch.no_grad():
            for parameter, accumulator, maximum in zip(parameters, accumulators, maxima):
                if maximum and parameter.grad is not None:
                    accumulator.copy_(
                        _overwrite.window_maximum(accumulator, parameter.grad, is_first)
                    )
    finally:
        for parameter in parameters:
            parameter.grad = None
        for hook in hooks:
            hook.remove()
    if received is not None:
        state.torch_has_gradient = (key, received)


def _add_(accumulator, gradient, loss_scale) -> None:
    """``accumulator += gradient``; a half-precision accumulator gets the float32 sum rounded once.

    It also gets the gradient unscaled (in float32) first: a loss-scaled
    gradient above ~2 exceeds float16's range.
    """
    wide = _summing_dtype(accumulator)
    if wide == accumulator.dtype:
        accumulator.add_(gradient.to(accumulator.dtype))
    else:
        accumulator.copy_(accumulator.to(wide) + gradient.to(wide) / loss_scale)


def _loss_scale(optimizer):
    """The factor ``optimizer.scale_loss`` multiplies a loss by, as a float32 tensor."""
    return torch.as_tensor(optimizer.scale_loss(1.0), dtype=torch.float32)


def _summing_dtype(accumulator):
    """float32 for half-precision accumulators, their own dtype otherwise."""
    return torch.promote_types(accumulator.dtype, torch.float32)


def _can_alias(parameters, accumulators) -> bool:
    # Not a half-precision accumulator: autograd would add the loss-scaled
    # gradient into it in its own dtype, where `_add_` unscales and sums in
    # float32 (and `apply_window` scales the window back as if it had).
    return all(
        _summing_dtype(a) == a.dtype
        and p.dtype == a.dtype
        and p.device == a.device
        and p.shape == a.shape
        and p.layout == a.layout
        for p, a in zip(parameters, accumulators)
    )


def apply_window(model) -> None:
    """Hands the window's gradient to the optimizer and opens a new window.

    The accumulators are scaled in place and handed over as the gradients (no
    copy); variables that received no gradient get `None`, as in plain Keras.
    The skip, statistics and counters are `accum_keras._apply.apply_window`'s.
    """
    state = model._accumulation_state
    known = getattr(state, "torch_has_gradient", None)
    key = tuple(id(v) for v in state.accumulated_variables)
    has_gradient = known[1] if known is not None and known[0] == key else None
    if has_gradient is None:
        has_gradient = [True] * len(state.gradients)
    with torch.no_grad():
        scale = _window.update_scale(state.window_divisor.value, state.reference_divisor.value)
        gradients = []
        for accumulator, variable, present in zip(
            state.gradients, state.accumulated_variables, has_gradient
        ):
            if not present:
                gradients.append(None)
                continue
            accumulated = accumulator.value
            if _overwrite.is_overwritten(variable):
                # A window maximum is handed over as it is (`accum_keras._overwrite`).
                gradient = accumulated
            elif _summing_dtype(accumulated) == accumulated.dtype:
                gradient = accumulated.mul_(scale)
            else:
                # Scaled in float32 and cast once (a half-precision product
                # would round the scale first); in place when the variable
                # has the accumulator's dtype. Scaled back by the loss scale
                # (`_add_` unscaled): the optimizer unscales what it is given.
                scale_back = scale * _loss_scale(model.optimizer)
                gradient = accumulated.to(_summing_dtype(accumulated)) * scale_back
                if variable.value.dtype == accumulated.dtype:
                    gradient = accumulated.copy_(gradient)
            if gradient.dtype != variable.value.dtype:
                gradient = gradient.to(variable.value.dtype)
            gradients.append(gradient)
        _apply.apply_window(model, [(model.optimizer, gradients, state.accumulated_variables)])
    model._accumulation_host_micro_step = 0


def all_finite(gradients) -> Any:
    """Whether every gradient is finite (a boolean tensor, no synchronization)."""
    present = [g for g in gradients if g is not None]
    if not present:
        return torch.tensor(True)
    return torch.stack([torch.isfinite(g).all() for g in present]).all()


def reads_trainable_variables_per_step(model) -> bool:
    """PyTorch steps read ``model.trainable_variables`` every time."""
    return True


def executing_eagerly() -> bool:
    """PyTorch steps always run eagerly."""
    return True


def clear_accumulators(model) -> None:
    """Zeroes the accumulators (autograd adds into them; see `_accumulate`)."""
    with torch.no_grad():
        for accumulator in model._accumulation_state.gradients:
            accumulator.value.zero_()


def check_skip_nonfinite_supported(model) -> None:
    """Every PyTorch setup supports ``skip_nonfinite_updates``."""


def make_apply_function(model):
    """A function that applies the open window now (used at epoch ends)."""
    return lambda: apply_window(model)


def after_data(x):
    """Nothing to wait for: a PyTorch step runs once its data is there."""
    return contextlib.nullcontext()


def run_when(condition, function) -> None:
    """Runs ``function`` when ``condition`` holds (the step is eager Python).

    Reads ``condition`` on the host: one synchronization, made only where a
    window's update is conditional (``skip_nonfinite_updates``).
    """
    if bool(condition):
        function()
