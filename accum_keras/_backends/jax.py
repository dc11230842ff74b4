"""JAX mechanics of the accumulating ``train_step``.

What a window *is* lives in `accum_keras._window`; this module only says how a
stateless JAX step computes the gradient of a micro-batch's accumulation
objective, adds it to the accumulators and, every ``k``-th micro-batch, hands
the window's gradient to the optimizer.

Where the window state lives. Keras' JAX trainer threads four lists of arrays
through the compiled step (trainable, non-trainable, optimizer and metrics
variables) and writes them back to the variables only when it syncs (epoch
ends, callbacks). The window state is training state like the optimizer's
slots, so it travels at the end of the *optimizer* list:

    optimizer values + written window values + read-only values

- written: `AccumulationState.variables()` (counters and accumulators) and
  the pooled statistics of window-aware layers (`AccumBatchNormalization`),
  whose forward pass and window update run in the same stateless scope as
  the model's own variables;
- read-only: ``accumulation_steps`` and the variables of the optimizer's
  learning-rate schedule (e.g. `ScaledLearningRate.multiplier`), so that
  changing them between epochs takes effect without retracing.

The model's ``_get_jax_state``, ``jax_state_sync`` and
``_get_state_sharding_spec`` (see `AccumulatingModel`) call `add_window_state`,
`sync_window_state` and `add_window_shardings` here. The window state is
therefore neither in ``model.weights`` nor in ``optimizer.variables`` (a plain
model or optimizer accepts the saved values), and is saved by
`AccumulationState.save_own_variables` once synced.

The update runs under `jax.lax.cond`: the optimizer's math is executed only on
the micro-batch that closes a window (Keras' built-in accumulation computes an
update on every micro-batch and discards it).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
from keras import tree
from keras.optimizers.schedules import LearningRateSchedule
from keras.utils import unpack_x_y_sample_weight

from accum_keras import _apply, _keras_internals, _loss_terms, _overwrite, _state, _window
from accum_keras import _split as _splitting

_SCALAR_NAMES = tuple(name for name, _ in _state._SCALARS)


#: The step is stateless: a user-written ``train_step`` is accumulated only
#: when it ends in the mixin's (``super().train_step``).
STATEFUL_STEPS = False


def distribution_scope(model):
    """The scope accumulators are created in.

    JAX variables take their layout from the distribution active when they are
    created (``keras.distribution.set_distribution`` or ``distribution.scope()``),
    which is the one ``fit()`` runs under.
    """
    return contextlib.nullcontext()


def num_samples(x) -> int:
    """Samples in a micro-batch (static under `jax.jit`)."""
    first = next(leaf for leaf in tree.flatten(x) if leaf is not None)
    return first.shape[0]


# -- the window state in Keras' JAX state -------------------------------------


def written_variables(model) -> list[Any]:
    """Window variables the step updates.

    The counters and accumulators, then the pooled statistics of window-aware
    layers (`AccumBatchNormalization`).
    """
    state = model._accumulation_state
    if not state.built:
        return []
    return state.variables() + _layer_statistics_variables(model)


def _window_layers(model) -> list[Any]:
    # Found now if no step has looked yet: a window loaded into a fresh model
    # and applied before its first step must reset the layers' statistics too.
    return _apply.window_layers(model)


def _layer_statistics_variables(model) -> list[Any]:
    found: list[Any] = []
    for layer in _window_layers(model):
        variables = getattr(layer, "window_variables", None)
        if variables is None:
            statistics = getattr(layer, "_window", None)
            variables = [v for v in vars(statistics).values() if isinstance(v, keras.Variable)]
        found.extend(variables)
    return found


def read_only_variables(model) -> list[Any]:
    """Variables the step reads but never writes."""
    state = model._accumulation_state
    if not state.built:
        return []
    return [state.accumulation_steps, *_schedule_variables(model)]


def _schedule_variables(model) -> list[Any]:
    optimizer = getattr(model, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    found: list[Any] = []
    pending = [_keras_internals.learning_rate_of(inner) if inner is not None else None]
    while pending:
        schedule = pending.pop()
        if not isinstance(schedule, LearningRateSchedule):
            continue
        for value in vars(schedule).values():
            if isinstance(value, keras.Variable) and all(value is not v for v in found):
                found.append(value)
            elif isinstance(value, LearningRateSchedule):
                pending.append(value)
    return found


def _optimizer_list_index(flags: dict) -> int:
    return int(bool(flags.get("trainable_variables"))) + int(
        bool(flags.get("non_trainable_variables"))
    )


def add_window_state(model, state: tuple, **flags) -> tuple:
    """Appends the window values to the optimizer list of ``_get_jax_state``."""
    if not flags.get("optimizer_variables"):
        return state
    written = written_variables(model)
    read_only = read_only_variables(model)
    # Remember what was handed out: `sync_window_state` writes back these
    # (kept on the state object: a list of variables set on the model would
    # be tracked as the model's weights).
    model._accumulation_state.jax_written_variables = written
    index = _optimizer_list_index(flags)
    state = list(state)
    # Read-only values are copies: the step donates its state, and these
    # variables are neither purged nor written back.
    values = [v.value for v in written] + [jnp.copy(v.value) for v in read_only]
    state[index] = list(state[index]) + values
    if flags.get("purge_model_variables"):
        # Like Keras' own variables: the arrays now belong to the step (which
        # donates them); the variables get them back at the next sync.
        for variable in written:
            _keras_internals.set_variable_value(variable, None)
    return tuple(state)


def sync_window_state(model) -> None:
    """Writes the window values of ``model._jax_state`` back to the variables.

    Call before Keras' ``jax_state_sync`` (which marks the state synced).
    """
    jax_state = _keras_internals.jax_state(model)
    if not jax_state or _keras_internals.jax_state_synced(model):
        return
    values = jax_state.get("optimizer_variables")
    written = getattr(model._accumulation_state, "jax_written_variables", None)
    if not values or not written:
        return
    values = values[len(model.optimizer.variables) :]
    for variable, value in zip(written, values):
        variable.assign(value)


def add_window_shardings(model, shardings: tuple) -> tuple:
    """Extends ``_get_state_sharding_spec``'s optimizer entry like `add_window_state`.

    The compiled step returns each window value with the layout it came in
    with. Accumulators are created with their variable's layout (see
    `AccumulationState.follow`), so a sharded variable's accumulator stays
    sharded like it: the step adds each gradient where the accumulator lies
    and never gathers or re-shards it between micro-batches.
    """
    trainable, non_trainable, optimizer, metrics = shardings
    extra = [v.value.sharding for v in written_variables(model) + read_only_variables(model)]
    return trainable, non_trainable, list(optimizer) + extra, metrics


def _split(model, optimizer_and_window: Sequence[Any]):
    """Splits the step's optimizer list into optimizer values and window values."""
    count = len(model.optimizer.variables)
    optimizer_values = list(optimizer_and_window[:count])
    rest = list(optimizer_and_window[count:])
    state = model._accumulation_state
    if not state.built:
        return optimizer_values, None, [], []
    written = written_variables(model)
    window_values, read_only_values = rest[: len(written)], rest[len(written) :]
    if len(read_only_values) != len(read_only_variables(model)):
        raise RuntimeError(
            "accum_keras: the JAX training state does not match the model's "
            "accumulation state; call `model.make_train_function(force=True)` "
            "after changing the optimizer."
        )
    return optimizer_values, _unpack(model, window_values), window_values, read_only_values


