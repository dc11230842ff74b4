"""`accumulate`: an accumulating twin of a model you already have.

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

import keras

from accum_keras import _keras_internals
from accum_keras._config import check_accumulation_steps, check_accumulator_dtype
from accum_keras._model import AccumulatingModel, Model


def accumulate(
    model: keras.Model, accumulation_steps: int, accumulator_dtype: str | None = None
) -> keras.Model:
    """Returns a model that trains ``model``'s weights with gradient accumulation.

    Args:
        model: a functional model or a built `keras.Sequential` (for example
            a `keras.applications` network or a model from
            `keras.models.load_model`). An accumulating model is returned
            itself, with ``accumulation_steps`` set.
        accumulation_steps: int >= 1, micro-batches per optimizer update.
        accumulator_dtype: the twin's ``accumulator_dtype`` (see
            `AccumulatingModel`; None: ``"float32"``). An accumulating model
            keeps its own, which this must then equal or be None.

    Returns:
        An `accum_keras.Model` sharing ``model``'s layers (and therefore its
        weights). If ``model`` is compiled, the twin is compiled with the same
        loss, metrics and optimizer object (its state included); otherwise it
        is uncompiled.

    Raises:
        TypeError: for subclassed models and subclasses of functional models
            with their own constructor (KerasHub tasks), which need the
            `AccumulatingModel` mixin on their class.
        ValueError: for a `Sequential` model that is not built yet.

    Example:

    ```python
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=3
    )
    model = accum_keras.accumulate(base, accumulation_steps=8)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    ```
    """
    steps = check_accumulation_steps(accumulation_steps)
    if accumulator_dtype is not None:
        check_accumulator_dtype(accumulator_dtype)
    if isinstance(model, AccumulatingModel):
        if accumulator_dtype not in (None, model.accumulator_dtype):
            raise ValueError(
                "accumulate() cannot change the accumulator dtype of an accumulating "
                f"model (it is fixed at construction): the model has "
                f"accumulator_dtype={model.accumulator_dtype!r}. Received: "
                f"accumulator_dtype={accumulator_dtype!r}."
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
    twin = Model(
        model.inputs,
        model.outputs,
        name=model.name,
        accumulation_steps=steps,
        accumulator_dtype=accumulator_dtype or "float32",
    )
    if model.compiled:
        config = keras.saving.deserialize_keras_object(model.get_compile_config())
        config["optimizer"] = model.optimizer
        twin.compile(**config)
    return twin


def _has_graph(model: keras.Model) -> bool:
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False
