"""Accumulation for models that write their own ``train_step``.

keras.io's VAE, GAN and contrastive examples define ``train_step`` in the
model class and hand their gradients to ``optimizer.apply`` or
``apply_gradients`` themselves. Such a step never reaches the accumulating
step of `AccumulatingModel`, so instead the model's optimizers are intercepted
while the user's step runs:

- every gradient the step hands to an optimizer of the model is read as the
  mean over the micro-batch's samples (like an overridden ``compute_loss``),
  multiplied by the micro-batch's sample count and added to the accumulator of
  its variable (the same accumulators, `AccumulationState.gradients`, that the
  built-in step uses, so saving mid-window works unchanged); a gradient handed
  to a loss-scaling optimizer is divided by its loss scale first, and the
  window is handed back multiplied by it;
- nothing is applied during the step; after ``accumulation_steps`` steps each
  optimizer receives, once, the sum divided by the window's samples: the
  gradient of the mean over the whole window, i.e. the big batch's gradient
  when the step computes a mean loss.

Every optimizer's gradients are those of the weights at the window's start.
For a step whose optimizers update networks that do not feed each other's
losses this is exactly the big batch; a GAN, whose generator loss reads the
discriminator that the same step has just updated, sees the discriminator of
the window's start for the whole window (as with any accumulation).

A step that calls ``super().train_step(data)`` and reaches the mixin simply
uses the built-in accumulating step. Steps that cannot be accumulated fail
when ``fit()`` starts or when it traces the step, before any update, with an
error that names ``train_step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
from keras import ops

from accum_keras import _apply, _overwrite

# Modules whose ``train_step`` is Keras' own (or ours): not a user-written step.
_KERAS_MODULES = ("keras.", "accum_keras.")


def user_train_step(model) -> Callable | None:
    """The ``train_step`` a user class of ``model`` defines, or None.

    Looks through the whole MRO, on either side of the mixin: a user step
    after the mixin would otherwise be shadowed silently by the mixin's.
    """
    for klass in type(model).__mro__:
        if "train_step" not in vars(klass):
            continue
        if klass.__module__.startswith(_KERAS_MODULES) or klass.__module__ == "keras":
            continue
        return vars(klass)["train_step"]
    return None


def model_optimizers(model) -> list[Any]:
    """The optimizers held as attributes of ``model`` (``optimizer`` first)."""
    found = []
    candidates = [getattr(model, "optimizer", None), *vars(model).values()]
    for value in candidates:
        if isinstance(value, keras.optimizers.Optimizer) and all(value is not o for o in found):
            found.append(value)
    return found


def install(model, backend) -> None:
    """Routes the model's user-written ``train_step`` through the window.

    Called when the train function is made (at ``fit()`` start and by
    ``train_on_batch``). Raises where the step cannot be accumulated; on
    backends whose steps are stateless (JAX: ``STATEFUL_STEPS`` is False)
    only steps that end in the mixin's step are accepted, which shows when
    the step is first traced.
    """
    step = user_train_step(model)
    if step is None:
        return
    if model.accumulation_steps > 1:
        _check_supported(model, backend, step)
    # An instance attribute shadows every class's `train_step`, wherever the
    # user's class sits in the MRO; Keras' train functions look it up on the
    # instance. `object.__setattr__` keeps it out of Keras' tracking.
    object.__setattr__(model, "train_step", _make_step(model, backend, step))


def _step_name(step: Callable) -> str:
    return getattr(step, "__qualname__", "train_step")


def _unsupported_backend(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{name} is written in the model class, and on the "
        f"{keras.backend.backend()!r} backend accum_keras cannot accumulate what a "
        "custom train_step hands to its optimizers. Either compute the loss in "
        "`compute_loss()` (or with `add_loss`) and delete `train_step` (or end it "
        "with `return super().train_step(...)`), so that the built-in accumulating "
        "step trains the model, or use the TensorFlow or PyTorch backend, or set "
        "accumulation_steps=1."
    )


def _check_supported(model, backend, step) -> None:
    name = _step_name(step)
    code = getattr(step, "__code__", None)
    if not backend.STATEFUL_STEPS and code is not None and "super" not in code.co_names:
        # Refused now rather than when the step is traced: Keras' JAX fit()
        # has released the model's variables by then, and an error leaves
        # them released.
        raise _unsupported_backend(name)
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is not None:
        raise NotImplementedError(
            f"{name} is written in the model class; accumulating a custom train_step "
            "under a tf.distribute strategy is not supported. Move the loss into "
            "`compute_loss()` and delete `train_step`, or train without a strategy."
        )
    for optimizer in model_optimizers(model):
        check = getattr(optimizer, "gradient_accumulation_steps", None)
        if check:
            raise ValueError(
                f"{name} uses an optimizer with gradient_accumulation_steps={check}; "
                "accum_keras accumulates already: create the optimizer without "
                "gradient_accumulation_steps."
            )


class _Interception:
    """What one micro-batch's user step hands to the model's optimizers."""

    def __init__(self, model, samples, step_name: str, supported: bool):
        self.model = model
        self.supported = supported
        self.samples = samples
        self.step_name = step_name
        self.applied: list[tuple[Any, list[tuple[int, Any]]]] = []
        self.delegated = False
        self._patched: list[Any] = []

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        self._patch()
        try:
            yield
        finally:
            self._unpatch()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The user step called the mixin's step: it accumulates by itself."""
        self.delegated = True
        self._unpatch()
        try:
            yield
        finally:
            self._patch()

    def _patch(self) -> None:
        names = ("apply",) if self.supported else ("apply", "stateless_apply")
        for optimizer in model_optimizers(self.model):
            for name in names:
                object.__setattr__(optimizer, name, self._interceptor(optimizer))
            self._patched.append((optimizer, names))

    def _unpatch(self) -> None:
        for optimizer, names in self._patched:
            for name in names:
                object.__delattr__(optimizer, name)
        self._patched = []

    def _interceptor(self, optimizer):
        def apply(grads, *args, **kwargs):
            if not self.supported:
                # JAX: the step is traced, nothing has been applied yet.
                raise _unsupported_backend(self.step_name)
            self.accumulate(optimizer, grads, *args, **kwargs)

        return apply

    def accumulate(self, optimizer, grads, trainable_variables=None) -> None:
        model = self.model
        grads = list(grads)
        if trainable_variables is None:
            if not optimizer.built:
                raise ValueError(
                    f"{self.step_name} passed gradients without variables to an optimizer "
                    "that is not built; pass the variables too."
                )
            trainable_variables = optimizer._trainable_variables
        trainable_variables = list(trainable_variables)
        if any(o is optimizer for o, _ in self.applied):
            raise NotImplementedError(
                f"{self.step_name} applies gradients with the same optimizer twice in one "
                "step; accum_keras can accumulate one update per optimizer and step. "
                "Set accumulation_steps=1 for this model."
            )
        _ensure_state(model)
        if not optimizer.built:
            # Slots cannot be created inside the conditional update.
            optimizer.build(trainable_variables)
        state = model._accumulation_state
        index = {id(v): i for i, v in enumerate(state.accumulated_variables)}
        taken = {i for _, pairs in self.applied for i, _ in pairs}
        is_first = ops.equal(state.micro_step.value, 0)
        weight = ops.cast(self.samples, "float32")
        loss_scale = _loss_scale(optimizer)
        if loss_scale is not None:
            # The step hands over gradients of its scaled loss: accumulate them
            # unscaled, as the built-in step does, or a float16 accumulator
            # would hold loss scale x window samples x gradient and overflow.
            weight = weight / loss_scale
        pairs = []
        for gradient, variable in zip(grads, trainable_variables, strict=True):
            if gradient is None:
                continue
            position = index.get(id(variable))
            if position is None:
                raise ValueError(
                    f"{self.step_name} applies a gradient to "
                    f"{getattr(variable, 'path', variable)!r}, which is not a trainable "
                    "variable of the model; accum_keras accumulates gradients of the "
                    "model's trainable variables only."
                )
            if position in taken:
                raise NotImplementedError(
                    f"{self.step_name} applies two gradients to "
                    f"{getattr(variable, 'path', variable)!r} in one step (two optimizers?); "
                    "accum_keras cannot accumulate that."
                )
            accumulator = state.gradients[position]
            if _overwrite.is_overwritten(variable):
                # A value, not a gradient: the window maximum (`accum_keras._overwrite`).
                accumulator.assign(_overwrite.window_maximum(accumulator.value, gradient, is_first))
                pairs.append((position, variable))
                continue
            contribution = ops.cast(ops.convert_to_tensor(gradient), "float32") * weight
            # `ops.add` sums a half-precision accumulator in float32; the
            # assignment rounds it once.
            total = ops.add(accumulator.value, contribution)
            accumulator.assign(ops.where(is_first, contribution, total))
            pairs.append((position, variable))
        self.applied.append((optimizer, pairs))