def _unpack(model, window_values: Sequence[Any]) -> dict:
    """The written window values by role (see `written_variables`)."""
    gradients_end = len(_SCALAR_NAMES) + len(model._accumulation_state.gradients)
    window = dict(zip(_SCALAR_NAMES, window_values))
    window["gradients"] = list(window_values[len(_SCALAR_NAMES) : gradients_end])
    window["layer_statistics"] = list(window_values[gradients_end:])
    return window


def _join(window: dict) -> list[Any]:
    return (
        [window[name] for name in _SCALAR_NAMES]
        + list(window["gradients"])
        + list(window["layer_statistics"])
    )


def _cond(predicate, true_fn, false_fn, *operands):
    """`jax.lax.cond` under tracing; a Python branch when running eagerly.

    Run eagerly (``run_eagerly=True`` or ``jit_compile=False``), `lax.cond`
    would trace and compile both branches on every micro-batch.
    """
    if isinstance(predicate, jax.core.Tracer):
        return jax.lax.cond(predicate, true_fn, false_fn, *operands)
    return true_fn(*operands) if bool(predicate) else false_fn(*operands)


@contextlib.contextmanager
def _reading(variables: Sequence[Any], values: Sequence[Any]) -> Iterator[None]:
    """Lets code that reads ``variables`` directly see the step's ``values``.

    A variable read inside `jax.jit` outside a `StatelessScope` would be
    baked into the compiled step as a constant; the optimizer reads its
    learning-rate schedule's variables that way.
    """
    saved = [_keras_internals.variable_value(v) for v in variables]
    for variable, value in zip(variables, values):
        _keras_internals.set_variable_value(variable, value)
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            _keras_internals.set_variable_value(variable, value)


