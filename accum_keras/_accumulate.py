"""`accumulate` and `clone_model`: accumulating models from models you already have.

Functional models (``keras.applications`` networks, most loaded ``.keras``
files) and built ``Sequential`` models are graphs of layers: an
`accum_keras.Model` over the same inputs and outputs *shares* those layers, so
it trains the very same weights. A compiled model also hands over its
compilation, with the same optimizer object, so that a model loaded with its
optimizer state continues where it stopped. Subclassed models and KerasHub
tasks carry Python code a graph cannot hold (``call``, ``generate``,
preprocessing): they get the mixin on their class instead, and `accumulate`
says so.
"""

from __future__ import annotations

from typing import Any

import keras

from accum_keras import _keras_internals, _options
from accum_keras._config import check_accumulation_steps
from accum_keras._model import AccumulatingModel, Model, copy_model_options


def accumulate(
    model: keras.Model, accumulation_steps: int | None = None, **options: Any
) -> keras.Model:
    """Returns a model that trains ``model``'s weights with gradient accumulation.

    Args:
        model: a functional model or a built `keras.Sequential` (for example
            a `keras.applications` network or a model from
            `keras.models.load_model`). An accumulating model is returned
            itself, with ``accumulation_steps`` set.
        accumulation_steps: int >= 1, micro-batches per optimizer update.
            None (the default): 1 for a new twin (e.g. with only
            ``micro_batch_size``), unchanged for an accumulating model.
        **options: the twin's other model options (see `AccumulatingModel`:
            ``skip_nonfinite_updates``, ``accumulator_dtype``,
            ``micro_batch_size`` with ``accumulation_steps=1``); those not
            given take their defaults. An accumulating model keeps its own,
            which these must then equal.

    Returns:
        An `accum_keras.Model` sharing ``model``'s layers (and therefore its
        weights). If ``model`` is compiled, the twin is compiled with the very
        objects it was compiled with (losses and metrics, registered or not,
        ``loss_weights``, ``weighted_metrics``, and the optimizer with its
        state, wrapped in a `LossScaleOptimizer` or not) and its current
        ``run_eagerly``, ``jit_compile`` and ``steps_per_execution``;
        otherwise it is uncompiled.

    Raises:
        TypeError: for subclassed models and subclasses of functional models
            with their own constructor (KerasHub tasks), which need the
            `AccumulatingModel` mixin on their class; for a keyword argument
            that is no model option.
        ValueError: for a `Sequential` model that is not built yet; for an
            option an accumulating model already has another value of.

    Example:

    ```python
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=3
    )
    model = accum_keras.accumulate(base, accumulation_steps=8)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    ```
    """
    _options.refuse_unknown(options, where="accumulate()")
    if accumulation_steps is None:
        accumulation_steps = (
            model.accumulation_steps
            if isinstance(model, AccumulatingModel)
            else _options.defaults()["accumulation_steps"]
        )
    steps = check_accumulation_steps(accumulation_steps)
    given = {
        option.name: option.check(options[option.name])
        for option in _options.MODEL_OPTIONS
        if option.name in options
    }
    if isinstance(model, AccumulatingModel):
        for name, value in given.items():
            if name != "accumulation_steps" and value != getattr(model, name):
                raise ValueError(
                    "accumulate() cannot change the options of an accumulating model "
                    f"(it returns the model itself and sets only accumulation_steps): the "
                    f"model has {name}={getattr(model, name)!r}. Set `model.{name}` "
                    f"instead. Received: {name}={value!r}."
                )
        model.accumulation_steps = steps
        return model
    if not isinstance(model, keras.Model):
        raise TypeError(f"accumulate() takes a keras.Model; received model={model!r}.")
    if type(model) not in (_keras_internals.functional_class(), keras.Sequential):
        name = type(model).__name__
        raise TypeError(
            f"accumulate() takes functional and Sequential models; {name} is a "
            "subclassed model (its call() and other methods are Python code, not "
            "a graph of layers). Put the mixin on its class instead:\n\n"
            f"    class Accum{name}(accum_keras.AccumulatingModel, {name}):\n"
            "        pass\n\n"
            f"and build it with Accum{name}(..., accumulation_steps={steps}) (KerasHub "
            f"tasks: Accum{name}.from_preset(..., accumulation_steps={steps}))."
        )
    if not _has_graph(model):
        raise ValueError(
            "accumulate() needs the model's inputs: build the Sequential model with "
            "a keras.Input first layer (or call it on data once)."
        )
    # The model's own input and output structure (a single tensor stays one):
    # a twin built from the flat lists warns whenever it is called on the data
    # the model takes. A Sequential model has one input and one output.
    if isinstance(model, keras.Sequential):
        inputs, outputs = model.inputs[0], model.outputs[0]
    else:
        inputs, outputs = model.input, model.output
    twin = Model(
        inputs,
        outputs,
        name=model.name,
        **{**given, "accumulation_steps": steps},
    )
    if model.compiled:
        twin.compile(**_compile_arguments(model))
    return twin


def clone_model(model: keras.Model, **kwargs) -> keras.Model:
    """`keras.models.clone_model` that keeps an accumulating model accumulating.

    Keras clones a `Sequential` as a plain `keras.Sequential` and a functional
    model through its class's constructor with the graph alone, so
    `keras.models.clone_model` returns a model that trains with
    ``accumulation_steps=1`` (see docs/your-model.md). This function returns
    a clone of the same class with the same model options (every one of
    `AccumulatingModel`'s, e.g. ``accumulation_steps``). Like Keras' clone,
    its layers are new (freshly initialized unless ``clone_function`` says
    otherwise) and it is compiled as ``model`` was, with a new optimizer.
    Other models are cloned by Keras unchanged.

    Args:
        model: the model to clone.
        **kwargs: `keras.models.clone_model`'s other arguments
            (``input_tensors``, ``clone_function``, ``call_function``,
            ``recursive``).

    Returns:
        The clone.

    Example:

    ```python
    clone = accum_keras.clone_model(model)
    clone.set_weights(model.get_weights())
    ```
    """
    clone = keras.models.clone_model(model, **kwargs)
    if not isinstance(model, AccumulatingModel):
        return clone
    if not isinstance(clone, AccumulatingModel):
        # Keras rebuilt the Sequential as a plain one: the same new layers,
        # in the model's own class.
        plain = clone
        clone = type(model)(
            _keras_internals.sequential_layers(plain), name=plain.name, trainable=plain.trainable
        )
        if plain.compiled:
            clone.compile(**_compile_arguments(plain))
    copy_model_options(model, clone)
    return clone


def _compile_arguments(model: keras.Model) -> dict:
    """What ``model`` was compiled with, as objects, to compile its twin the same way.

    The objects themselves, not a round trip through their serialized form:
    a loss or metric defined in the user's script (a function, a lambda, a
    closure, an unregistered class) cannot be deserialized.
    """
    arguments = _keras_internals.compile_arguments(model)
    if arguments is None:
        arguments = keras.saving.deserialize_keras_object(model.get_compile_config())
    arguments.update(
        # The optimizer object with its state, already wrapped in a
        # LossScaleOptimizer or not: compiling must not wrap it again.
        optimizer=model.optimizer,
        auto_scale_loss=False,
        # The settings as they are now (they can be reassigned after compile).
        run_eagerly=model.run_eagerly,
        # Eager execution compiles nothing; Keras would switch XLA off with a warning.
        jit_compile=model.jit_compile and not model.run_eagerly,
        steps_per_execution=model.steps_per_execution,
    )
    return arguments


def _has_graph(model: keras.Model) -> bool:
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False