def _ensure_state(model) -> None:
    state = model._accumulation_state
    if not (state.built and state.follows(model.trainable_variables)):
        state.build_scalars(model.accumulation_steps)
        state.follow(model.trainable_variables)
    model._find_window_layers()


@contextlib.contextmanager
def delegating(model) -> Iterator[None]:
    """Wraps the mixin's own step when a user step calls ``super().train_step``."""
    interception = getattr(model, "_accumulation_interception", None)
    if interception is None:
        yield
        return
    with interception.suspended():
        yield


def _make_step(model, backend, user_step):
    name = _step_name(user_step)

    def train_step(*args):
        if model.accumulation_steps == 1:
            return _plain_step(model, backend, user_step, args)
        data = args[-1]
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        samples = backend.num_samples(x)
        interception = _Interception(model, samples, name, backend.STATEFUL_STEPS)
        object.__setattr__(model, "_accumulation_interception", interception)
        try:
            with interception.patched():
                logs = user_step(model, *args)
        except Exception as error:
            if interception.supported or isinstance(error, NotImplementedError):
                raise
            # JAX: a step written for another backend's `(data)` signature.
            raise _unsupported_backend(name) from error
        finally:
            object.__setattr__(model, "_accumulation_interception", None)
        if interception.delegated:
            object.__setattr__(model, "_accumulation_step_delegates", True)
            if interception.applied:
                raise NotImplementedError(
                    f"{name} both calls super().train_step() and applies gradients "
                    "itself; accum_keras can accumulate one or the other."
                )
            return logs
        if not interception.supported:
            raise _unsupported_backend(name)
        if not interception.applied:
            raise ValueError(
                f"{name} handed no gradients to an optimizer of the model "
                "(optimizer.apply / apply_gradients on an optimizer stored as an "
                "attribute of the model), so accum_keras cannot accumulate it. Apply "
                "gradients with the model's optimizers, or set accumulation_steps=1."
            )
        object.__setattr__(model, "_accumulation_custom_updates", interception.applied)
        record_optimizers(model, interception.applied)
        _close_micro_batch(model, backend, x, samples)
        return logs

    return train_step


