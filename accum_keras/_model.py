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
import inspect
import warnings

import keras
from keras import ops

from accum_keras import _custom_step, _keras_internals, _lifecycle, _loss_terms, _options
from accum_keras._config import (
    check_accumulation_steps,
    check_accumulator_dtype,
    check_micro_batch_size,
    check_modes_compose,
    check_optimizer_does_not_accumulate,
    check_skip_nonfinite_updates,
)
from accum_keras._state import AccumulationState

_SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


_BACKEND_MODULES: dict = {}


def _backend_module():
    """The `accum_keras._backends` module of Keras' backend.

    Imported once, then looked up: the step calls this while TensorFlow traces
    it, and an import there (``importlib``'s machinery) is code AutoGraph
    cannot convert, which it logs as a warning.
    """
    name = keras.backend.backend()
    module = _BACKEND_MODULES.get(name)
    if module is None:
        if name not in _SUPPORTED_BACKENDS:
            raise NotImplementedError(
                f"accum_keras does not support the Keras backend {name!r} yet. "
                f"Supported backends: {', '.join(_SUPPORTED_BACKENDS)}."
            )
        module = _BACKEND_MODULES[name] = importlib.import_module(f"accum_keras._backends.{name}")
    return module


class AccumulatingModel:
    """Mixin for `keras.Model`: one optimizer update per `accumulation_steps` micro-batches.

    Put it before the Keras model class in the bases (the other order is
    refused with a `TypeError` when the class is defined). ``fit()`` then trains on
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
        skip_nonfinite_updates: if True, a window whose gradient has a NaN
            or infinite value is not applied (the weights, the optimizer and
            its update count stay as they were), and it is counted in the
            logged ``skipped_updates``; like optax's ``apply_if_finite``, for
            any dtype policy. A `LossScaleOptimizer` skips such windows
            anyway. Applies to windows of ``accumulation_steps >= 2`` (at 1
            the model runs Keras' own step). Under a ``tf.distribute``
            strategy a non-finite gradient on any replica skips the window
            on every replica.
        accumulator_dtype: the dtype the window's gradients are summed in:
            ``"float32"`` (the default: the big batch's update to float32
            round-off, whatever the weights' dtype), ``"bfloat16"`` or
            ``"float16"`` (half the memory of float32 accumulators, at a
            relative error that grows with ``accumulation_steps``; float16
            also underflows below 6e-8 and overflows above 65504), or
            ``"variable"`` (each variable's own dtype: bfloat16 for a model
            held in bfloat16, float32 under the mixed policies). Sums are
            formed in float32 and rounded once per micro-batch; the window is
            scaled in float32 and cast once. Measured errors and memory:
            docs/performance.md, "Accumulator dtype". Fixed at construction.
        micro_batch_size: None (the default) or an int >= 1: the in-step
            mode. ``fit()`` is given the big batches themselves; each train
            step splits its batch into micro-batches of at most this many
            samples (taken by stride, see `accum_keras._split`), accumulates
            their gradients in a loop inside the one compiled step and
            applies one update: plain Keras' step on the whole batch, on the
            memory of a micro-batch's activations. Not combinable with
            ``accumulation_steps > 1``; a model with its own ``train_step``
            is refused. Can be reassigned between ``fit()`` calls.
        *args, **kwargs: passed to the Keras model class (the options above,
            declared once in `accum_keras._options`, are taken out first). A
            keyword argument that no constructor after the mixin names (nor
            ``keras.Layer``, nor the functional constructor) raises a
            `TypeError` naming the closest option: Keras' functional
            constructor would ignore it.

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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _check_mixin_order(cls)

    def __init__(self, *args, **kwargs):
        # The options' defaults and checks are declared once, in `_options`.
        options, kwargs = _options.split(kwargs)
        # Keras' functional constructor ignores keyword arguments it does not
        # know: a misspelt option would silently train at k = 1.
        _options.refuse_unknown(
            kwargs, where=f"{type(self).__name__}()", allowed=_keras_keywords(type(self))
        )
        super().__init__(*args, **kwargs)
        self._accumulation_steps = options["accumulation_steps"]
        self._micro_batch_size = options["micro_batch_size"]
        self._skip_nonfinite_updates = options["skip_nonfinite_updates"]
        self._accumulation_state = AccumulationState(
            owner=self, accumulator_dtype=options["accumulator_dtype"]
        )
        self._accumulation_apply_function = None
        self._accumulation_fitting = False
        self._accumulation_evaluating = False
        # Between fit()'s start and its callbacks' `on_train_begin`: a window
        # loaded then is a BackupAndRestore restore (see `_lifecycle`).
        self._accumulation_starting_fit = False
        self._accumulation_restored_at_fit_start = False

    # -- configuration -----------------------------------------------------

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer update (int >= 1)."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
        value = check_accumulation_steps(value)
        check_modes_compose(value, self._micro_batch_size)
        previous = self._accumulation_steps
        if value == previous:
            return
        self._accumulation_steps = value
        _lifecycle.resize(self, value)
        if (previous == 1) != (value == 1) and self.train_function is not None:
            # The plain-Keras step and the accumulating step are different
            # programs; `fit()` looks the function up before every step, so
            # replacing it here takes effect at the next step.
            self.make_train_function(force=True)

    @property
    def micro_batch_size(self) -> int | None:
        """The in-step mode's micro-batch size, or None (see the class docstring)."""
        return self._micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, value: int | None) -> None:
        value = check_micro_batch_size(value)
        check_modes_compose(self._accumulation_steps, value)
        if value == self._micro_batch_size:
            return
        self._micro_batch_size = value
        if self.train_function is not None:
            # The split is traced into the step: the next step uses a new one.
            self.make_train_function(force=True)

    def _splits_steps(self) -> bool:
        """Whether train steps split their batch (the in-step mode)."""
        return self._micro_batch_size is not None

    def _accumulates(self) -> bool:
        """Whether train steps accumulate gradients (either mode)."""
        return self._accumulation_steps > 1 or self._splits_steps()

    @property
    def skip_nonfinite_updates(self) -> bool:
        """Whether a window whose gradient is not finite is left out (see the class docstring)."""
        return self._skip_nonfinite_updates

    @skip_nonfinite_updates.setter
    def skip_nonfinite_updates(self, value: bool) -> None:
        self._skip_nonfinite_updates = check_skip_nonfinite_updates(value)

    @property
    def accumulator_dtype(self) -> str:
        """The dtype choice of the accumulators (see the class docstring).

        Settable until the accumulators exist (they are created by the first
        training step, ``fit()`` or load); after that it is fixed, since
        changing it would round (or drop) an open window.
        """
        return self._accumulation_state.accumulator_dtype

    @accumulator_dtype.setter
    def accumulator_dtype(self, value: str) -> None:
        value = check_accumulator_dtype(value)
        state = self._accumulation_state
        if value == state.accumulator_dtype:
            return
        if state.gradients:
            raise ValueError(
                "`accumulator_dtype` can only be set before the accumulators exist "
                "(before the model's first training step, fit() or load); this model "
                f"accumulates in accumulator_dtype={state.accumulator_dtype!r}. Build a "
                f"new model with accumulator_dtype={value!r} and copy the weights. "
                f"Received: accumulator_dtype={value!r}."
            )
        state.accumulator_dtype = value

    @property
    def pending_micro_steps(self) -> int:
        """Micro-batches accumulated in the open window (0 between windows)."""
        return _lifecycle.pending_micro_steps(self)

    def apply_pending_window(self) -> bool:
        """Applies the open window now, as one update over its micro-batches.

        ``fit()`` does this itself at every epoch end; call it at the end of a
        custom loop of ``train_on_batch`` calls, or after an interrupted
        ``fit()``, so that no micro-batch is left unapplied.

        Returns:
            Whether a window was open (and so applied).

        Example:

        ```python
        for x_batch, y_batch in batches:
            model.train_on_batch(x_batch, y_batch)
        model.apply_pending_window()  # the short last window
        ```
        """
        return _lifecycle.apply_pending(self)

    def discard_pending_window(self) -> int:
        """Drops the open window without an update.

        Returns:
            The number of micro-batches dropped (0 when no window was open).
        """
        return _lifecycle.discard_pending(self)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(_options.non_default(model_options(self)))
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: dict | None = None):
        # The base class deserializes (functional graphs, Sequential layers,
        # KerasHub backbones and preprocessors, or `cls(**config)` for
        # subclassed models); the options are set on what it returns.
        config = dict(config)
        options = _options.checked(
            {name: config.pop(name) for name in _options.OPTION_NAMES if name in config}
        )
        if custom_objects is None:
            # Some bases (KerasHub tasks) take no `custom_objects`; Keras'
            # deserialization passes them through a scope instead.
            model = super().from_config(config)
        else:
            model = super().from_config(config, custom_objects=custom_objects)
        # Before any accumulator exists: they are created at the first fit
        # or load, in the model's accumulator dtype.
        set_model_options(model, options)
        return model

    # -- compile / fit / evaluate hooks ------------------------------------

    def compile(self, *args, **kwargs):
        # Refuse before anything changes: a failed compile keeps the model
        # (its optimizer and its open window) as it was.
        optimizer = args[0] if args else kwargs.get("optimizer", "rmsprop")
        check_optimizer_does_not_accumulate(optimizer)
        if getattr(self, "optimizer", None) is not None:
            _lifecycle.apply_pending(self)
        super().compile(*args, **kwargs)
        self._accumulation_apply_function = None

    def compile_from_config(self, config):
        # Keras' own version refuses models that override `compile()`, which
        # the mixin does; a model class whose `compile()` takes other
        # arguments (a GAN's two optimizers) is refused as Keras refuses it.
        if not _compile_takes_optimizer(type(self)):
            warnings.warn(
                f"{type(self).__name__}.compile() takes other arguments than "
                "keras.Model.compile(), so the model was loaded uncompiled (as Keras "
                "loads such models): call compile() yourself. A pending window "
                "was loaded and is applied by the next window's update.",
                stacklevel=2,
            )
            return
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, *args, **kwargs):
        args, kwargs = _order_callbacks(self, args, kwargs)
        self._forget_host_window()
        self._accumulation_fitting = True
        self._accumulation_starting_fit = True
        self._accumulation_restored_at_fit_start = False
        try:
            return super().fit(*args, **kwargs)
        finally:
            self._accumulation_fitting = False
            self._accumulation_starting_fit = False
            # Keras skips `on_train_end` when fit() raises; the callback's
            # scaled rate must not outlive its fit either way.
            for callback in _accumulation_callbacks(args, kwargs):
                callback._remove_rate()

    def _start_training_windows(self) -> None:
        """Called once fit()'s callbacks have begun (after any restore)."""
        self._accumulation_starting_fit = False
        if self._accumulation_restored_at_fit_start:
            self._accumulation_restored_at_fit_start = False
            _lifecycle.discard_pending(self)
        else:
            _lifecycle.check_open_window_at_fit_start(self)

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
            _lifecycle.apply_pending(self)
        return super()._get_metrics_result_or_logs(logs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 learns the input shapes by reducing the first distributed
        # batch across replicas, which fails under MultiWorkerMirroredStrategy
        # (plain Keras models crash there too); one replica's batch has the
        # shapes it needs.
        if iterator is not None and _keras_internals.distribute_strategy_or_none(self) is not None:
            data_batch, iterator = _backend_module().first_local_batch(self, iterator), None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def make_train_function(self, force: bool = False):
        if self.train_function is not None and not force and not self._trainable_set_changed():
            return self.train_function
        self._prepare_accumulation()
        if self._splits_steps():
            _refuse_user_step_when_splitting(self)
            make_split = getattr(_backend_module(), "make_split_train_function", None)
            function = make_split(self) if make_split is not None else None
            if function is None:
                # Keras' own train function around the splitting `train_step`.
                return super().make_train_function(force=force)
            self.train_function = function
            return self.train_function
        _custom_step.install(self, _backend_module())
        make = getattr(_backend_module(), "make_train_function", None)
        if (
            make is None
            or self._accumulation_steps == 1
            or _custom_step.user_train_step(self) is not None
        ):
            # Keras' own train function, around `train_step` (the user's
            # step, when the model has one).
            return super().make_train_function(force=force)
        # The backend chooses, per call, between a program that only
        # accumulates and one that may apply the window.
        self.train_function = make(self)
        return self.train_function

    # -- the step ----------------------------------------------------------

    def train_step(self, *args):
        # ``(data)``, or ``(state, data)`` for JAX's stateless step.
        backend = _backend_module()
        # A user-written step that calls `super().train_step()` lands here.
        with _custom_step.delegating(self):
            if self._splits_steps():
                return backend.split_train_step(self, *args)
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
            # Not in the step Keras runs past the end of an unknown-length dataset.
            with _backend_module().after_data(x):
                state.last_update_samples.assign(ops.cast(samples, "int32"))
                state.add_samples_seen(samples)
        return logs

    # -- window life -------------------------------------------------------

    def _build_accumulation_state(self, with_gradients: bool) -> None:
        """Creates the window state (and accumulators) for the current variables.

        A window opened with another set of trainable variables is applied
        first, with the variables that accumulated it.
        """
        state = self._accumulation_state
        self._forget_host_window()
        with _backend_module().distribution_scope(self):
            state.build_scalars(self._accumulation_steps)
            if with_gradients and not state.follows(self.trainable_variables):
                _lifecycle.apply_pending(self)
                state.follow(self.trainable_variables)

    def _trainable_set_changed(self) -> bool:
        """Whether layers were frozen or unfrozen since the accumulators were made.

        Only where Keras itself reads the trainable variables at every step
        (JAX, PyTorch, ``run_eagerly``); compiled TensorFlow steps keep the
        variables they were traced with until ``compile()``, as in plain Keras.
        """
        state = self._accumulation_state
        return (
            bool(state.gradients)
            and _backend_module().reads_trainable_variables_per_step(self)
            and not state.follows(self.trainable_variables)
        )

    def _prepare_window_for_load(self, with_gradients: bool) -> None:
        """Builds the window state for the current variables before a load.

        Nothing is applied: the loaded window replaces the open one.
        """
        state = self._accumulation_state
        self._forget_host_window()
        with _backend_module().distribution_scope(self):
            state.build_scalars(self._accumulation_steps)
            if with_gradients:
                state.follow(self.trainable_variables)

    def _window_loaded(self) -> None:
        """A window was just loaded; see the load and restore rows of `_lifecycle`."""
        self._forget_host_window()
        self._accumulation_apply_function = None
        if self._accumulation_starting_fit:
            self._accumulation_restored_at_fit_start = True
        elif not self._accumulation_fitting:
            # The loaded window may already hold `k` micro-batches; the
            # train function settles it when it is built again.
            self.train_function = None

    def _prepare_accumulation(self) -> None:
        """Builds the window state before `fit()` traces the step (eager)."""
        self._build_accumulation_state(self.built and self._accumulates())
        self._accumulation_state.accumulation_steps.assign(self._accumulation_steps)
        _backend_module().check_skip_nonfinite_supported(self)
        _loss_terms.install_recorders(_keras_internals.compile_loss(self))
        self._find_window_layers()
        self._accumulation_apply_function = None
        if self.optimizer is not None and self.optimizer.built:
            _lifecycle.settle(self)

    def _find_window_layers(self) -> None:
        """Tells window-aware layers whether their statistics follow windows."""
        layers = [
            layer
            for layer in _keras_internals.sublayers(self)
            if hasattr(layer, "apply_window_statistics")
        ]
        # Bypasses Keras' attribute tracking: these layers are already tracked.
        object.__setattr__(self, "_accumulation_window_layers", layers)
        for layer in layers:
            layer.defer_to_window = self._accumulates()

    def _prepare_accumulation_while_tracing(self, data) -> None:
        """Finishes what `_prepare_accumulation` could not do before tracing.

        Without a distribution strategy Keras builds the model, the compiled
        loss and the optimizer on the first trace of the step; the window needs
        them before the step runs (the optimizer's slots cannot be created
        inside the conditional update), so they are built here, symbolically.
        """
        compile_loss = _keras_internals.compile_loss(self)
        if (
            not self.built
            or (compile_loss is not None and not compile_loss.built)
            or not self.optimizer.built
        ):
            _keras_internals.symbolic_build(self, data)
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        state = self._accumulation_state
        if not (state.built and state.follows(self.trainable_variables)):
            # Only reached without a distribution strategy (with one, Keras
            # builds everything before tracing and so does `fit()` here),
            # or when a step running eagerly sees layers frozen or unfrozen
            # since the last one: the open window is applied with the
            # variables that accumulated it before the accumulators follow.
            if state.built and _backend_module().executing_eagerly():
                _lifecycle.apply_pending(self)
            with _backend_module().distribution_scope(self):
                state.build_scalars(self._accumulation_steps)
                state.follow(self.trainable_variables)
        _loss_terms.install_recorders(compile_loss)
        self._find_window_layers()

    def _accumulation_backend(self):
        return _backend_module()

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


def _check_mixin_order(cls) -> None:
    """Refuses a class whose bases put a Keras model before the mixin.

    There Keras' constructor runs first and refuses (or, for a functional
    model, ignores) the options, and the model's own methods hide the mixin's.
    """
    mro = cls.__mro__
    if keras.Model not in mro or mro.index(AccumulatingModel) < mro.index(keras.Model):
        return
    bases = [base for base in cls.__bases__ if base is not AccumulatingModel]
    names = ", ".join(
        f"keras.{base.__name__}" if base.__module__.startswith("keras.") else base.__name__
        for base in bases
    )
    raise TypeError(
        f"{cls.__name__} puts accum_keras.AccumulatingModel after a Keras model in its "
        "bases; the mixin must come first, so that it receives the options and its fit() "
        f"and train_step() run. Write:\n\n    class {cls.__name__}(accum_keras."
        f"AccumulatingModel, {names}):\n\nReceived: bases "
        f"{tuple(base.__name__ for base in cls.__bases__)}."
    )


def _keras_keywords(cls) -> set[str]:
    """The keyword arguments the constructors after the mixin may take.

    The named parameters of every ``__init__`` that follows
    `AccumulatingModel` in ``cls``'s MRO (a KerasHub task's ``backbone``,
    Keras' ``name``, ``trainable``, ``dtype``), those of the functional
    constructor (Keras makes a functional subclass of ``cls`` when it is
    given ``inputs`` and ``outputs``) and the two that ``keras.Layer`` reads
    from its ``**kwargs``.
    """
    after_mixin = cls.__mro__[cls.__mro__.index(AccumulatingModel) + 1 :]
    classes = after_mixin + (_keras_internals.functional_class(),)
    names = {"input_dim", "input_shape"}
    for klass in classes:
        init = vars(klass).get("__init__")
        if init is None or klass is object:
            continue
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names.update(
            p.name
            for p in parameters
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
    names.discard("self")
    return names


def _refuse_user_step_when_splitting(model: AccumulatingModel) -> None:
    """Refuses a user-written ``train_step`` in the in-step mode (at fit start)."""
    if _custom_step.user_train_step(model) is None:
        return
    raise NotImplementedError(
        f"{type(model).__name__} defines its own `train_step`, which `micro_batch_size` "
        "cannot split: the in-step mode runs the built-in step once per micro-batch "
        "inside one compiled step. Remove `micro_batch_size` (use accumulation_steps "
        "with micro-batches from your pipeline, which supports your own train_step) or "
        f"the train_step override. Received: micro_batch_size={model.micro_batch_size!r}."
    )


def model_options(model: AccumulatingModel) -> dict:
    """The model's options by name (see `_options.MODEL_OPTIONS`)."""
    return {name: getattr(model, name) for name in _options.OPTION_NAMES}


def set_model_options(model: AccumulatingModel, options: dict) -> None:
    """Sets the given options on ``model``, through their setters (and checks)."""
    for name, value in options.items():
        setattr(model, name, value)


def copy_model_options(source: AccumulatingModel, target: AccumulatingModel) -> None:
    """Gives ``target`` every option of ``source``."""
    set_model_options(target, model_options(source))


def _compile_takes_optimizer(cls) -> bool:
    """Whether the first `compile()` after the mixin accepts Keras' arguments."""
    for klass in cls.__mro__:
        if klass is AccumulatingModel or "compile" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["compile"]).parameters.values()
        return any(
            p.name == "optimizer" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
        )
    return True


# `callbacks` is the sixth positional argument of `Model.fit`.
_FIT_CALLBACKS_POSITION = 5


def _order_callbacks(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Puts `AccumulationCallback` first and the window's own callback last.

    `AccumulationCallback` writes logs that other callbacks read; the window's
    callback must see the model after every other callback's
    ``on_train_begin`` (where `BackupAndRestore` restores it).
    """
    from accum_keras._callback import AccumulationCallback

    positional = len(args) > _FIT_CALLBACKS_POSITION
    callbacks = args[_FIT_CALLBACKS_POSITION] if positional else kwargs.get("callbacks")
    if isinstance(callbacks, keras.callbacks.CallbackList):
        # Keras' own list, built by the caller with its own settings: only
        # make sure that the window's callback ends it.
        if not any(isinstance(c, _WindowStartCallback) for c in callbacks.callbacks):
            window_callback = _WindowStartCallback()
            window_callback.set_model(model)
            callbacks.callbacks.append(window_callback)
        return args, kwargs
    callbacks = list(callbacks or [])
    first = [c for c in callbacks if isinstance(c, AccumulationCallback)]
    others = [
        c for c in callbacks if not isinstance(c, (AccumulationCallback, _WindowStartCallback))
    ]
    ordered = first + others + [_WindowStartCallback()]
    if positional:
        args = (*args[:_FIT_CALLBACKS_POSITION], ordered, *args[_FIT_CALLBACKS_POSITION + 1 :])
    else:
        kwargs = {**kwargs, "callbacks": ordered}
    return args, kwargs


def _accumulation_callbacks(args: tuple, kwargs: dict) -> list:
    from accum_keras._callback import AccumulationCallback

    positional = len(args) > _FIT_CALLBACKS_POSITION
    callbacks = args[_FIT_CALLBACKS_POSITION] if positional else kwargs.get("callbacks")
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = callbacks.callbacks
    return [c for c in callbacks or () if isinstance(c, AccumulationCallback)]


class _WindowStartCallback(keras.callbacks.Callback):
    """Tells the model when fit()'s callbacks have begun training (see `_lifecycle`)."""

    def on_train_begin(self, logs=None):
        self.model._start_training_windows()


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