# -- the steps ------------------------------------------------------------------


def plain_train_step(model, state, data):
    """``accumulation_steps == 1``: Keras' own step, plus the sample counters."""
    from accum_keras._model import AccumulatingModel

    trainable, non_trainable, optimizer_and_window, metrics = state
    optimizer_values, window, window_values, read_only_values = _split(model, optimizer_and_window)
    keras_state = (trainable, non_trainable, optimizer_values, metrics)
    with _reading(read_only_variables(model)[1:], read_only_values[1:]):
        logs, keras_state = super(AccumulatingModel, model).train_step(keras_state, data)
    trainable, non_trainable, optimizer_values, metrics = keras_state
    if window is not None:
        x, _, _ = unpack_x_y_sample_weight(data)
        samples = num_samples(x)
        window["last_update_samples"] = jnp.full_like(window["last_update_samples"], samples)
        window["samples_seen"], window["samples_seen_blocks"] = _state.count_samples(
            window["samples_seen"], window["samples_seen_blocks"], samples
        )
        window_values = _join(window)
    optimizer_and_window = optimizer_values + window_values + read_only_values
    return logs, (trainable, non_trainable, optimizer_and_window, metrics)


def train_step(model, state, data, may_apply: bool = True):
    """One micro-batch: accumulate its gradient, apply the window when full.

    Args:
        model: the `AccumulatingModel`.
        state: Keras' JAX training state (see the module docstring).
        data: the micro-batch.
        may_apply: False for micro-batches known not to close their window
            (see `make_train_function`): the step then holds no optimizer
            update at all, not even an untaken `lax.cond` branch.

    Returns:
        ``(logs, state)``.
    """
    _check_accumulators_follow(model)
    trainable, non_trainable, optimizer_and_window, metrics = state
    optimizer_values, window, _, read_only_values = _split(model, optimizer_and_window)
    window["accumulation_steps"] = read_only_values[0]
    x, y, sample_weight = unpack_x_y_sample_weight(data)
    is_first = window["micro_step"] == 0
    loss, y_pred, non_trainable, metrics, window, _ = _accumulate_micro_batch(
        model,
        trainable,
        non_trainable,
        metrics,
        optimizer_values,
        window,
        data,
        is_first,
        window["accumulation_steps"],
    )
    steps = window.pop("accumulation_steps")

    if may_apply:
        read_only = [steps, *read_only_values[1:]]
        trainable, non_trainable, optimizer_values, window = _cond(
            window["micro_step"] >= steps,
            lambda t, n, o, w: apply_window_values(model, t, n, o, w, read_only),
            lambda t, n, o, w: (list(t), list(n), list(o), w),
            list(trainable),
            list(non_trainable),
            optimizer_values,
            window,
        )

    logs, metrics = _keras_internals.update_metrics_variables(
        model, metrics, loss, x, y, y_pred, sample_weight
    )
    optimizer_and_window = optimizer_values + _join(window) + read_only_values
    return logs, (trainable, non_trainable, optimizer_and_window, metrics)


