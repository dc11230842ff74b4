"""`AccumulatingModel`: a `keras.Model` mixin whose `fit()` accumulates gradients.

The mixin owns the life of a window around Keras' own training loop:
- ``make_train_function`` builds the window state for the current trainable
  variables and wraps the compiled losses so their divisors are recorded;
- ``train_step`` (per backend, in ``accum_keras._backends``) accumulates one
  micro-batch and applies the window when it holds ``accumulation_steps``;
- at the end of every training epoch, before validation, a short last window
  is applied, exactly as ``fit()`` on the big batch applies a short last
  batch; ``compile()`` applies a pending window with the optimizer that
  accumulated it before replacing it.
"""

from __future__ import annotations

import importlib

import keras
from keras import ops

from accum_keras import _loss_terms
from accum_keras._config import (
    check_accumulation_steps,
    check_optimizer_does_not_accumulate,
)
from accum_keras._state import AccumulationState

_SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def _backend_module():
    name = keras.backend.backend()
    if name not in _SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"accum_keras does not support the Keras backend {name!r} yet. "
            f"Supported backends: {', '.join(_SUPPORTED_BACKENDS)}."
        )
    return importlib.import_module(f"accum_keras._backends.{name}")


class AccumulatingModel:
    """Mixin for `keras.Model`: one optimizer update per `accumulation_steps` micro-batches.

    Put it before the Keras model class in the bases. ``fit()`` then trains on
    micro-batches (the ``batch_size`` you pass, or your dataset's batches) and
    applies one optimizer update per window of ``accumulation_steps``
    micro-batches, with the update the big batch of the whole window would
    make: losses are normalized over the whole window (masks, sample weights,
    ``mean_with_sample_weight``, short last windows), and learning-rate
    schedules, clipping, weight decay and EMA advance once per update.

    Losses computed by the model itself (an overridden ``compute_loss``, or
    only ``add_loss``) are read as means over the micro-batch's samples.

    Args:
        accumulation_steps: int >= 1, micro-batches per optimizer update.
            1 trains exactly like plain Keras. Can be reassigned between
            epochs or ``fit()`` calls without recompiling.
        *args, **kwargs: passed to the Keras model class.

    Example:

    ```python
    class Net(accum_keras.AccumulatingModel, keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    net = Net(accumulation_steps=8)
    net.compile(optimizer="adam", loss="mse")
    net.fit(x, y, batch_size=4)      # updates with the gradient of batch 32
    ```
    """

    def __init__(self, *args, accumulation_steps: int = 1, **kwargs):
        steps = check_accumulation_steps(accumulation_steps)
        super().__init__(*args, **kwargs)
        self._accumulation_steps = steps
        self._accumulation_state = AccumulationState(builder=self._build_accumulation_state)
        self._accumulation_apply_function = None
        self._accumulation_fitting = False
        self._accumulation_evaluating = False

    # -- configuration -----------------------------------------------------

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer update (int >= 1)."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
        value = check_accumulation_steps(value)
        previous = self._accumulation_steps
        if value == previous:
            return
        if value == 1:
            self._apply_pending_window()
        self._accumulation_steps = value
        state = self._accumulation_state
        if state.built:
            state.accumulation_steps.assign(value)
        if (previous == 1) != (value == 1) and self.train_function is not None:
            # The plain-Keras step and the accumulating step are different
            # programs; `fit()` looks the function up before every step, so
            # replacing it here takes effect at the next step.
            self.make_train_function(force=True)

    def get_config(self) -> dict:
        config = super().get_config()
        config["accumulation_steps"] = self._accumulation_steps
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: dict | None = None):
        config = dict(config)
        steps = config.pop("accumulation_steps", 1)
        if "layers" not in config:
            # A subclassed model: its constructor takes the argument.
            return cls(accumulation_steps=steps, **config)
        model = super().from_config(config, custom_objects=custom_objects)
        model.accumulation_steps = steps
        return model

    # -- compile / fit / evaluate hooks ------------------------------------

    def compile(self, *args, **kwargs):
        if getattr(self, "optimizer", None) is not None:
            self._apply_pending_window()
        super().compile(*args, **kwargs)
        check_optimizer_does_not_accumulate(self.optimizer)
        self._accumulation_apply_function = None

    def compile_from_config(self, config):
        # Keras' own version refuses models that override `compile()`.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, *args, **kwargs):
        args, kwargs = _move_accumulation_callbacks_first(args, kwargs)
        self._forget_host_window()
        self._accumulation_fitting = True
        try:
            return super().fit(*args, **kwargs)
        finally:
            self._accumulation_fitting = False

    def evaluate(self, *args, **kwargs):
        evaluating, self._accumulation_evaluating = self._accumulation_evaluating, True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._accumulation_evaluating = evaluating

    def _get_metrics_result_or_logs(self, logs):
        # Keras calls this right after the last training step of an epoch,
        # before validation and `on_epoch_end`: the one place where the big
        # batch's short last batch would already have been applied.
        if self._accumulation_fitting and not self._accumulation_evaluating:
            self._apply_pending_window()
        return super()._get_metrics_result_or_logs(logs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 learns the input shapes by reducing the first distributed
        # batch across replicas, which fails under MultiWorkerMirroredStrategy
        # (plain Keras models crash there too); one replica's batch has the
        # shapes it needs.
        if iterator is not None and getattr(self, "_distribute_strategy", None) is not None:
            data_batch, iterator = _backend_module().first_local_batch(self, iterator), None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def make_train_function(self, force: bool = False):
        if self.train_function is not None and not force:
            return self.train_function
        self._prepare_accumulation()
        make = getattr(_backend_module(), "make_train_function", None)
        if make is None or self._accumulation_steps == 1:
            return super().make_train_function(force=force)
        # The backend chooses, per call, between a program that only
        # accumulates and one that may apply the window.
        self.train_function = make(self)
        return self.train_function

    # -- the step ----------------------------------------------------------

    def train_step(self, *args):
        # ``(data)``, or ``(state, data)`` for JAX's stateless step.
        backend = _backend_module()
        if self._accumulation_steps == 1:
            plain_train_step = getattr(backend, "plain_train_step", None)
            if plain_train_step is not None:
                return plain_train_step(self, *args)
            return self._plain_train_step(*args)
        return backend.train_step(self, *args)

    def _plain_train_step(self, data):
        logs = super().train_step(data)
        state = self._accumulation_state
        if state.built:
            x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            samples = _backend_module().num_samples(x)
            state.last_update_samples.assign(ops.cast(samples, "int32"))
            state.samples_seen.assign_add(ops.cast(samples, "float32"))
        return logs

    # -- window life -------------------------------------------------------

    def _build_accumulation_state(self, with_gradients: bool) -> None:
        """Creates the window state (and accumulators) for the current variables."""
        state = self._accumulation_state
        # Also called when saved state is loaded.
        self._forget_host_window()
        with _backend_module().distribution_scope(self):
            state.build_scalars(self._accumulation_steps)
            if with_gradients and not state.follows(self.trainable_variables):
                self._apply_pending_window()
                state.follow(self.trainable_variables)

    def _prepare_accumulation(self) -> None:
        """Builds the window state before `fit()` traces the step (eager)."""
        self._build_accumulation_state(self.built and self._accumulation_steps > 1)
        self._accumulation_state.accumulation_steps.assign(self._accumulation_steps)
        _loss_terms.install_recorders(self._compile_loss)
        self._find_window_layers()
        self._accumulation_apply_function = None

    def _find_window_layers(self) -> None:
        """Tells window-aware layers whether their statistics follow windows."""
        layers = [
            layer
            for layer in self._flatten_layers(include_self=False)
            if hasattr(layer, "apply_window_statistics")
        ]
        # Bypasses Keras' attribute tracking: these layers are already tracked.
        object.__setattr__(self, "_accumulation_window_layers", layers)
        for layer in layers:
            layer.defer_to_window = self._accumulation_steps > 1

    def _prepare_accumulation_while_tracing(self, data) -> None:
        """Finishes what `_prepare_accumulation` could not do before tracing.

        Without a distribution strategy Keras builds the model, the compiled
        loss and the optimizer on the first trace of the step; the window needs
        them before the step runs (the optimizer's slots cannot be created
        inside the conditional update), so they are built here, symbolically.
        """
        compile_loss = self._compile_loss
        if (
            not self.built
            or (compile_loss is not None and not compile_loss.built)
            or not self.optimizer.built
        ):
            self._symbolic_build(data_batch=data)
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        state = self._accumulation_state
        if not (state.built and state.follows(self.trainable_variables)):
            # Only reached without a distribution strategy (with one, Keras
            # builds everything before tracing and so does `fit()` here).
            with _backend_module().distribution_scope(self):
                state.build_scalars(self._accumulation_steps)
                state.follow(self.trainable_variables)
        _loss_terms.install_recorders(compile_loss)
        self._find_window_layers()

    def _apply_pending_window(self) -> bool:
        """Applies a partially filled window now.

        Returns:
            Whether a window was applied.
        """
        state = self._accumulation_state
        if not state.built:
            return False
        pending = int(ops.convert_to_numpy(state.micro_step)) > 0
        if pending:
            if self._accumulation_apply_function is None:
                self._accumulation_apply_function = _backend_module().make_apply_function(self)
            self._accumulation_apply_function()
        # The window is empty now, whatever the host mirror assumed (a last
        # call of an epoch may run fewer than `steps_per_execution` steps).
        self._accumulation_host_micro_step = 0
        return pending

    def _forget_host_window(self) -> None:
        """Backends that mirror the window counter on the host re-read it.

        The PyTorch step, and the TensorFlow train function when it picks its
        program, decide on the host whether a micro-batch may close its window
        (no device synchronization per micro-batch); their mirror of
        ``micro_step`` is re-read from the variable when it may have changed
        outside the step: at ``fit()`` start and when state is built or loaded.
        """
        self._accumulation_host_micro_step = None

    # -- JAX: the window state travels in the state Keras threads through
    # the compiled step (see `accum_keras._backends.jax`).

    def _get_jax_state(self, **flags):
        state = super()._get_jax_state(**flags)
        return _backend_module().add_window_state(self, state, **flags)

    def jax_state_sync(self):
        _backend_module().sync_window_state(self)
        super().jax_state_sync()

    def _get_state_sharding_spec(self):
        shardings = super()._get_state_sharding_spec()
        return _backend_module().add_window_shardings(self, shardings)

    @property
    def pending_micro_steps(self) -> int:
        """Micro-batches accumulated in the open window (0 between windows)."""
        state = self._accumulation_state
        if not state.built:
            return 0
        return int(ops.convert_to_numpy(state.micro_step))


# `callbacks` is the sixth positional argument of `Model.fit`.
_FIT_CALLBACKS_POSITION = 5


def _move_accumulation_callbacks_first(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Lets `AccumulationCallback` write its logs before other callbacks read them."""
    from accum_keras._callback import AccumulationCallback

    positional = len(args) > _FIT_CALLBACKS_POSITION
    callbacks = args[_FIT_CALLBACKS_POSITION] if positional else kwargs.get("callbacks")
    if callbacks is None or isinstance(callbacks, keras.callbacks.CallbackList):
        return args, kwargs
    callbacks = list(callbacks)
    first = [c for c in callbacks if isinstance(c, AccumulationCallback)]
    ordered = first + [c for c in callbacks if not isinstance(c, AccumulationCallback)]
    if positional:
        args = (*args[:_FIT_CALLBACKS_POSITION], ordered, *args[_FIT_CALLBACKS_POSITION + 1 :])
    else:
        kwargs = {**kwargs, "callbacks": ordered}
    return args, kwargs


@keras.saving.register_keras_serializable(package="accum_keras")
class Model(AccumulatingModel, keras.Model):
    """A functional `keras.Model` that accumulates gradients.

    Example:

    ```python
    inputs = keras.Input((16,))
    outputs = keras.layers.Dense(1)(inputs)
    model = accum_keras.Model(inputs, outputs, accumulation_steps=8)
    ```
    """


@keras.saving.register_keras_serializable(package="accum_keras")
class Sequential(AccumulatingModel, keras.Sequential):
    """A `keras.Sequential` that accumulates gradients.

    Example:

    ```python
    model = accum_keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(1)], accumulation_steps=8
    )
    ```
    """