class _Delegation:
    """Whether a step at ``accumulation_steps == 1`` called the mixin's step.

    The mixin's plain step counts the samples itself; a step that applies its
    own gradients is counted here. Duck-types `_Interception` for `delegating`.
    """

    def __init__(self):
        self.delegated = False

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        self.delegated = True
        yield


def _plain_step(model, backend, user_step, args):
    """The user's step as written (one update per micro-batch), with the sample counters.

    At ``accumulation_steps == 1`` every micro-batch is its own window: the
    logged ``effective_batch_size`` and `AccumulationCallback`'s
    ``base_batch_size`` read these counters as for any other step. JAX's
    stateless steps cannot write them here (a JAX step that ends in
    ``super().train_step`` is counted by the mixin's step).
    """
    delegation = _Delegation()
    object.__setattr__(model, "_accumulation_interception", delegation)
    try:
        logs = user_step(model, *args)
    finally:
        object.__setattr__(model, "_accumulation_interception", None)
    state = model._accumulation_state
    if not delegation.delegated and backend.STATEFUL_STEPS and state.built:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(args[-1])
        samples = backend.num_samples(x)
        with backend.after_data(x):
            state.last_update_samples.assign(ops.cast(samples, "int32"))
            state.add_samples_seen(samples)
    return logs


def _close_micro_batch(model, backend, x, samples) -> None:
    state = model._accumulation_state
    # Counted only once the micro-batch was read (see the backend's
    # `after_data`: a dataset of unknown length ends with a call that reads none).
    with backend.after_data(x):
        state.window_samples.assign_add(ops.cast(samples, "int32"))
        state.add_samples_seen(samples)
        state.micro_step.assign_add(1)
    backend.run_when(
        ops.greater_equal(state.micro_step.value, state.accumulation_steps.value),
        lambda: apply_window(model),
    )