def _accumulate_micro_batch(
    model,
    trainable,
    non_trainable,
    metrics,
    optimizer_values,
    window,
    data,
    is_first,
    accumulation_steps,
):
    """Adds one micro-batch's gradient and counts to the window's values.

    Args:
        model: the `AccumulatingModel`.
        trainable, non_trainable, metrics, optimizer_values: the step's values.
        window: the written window values by role (see `_unpack`).
        data: the micro-batch.
        is_first: boolean, whether it opens the window.
        accumulation_steps: ``k`` of `_window.micro_batch_weights`.

    Returns:
        ``(loss, y_pred, non_trainable, metrics, window, weights)``: Keras' loss of
        the micro-batch, its predictions, the new values and the
        `_window.MicroBatchWeights`.
    """
    optimizer = model.optimizer
    x, y, sample_weight = unpack_x_y_sample_weight(data)
    samples = num_samples(x)

    def objective_fn(trainable, non_trainable, metrics, layer_statistics):
        y_pred, non_trainable, losses, layer_statistics = _forward(
            model, trainable, non_trainable, layer_statistics, x
        )
        if losses:
            # Forward-pass losses (`add_loss`, regularizers) for compute_loss.
            _keras_internals.set_losses_override(model, losses)
        with _loss_terms.recorded_terms(_keras_internals.compile_loss(model)) as terms:
            loss, (_, non_trainable, metrics) = model.stateless_compute_loss(
                trainable,
                non_trainable,
                metrics,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
        if losses:
            _keras_internals.clear_losses_override(model)
        weights = _window.micro_batch_weights(
            loss,
            terms,
            samples,
            window["window_divisor"],
            window["reference_divisor"],
            is_first,
            accumulation_steps=accumulation_steps,
        )
        mapping = list(zip(optimizer.variables, optimizer_values))
        with keras.StatelessScope(state_mapping=mapping):
            objective = optimizer.scale_loss(weights.objective)
        # Arrays only: the aux output of `value_and_grad` is a pytree.
        fields = dataclasses.astuple(weights)
        return objective, (loss, y_pred, non_trainable, metrics, layer_statistics, fields)

    grad_fn = jax.value_and_grad(objective_fn, has_aux=True)
    (_, aux), gradients = grad_fn(trainable, non_trainable, metrics, window["layer_statistics"])
    loss, y_pred, non_trainable, metrics, layer_statistics, fields = aux
    weights = _window.MicroBatchWeights(*fields)

    # A loss-scaling optimizer's scale is constant within a window: the
    # accumulators hold scaled gradients and the optimizer unscales (and
    # checks) the window's sum, exactly as it would a single gradient.
    # Half-precision accumulators hold them unscaled (see `_add`).
    with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_values))):
        loss_scale = _loss_scale(optimizer)
    window = dict(window)
    window["layer_statistics"] = layer_statistics
    window["gradients"] = [
        # A variable Keras overwrites with its gradient keeps the window
        # maximum (`accum_keras._overwrite`).
        _overwrite.window_maximum(accumulated, gradient, is_first)
        if _overwrite.is_overwritten(variable)
        else _add(accumulated, gradient, loss_scale)
        for accumulated, gradient, variable in zip(
            window["gradients"], gradients, model._accumulation_state.accumulated_variables
        )
    ]
    window["window_divisor"] = window["window_divisor"] + weights.divisor
    window["reference_divisor"] = weights.reference_divisor.astype(
        window["reference_divisor"].dtype
    )
    window["window_samples"] = window["window_samples"] + samples
    window["samples_seen"], window["samples_seen_blocks"] = _state.count_samples(
        window["samples_seen"], window["samples_seen_blocks"], samples
    )
    window["micro_step"] = window["micro_step"] + 1
    return loss, y_pred, non_trainable, metrics, window, weights