def is_active(model) -> bool:
    """Whether the model's windows are filled by a user-written step."""
    return (
        user_train_step(model) is not None
        and model.accumulation_steps > 1
        and not getattr(model, "_accumulation_step_delegates", False)
    )


def fills_open_window(model) -> bool:
    """Whether the open window was filled by a user-written step's optimizer calls.

    A user step that ends in ``super().train_step`` fills it with the built-in
    step, which is known once the step ran in this process. A model loaded
    with an open window tells from the checkpoint: a user step's window
    records its optimizers (`record_optimizers`) and leaves the window's loss
    divisor at 0 (only the built-in step sums loss divisors).
    """
    # Not `is_active`: the window may have been filled at k >= 2 and be
    # applied now because k was just lowered to 1.
    if user_train_step(model) is None or getattr(model, "_accumulation_step_delegates", False):
        return False
    if getattr(model, "_accumulation_custom_updates", None) is not None:
        return True
    state = model._accumulation_state
    if state.optimizer_indices is not None:
        return True
    return float(ops.convert_to_numpy(state.window_divisor)) == 0.0


def apply_window(model) -> None:
    """Hands each optimizer the mean gradient of the window and opens a new one.

    The skip, statistics and counters are `accum_keras._apply.apply_window`'s.
    """
    state = model._accumulation_state
    total = ops.cast(ops.maximum(state.window_samples.value, 1), "float32")
    updates = []
    for optimizer, pairs in _window_updates(model):
        if not pairs:
            continue
        # Scaled back: the optimizer unscales what it is given, as for a plain step.
        loss_scale = _loss_scale(optimizer)
        scale = total if loss_scale is None else ops.divide(total, loss_scale)
        gradients = [
            # A window maximum is handed over as it is (`accum_keras._overwrite`).
            state.gradients[i].value
            if _overwrite.is_overwritten(v)
            else ops.cast(ops.divide(ops.cast(state.gradients[i].value, "float32"), scale), v.dtype)
            for i, v in pairs
        ]
        updates.append((optimizer, gradients, [v for _, v in pairs]))
    _apply.apply_window(model, updates)


def _loss_scale(optimizer):
    """The factor ``optimizer.scale_loss`` multiplies a loss by (float32), or None."""
    if _apply.is_loss_scale_optimizer(optimizer) or getattr(optimizer, "loss_scale_factor", None):
        return ops.cast(optimizer.scale_loss(1.0), "float32")
    return None


def _window_updates(model) -> list[tuple[Any, list[tuple[int, Any]]]]:
    """Which optimizer updates which accumulated variable.

    Recorded by the step; for a model loaded with an open window that no step
    has run on yet, rebuilt from the optimizer indices saved with the window
    (`record_optimizers`).
    """
    updates = getattr(model, "_accumulation_custom_updates", None)
    if updates is not None:
        return updates
    state = model._accumulation_state
    indices = getattr(state, "optimizer_indices", None)
    optimizers = model_optimizers(model)
    if (
        indices is None
        or len(indices) != len(state.gradients)
        or max(indices, default=-1) >= len(optimizers)
    ):
        raise RuntimeError(
            "The pending window of this model's custom train_step cannot be applied: "
            "the checkpoint does not say which optimizer updates which variable (it "
            "was saved by an older accum_keras, or the model has fewer optimizers "
            "now). Continue training (the next window's update applies it) or call "
            "discard_pending_window()."
        )
    variables = state.accumulated_variables
    return [
        (optimizer, [(i, variables[i]) for i, owner in enumerate(indices) if owner == position])
        for position, optimizer in enumerate(optimizers)
    ]


def record_optimizers(model, applied) -> None:
    """Notes, per accumulator, the index in `model_optimizers` of its optimizer (-1: none).

    Saved with the window, so that a loaded open window can be applied before
    the step runs again.
    """
    state = model._accumulation_state
    optimizers = model_optimizers(model)
    indices = [-1] * len(state.gradients)
    for optimizer, pairs in applied:
        position = next(i for i, o in enumerate(optimizers) if o is optimizer)
        for index, _ in pairs:
            indices[index] = position
    state.optimizer_indices = indices