def batch_shards(batch_size: int) -> int:
    """How many blocks of rows the current `keras.distribution` shards a batch into.

    The size of the mesh axes that its data layout puts on the batch axis
    (``DataParallel``: its devices; ``ModelParallel``: its ``batch_dim_name``
    axis), across processes too; 1 without a distribution.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    layout = distribution.get_data_layout((batch_size,))
    names = layout.axes[0] if layout.axes else None
    if names is None:
        return 1
    mesh = layout.device_mesh or distribution.device_mesh
    shards = 1
    for name in names if isinstance(names, tuple) else (names,):
        shards *= mesh.shape[list(mesh.axis_names).index(name)]
    return shards


#: The most full micro-batches `split_train_step` unrolls on a CPU (see `_unrolls`).
CPU_UNROLL_LIMIT = 16

#: XLA options of the in-step mode's compiled step on a CPU (see
#: `make_split_train_function`).
CPU_SPLIT_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


@functools.cache
def _cpu_split_compiler_options() -> dict[str, str] | None:
    """`CPU_SPLIT_COMPILER_OPTIONS` if this jaxlib's XLA knows them, else None.

    Older XLA (jaxlib 0.6) refuses the scheduler option ("No such compile
    option"); there the in-step mode keeps Keras' compile and the scan.
    """
    try:
        jax.jit(lambda x: x, compiler_options=CPU_SPLIT_COMPILER_OPTIONS).lower(
            jnp.zeros(())
        ).compile()
    except Exception:  # XlaRuntimeError, or TypeError from a jax without compiler_options
        return None
    return CPU_SPLIT_COMPILER_OPTIONS


def _unrolls(full: int) -> bool:
    """Whether `split_train_step` unrolls its ``full`` micro-batches instead of scanning.

    XLA's CPU compiler rewrites a convolution into the dimension order its
    fast (Eigen) kernels take only in the program's top-level computation
    (its ``ConvCanonicalization`` pass visits the entry computation alone):
    the gradient convolutions inside a ``lax.scan``'s loop body run as generic
    loops, several times slower (docs/performance.md). Unrolled, they are
    top-level. Unrolling multiplies the program and its compile time, so only
    up to `CPU_UNROLL_LIMIT` micro-batches; only on the CPU (accelerator
    compilers were not measured and keep the scan); and only without a
    `keras.distribution` (the order that keeps one micro-batch live reads an
    element of every accumulator, which could move data between devices).

    Args:
        full: the number of full micro-batches (a Python int).

    Returns:
        True to unroll.
    """
    return (
        _on_cpu()
        and keras.distribution.distribution() is None
        and full <= CPU_UNROLL_LIMIT
        and _cpu_split_compiler_options() is not None
    )


def _after_gradients(gradients: Sequence[Any]) -> Any:
    """An int32 zero that XLA cannot compute before ``gradients``.

    XLA's CPU compiler drops ``lax.optimization_barrier``, and its scheduler
    may otherwise start every unrolled micro-batch's forward pass first (all
    their activations live at once). Indexing the next micro-batch with this
    zero makes it wait for the summed gradients. Non-finite sums give zero
    too. Buffers that depend on no input (``iota``, zeros) can still be
    created early: the memory-optimized scheduler of
    `CPU_SPLIT_COMPILER_OPTIONS` keeps them with their micro-batch.

    Args:
        gradients: the accumulators after the previous micro-batch.

    Returns:
        A scalar int32 zero.
    """
    firsts = [
        jnp.ravel(gradient)[0].astype("float32") for gradient in gradients if jnp.size(gradient)
    ]
    if not firsts:
        return jnp.zeros((), "int32")
    total = sum(firsts)
    return jnp.where(jnp.isfinite(total), total * 0.0, 0.0).astype("int32")


def split_train_step(model, state, data):
    """The in-step mode: the whole batch's step, run as micro-batches in a loop.

    The full micro-batches of `accum_keras._split` (stacked by stride within
    each of the distribution's batch shards, so a batch sharded along its
    first axis stays sharded in each of them, see `batch_shards`) are
    accumulated by one `jax.lax.scan` (on a CPU, up to `CPU_UNROLL_LIMIT` of
    them, the same loop unrolled: see `_unrolls`), whose carry holds the
    accumulators, the window's counters, the non-trainable values and the
    metrics; the remainder micro-batch follows; then the window is applied,
    with no condition. The loss tracker is updated once, with the batch's loss and
    size, as Keras' step does; the compiled metrics per micro-batch (sums
    over samples).

    Returns:
        ``(logs, state)``.
    """
    _check_accumulators_follow(model)
    trainable, non_trainable, optimizer_and_window, metrics = state
    optimizer_values, window, _, read_only_values = _split(model, optimizer_and_window)
    size = model.micro_batch_size
    x, _, _ = unpack_x_y_sample_weight(data)
    batch = num_samples(x)
    full, remainder = _splitting.counts(batch, size)
    count = full + (remainder > 0)
    shards = _splitting.aligned_shards(batch, size, batch_shards(batch))

    def accumulate(carry, micro_batch, is_first):
        non_trainable, metrics, window, objective_sum, divisor_sum = carry
        _, y_pred, non_trainable, metrics, window, weights = _accumulate_micro_batch(
            model,
            trainable,
            non_trainable,
            metrics,
            optimizer_values,
            window,
            micro_batch,
            is_first,
            count,
        )
        mx, my, sample_weight = unpack_x_y_sample_weight(micro_batch)
        metrics = _update_compiled_metrics(model, metrics, mx, my, y_pred, sample_weight)
        return (
            non_trainable,
            metrics,
            window,
            objective_sum + weights.objective.astype("float32"),
            divisor_sum + weights.local_divisor.astype("float32"),
        )

    zero = jnp.zeros((), "float32")
    carry = (list(non_trainable), list(metrics), window, zero, zero)
    if full:
        stacked = _splitting.stacked_full_micro_batches(data, full, size, shards)

        def body(carry, scanned):
            index, micro_batch = scanned
            return accumulate(carry, micro_batch, index == 0), None

        if _unrolls(full):
            for index in range(full):
                # Micro-batch ``index`` is read only once the previous one's
                # gradients are summed, so that one micro-batch's activations
                # are live at a time (see `_after_gradients`).
                position = index + _after_gradients(carry[2]["gradients"])
                micro_batch = jax.tree.map(
                    lambda leaf, at=position: jax.lax.dynamic_index_in_dim(
                        leaf, at, keepdims=False
                    ),
                    stacked,
                )
                carry = accumulate(carry, micro_batch, jnp.asarray(index == 0))
        else:
            carry, _ = jax.lax.scan(body, carry, (jnp.arange(full), stacked))
    if remainder:
        micro_batch = _splitting.remainder_micro_batch(data, full, size, shards)
        carry = accumulate(carry, micro_batch, jnp.asarray(full == 0))
    non_trainable, metrics, window, objective_sum, divisor_sum = carry
    loss = _window.split_step_loss(objective_sum, window["reference_divisor"], divisor_sum)

    trainable, non_trainable, optimizer_values, window = apply_window_values(
        model,
        list(trainable),
        non_trainable,
        optimizer_values,
        window,
        read_only_values,
    )
    mapping = list(zip(model.metrics_variables, metrics))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        _keras_internals.loss_tracker(model).update_state(loss, sample_weight=batch)
        logs = model.get_metrics_result()
    metrics = [_current(scope, variable) for variable in model.metrics_variables]
    optimizer_and_window = optimizer_values + _join(window) + read_only_values
    return logs, (trainable, non_trainable, optimizer_and_window, metrics)


def _update_compiled_metrics(model, metrics, x, y, y_pred, sample_weight) -> list:
    """Stateless ``compute_metrics`` on one micro-batch (not the loss tracker)."""
    mapping = list(zip(model.metrics_variables, metrics))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        model.compute_metrics(x, y, y_pred, sample_weight)
    return [_current(scope, variable) for variable in model.metrics_variables]


def _current(scope, variable):
    value = scope.get_current_value(variable)
    return variable.value if value is None else value


def _check_accumulators_follow(model) -> None:
    window_state = model._accumulation_state
    if not window_state.built or not window_state.follows(model.trainable_variables):
        raise RuntimeError(
            "accum_keras: the accumulators do not match the model's trainable "
            "variables. Call `model.make_train_function(force=True)` before "
            "calling the train function directly."
        )


def _add(accumulated, gradient, loss_scale):
    """``accumulated + gradient`` in the accumulator's dtype.

    A half-precision accumulator gets the float32 sum rounded once, not the
    gradient rounded and then the sum, and the gradient unscaled first: a
    loss-scaled gradient above ~2 exceeds float16's range.
    """
    wide = _summing_dtype(accumulated)
    if wide == accumulated.dtype:
        return accumulated + gradient.astype(wide)
    unscaled = gradient.astype(wide) / loss_scale.astype(wide)
    return (accumulated.astype(wide) + unscaled).astype(accumulated.dtype)


def _loss_scale(optimizer):
    """The factor ``optimizer.scale_loss`` multiplies a loss by, in float32 (1 without one)."""
    return jnp.asarray(optimizer.scale_loss(jnp.float32(1.0)), jnp.float32)


def _summing_dtype(accumulated):
    """float32 for half-precision accumulators, their own dtype otherwise."""
    return jnp.promote_types(accumulated.dtype, jnp.float32)


def make_split_train_function(model):
    """The in-step mode's ``train_function`` on a CPU: Keras' own, compiled with XLA options.

    Keras' JAX trainer compiles ``train_step`` with ``jax.jit``; this does the
    same with `CPU_SPLIT_COMPILER_OPTIONS` (XLA's memory-optimized CPU
    scheduler, without which an unrolled step held every micro-batch's
    max-pool buffers at once: see docs/performance.md).

    Returns:
        The train function, or None where Keras' own applies unchanged (not on
        a CPU, not compiled, or Flax NNX, which compiles with ``nnx.jit``).
    """
    if not _on_cpu() or model.run_eagerly or not model.jit_compile:
        return None
    if _cpu_split_compiler_options() is None:
        return None
    if _keras_internals.nnx_enabled():
        return None
    out_shardings = None
    if keras.distribution.distribution() is not None:
        out_shardings = (None, _keras_internals.state_sharding_spec(model))
    step = jax.jit(
        model.train_step,
        donate_argnums=0,
        out_shardings=out_shardings,
        compiler_options=_cpu_split_compiler_options(),
    )
    return _keras_internals.make_function(model, step)


def make_train_function(model):
    """The accumulating model's ``train_function``: two compiled steps, chosen on the host.

    A `lax.cond` whose branch holds the optimizer update costs time even when
    it is not taken (XLA threads the weights and the optimizer's slots
    through it). Keras' JAX trainer runs one compiled step per micro-batch,
    so the host can tell which micro-batches cannot close their window: a
    host mirror of ``micro_step`` (``model._accumulation_host_micro_step``)
    counts them, and those run a step without the update. The others run the
    step that decides on the device (`lax.cond`), which stays exact even if
    the mirror were stale. The mirror is read from the training state (one
    synchronization) after ``fit()`` starts or window state was built or
    loaded, and set to 0 when a pending window is applied.
    """
    jit_compile = not model.run_eagerly and model.jit_compile

    def compiled(may_apply: bool):
        def step(state, data):
            return train_step(model, state, data, may_apply=may_apply)

        if not jit_compile:
            return step
        out_shardings = None
        state_sharding = _keras_internals.state_sharding_spec(model)
        if keras.distribution.distribution() is not None and state_sharding is not None:
            out_shardings = (None, state_sharding)
        return jax.jit(step, donate_argnums=0, out_shardings=out_shardings)

    accumulate, accumulate_and_apply = compiled(False), compiled(True)

    def step(state, data):
        micro_step = getattr(model, "_accumulation_host_micro_step", None)
        if micro_step is None:
            _, window, _, _ = _split(model, state[2])
            micro_step = int(window["micro_step"])
        if micro_step + 1 < model.accumulation_steps:
            model._accumulation_host_micro_step = micro_step + 1
            return accumulate(state, data)
        model._accumulation_host_micro_step = 0
        return accumulate_and_apply(state, data)

    return _keras_internals.make_function(model, step)


def _forward(model, trainable, non_trainable, layer_statistics, x):
    """`Layer.stateless_call`, also threading window-aware layers' statistics.

    Returns:
        ``(y_pred, non_trainable, losses, layer_statistics)``.
    """
    kwargs = {"training": True} if _keras_internals.call_has_training_arg(model) else {}
    statistics_variables = _layer_statistics_variables(model)
    if not statistics_variables:
        y_pred, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, x, return_losses=True, **kwargs
        )
        return y_pred, non_trainable, losses, []
    # What `stateless_call` does, with the statistics in the same scope so
    # that the layers' updates of them can be collected.
    mapping = (
        list(zip(model.trainable_variables, trainable))
        + list(zip(model.non_trainable_variables, non_trainable))
        + list(zip(statistics_variables, layer_statistics))
    )
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
        y_pred = model.call(x, **kwargs)
        losses = model.losses
    non_trainable = [scope.get_current_value(v) for v in model.non_trainable_variables]
    layer_statistics = [scope.get_current_value(v) for v in statistics_variables]
    return y_pred, non_trainable, losses, layer_statistics


def apply_window_values(
    model, trainable, non_trainable, optimizer_values, window, read_only_values
):
    """Stateless window update: `accum_keras._apply.apply_window` on values.

    Runs the shared function in a `keras.StatelessScope` that maps every
    variable it may read or write to the step's values, the way
    ``optimizer.stateless_apply`` runs ``optimizer.apply``; its writes are
    collected from the scope.

    Returns:
        ``(trainable, non_trainable, optimizer_values, window)`` after the
        update.
    """
    state = model._accumulation_state
    groups = (
        state.accumulated_variables,
        model.non_trainable_variables,
        model.optimizer.variables,
        written_variables(model),
    )
    values = (trainable, non_trainable, optimizer_values, _join(window))
    mapping = [
        pair for group, group_values in zip(groups, values) for pair in zip(group, group_values)
    ]
    mapping += list(zip(read_only_variables(model), read_only_values))
    # Variables read inside the optimizer's own stateless scope (its
    # learning-rate schedule's) are read directly, not through this scope.
    reading = _reading(read_only_variables(model)[1:], read_only_values[1:])
    with reading, keras.StatelessScope(state_mapping=mapping) as scope:
        token = _SCOPE.set((scope, [variable for variable, _ in mapping]))
        try:
            scale = _window.update_scale(state.window_divisor.value, state.reference_divisor.value)
            # Half-precision accumulators hold unscaled gradients (`_add`): scaled
            # back, the optimizer unscales what it is given as for a plain step.
            half_scale = scale * _loss_scale(model.optimizer)
            gradients = []
            for accumulator, variable in zip(state.gradients, state.accumulated_variables):
                if _overwrite.is_overwritten(variable):
                    # A window maximum is handed over as it is (`accum_keras._overwrite`).
                    gradients.append(accumulator.value)
                    continue
                wide = _summing_dtype(accumulator.value)
                factor = scale if wide == accumulator.value.dtype else half_scale
                gradients.append((accumulator.value.astype(wide) * factor).astype(variable.dtype))
            _apply.apply_window(model, [(model.optimizer, gradients, state.accumulated_variables)])
        finally:
            _SCOPE.reset(token)
    trainable, non_trainable, optimizer_values, window_values = (
        [scope.get_current_value(variable) for variable in group] for group in groups
    )
    return trainable, non_trainable, optimizer_values, _unpack(model, window_values)


# The scope `apply_window_values` runs in and the variables it maps.
_SCOPE: contextvars.ContextVar = contextvars.ContextVar("accum_keras_jax_apply_scope")


def run_when(condition, function) -> None:
    """Runs ``function`` when ``condition`` holds, statelessly.

    Inside `apply_window_values` the window's update is computed, then every
    value it wrote is selected against the old one: the update lives only in
    the program that may apply a window, whose branch already holds it.
    """
    scope, variables = _SCOPE.get()
    before = [scope.get_current_value(variable) for variable in variables]
    function()
    for variable, old in zip(variables, before):
        new = scope.get_current_value(variable)
        if new is not old:
            variable.assign(jnp.where(condition, new, old))


def apply_gradients(optimizer, gradients: list, variables: list) -> None:
    """``optimizer.stateless_apply`` on the values of `apply_window_values`' scope.

    Not ``optimizer.apply``: a `LossScaleOptimizer`'s stateful ``apply``
    branches with closures that write variables, which `jax.lax.cond` cannot
    trace.
    """
    trainable, optimizer_values = optimizer.stateless_apply(
        [v.value for v in optimizer.variables], gradients, [v.value for v in variables]
    )
    for variable, value in zip(variables, trainable):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, optimizer_values):
        variable.assign(value)


def all_finite(gradients) -> Any:
    """Whether every gradient is finite (a boolean array)."""
    present = [g for g in gradients if g is not None]
    if not present:
        return jnp.asarray(True)
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in present]))


def check_skip_nonfinite_supported(model) -> None:
    """Every JAX setup supports ``skip_nonfinite_updates``."""


def reads_trainable_variables_per_step(model) -> bool:
    """No: Keras' JAX optimizer refuses another trainable set until ``compile()``."""
    return False


def executing_eagerly() -> bool:
    """The JAX step never prepares its state itself (see `train_step`)."""
    return False


def clear_accumulators(model) -> None:
    """Zeroes the accumulators (each micro-step adds to them)."""
    for accumulator in model._accumulation_state.gradients:
        accumulator.assign(jnp.zeros_like(accumulator.value))


def make_apply_function(model):
    """A function that applies the open window to the variables (epoch ends).

    Runs outside the training loop, after Keras synced the state back to the
    variables; compiled unless the model runs eagerly.
    """

    def apply(trainable, non_trainable, optimizer_values, window_values, read_only_values):
        window = _unpack(model, window_values)
        trainable, non_trainable, optimizer_values, window = apply_window_values(
            model, trainable, non_trainable, optimizer_values, window, read_only_values
        )
        return trainable, non_trainable, optimizer_values, _join(window)

    if not model.run_eagerly and model.jit_compile:
        apply = jax.jit(apply)

    def apply_pending():
        accumulated = model._accumulation_state.accumulated_variables
        groups = (
            accumulated,
            model.non_trainable_variables,
            model.optimizer.variables,
            written_variables(model),
        )
        values = apply(
            *([v.value for v in group] for group in groups),
            [v.value for v in read_only_variables(model)],
        )
        # A variable frozen since the window opened is in both of the first
        # two groups; the window's update of it must not be overwritten by
        # its old value.
        updated = {id(v) for v in accumulated}
        for index, (group, group_values) in enumerate(zip(groups, values)):
            for variable, value in zip(group, group_values):
                if index == 1 and id(variable) in updated:
                    continue
                variable.assign(value)

    return apply_pending
