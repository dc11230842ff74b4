"""What a user's mistakes meet: the same errors as plain Keras, and no silent typo.

- An error in the user's model or loss reaches the user with the exception
  type plain Keras gives it, at every ``accumulation_steps``: a user's
  ``except KeyError:`` behaves the same at k = 1 and k = 2.
- A misspelt option is refused by every accumulating constructor, naming the
  option that was meant, instead of training at k = 1 without a word.
- The mixin placed after the Keras model in a class's bases is refused when
  the class is created, with the line to write instead.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

import accum_keras

X = np.linspace(-1, 1, 24, dtype="float32").reshape(8, 3)
Y = X[:, :1] * 2


class UserLossError(Exception):
    """An exception class of the user's own, raised by their loss."""


def _failing_loss(y_true, y_pred):
    raise UserLossError("the user's loss refuses")


def _dict_output_model(cls, **options):
    inputs = keras.Input((3,))
    return cls(inputs, {"out": keras.layers.Dense(1, name="out")(inputs)}, **options)


def _branching_class(base):
    class Branching(base):
        """Branches in Python on a value computed from the inputs (not traceable)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            if ops.sum(x) > 0:
                return self.dense(x)
            return self.dense(-x)

    return Branching


# Each builds a compiled model, plain Keras (`plain`) or accumulating with
# `options`, and returns the targets to fit it on.
def _loss_key_naming_no_output(plain, options):
    model = _dict_output_model(keras.Model if plain else accum_keras.Model, **options)
    model.compile("sgd", loss={"wrong": "mse"})
    return model, {"out": Y}


def _python_branch_on_a_tensor_in_call(plain, options):
    bases = (keras.Model,) if plain else (accum_keras.AccumulatingModel, keras.Model)
    model = _branching_class(type("Base", bases, {}))(**options)
    model.compile("sgd", "mse")
    return model, Y


def _python_branch_in_a_model_built_eagerly(plain, options):
    model, y = _python_branch_on_a_tensor_in_call(plain, options)
    model(X)  # built outside any trace: the branch fails only in the step
    return model, y


def _a_loss_raising_the_users_own_exception(plain, options):
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1)(inputs)
    model = (keras.Model if plain else accum_keras.Model)(inputs, outputs, **options)
    model.compile("sgd", loss=_failing_loss)
    return model, Y


ERROR_CASES = {
    "loss_key_naming_no_output": _loss_key_naming_no_output,
    "python_branch_on_a_tensor_in_call": _python_branch_on_a_tensor_in_call,
    "python_branch_in_a_model_built_eagerly": _python_branch_in_a_model_built_eagerly,
    "a_loss_raising_the_users_own_exception": _a_loss_raising_the_users_own_exception,
}
# Plain Keras fails on these on every backend (the others depend on whether
# the backend traces the step).
FAILS_EVERYWHERE = ("loss_key_naming_no_output", "a_loss_raising_the_users_own_exception")


def _raised(build, plain, options=None):
    model, y = build(plain, options or {})
    try:
        model.fit(X, y, batch_size=2, epochs=1, verbose=0)
    except Exception as error:  # the type is what is compared
        return type(error)
    return None


@pytest.mark.parametrize("accumulation_steps", [1, 2])
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_an_error_keeps_the_type_plain_keras_gives_it_at_every_k(case, accumulation_steps):
    build = ERROR_CASES[case]
    expected = _raised(build, plain=True)
    if case in FAILS_EVERYWHERE:
        assert expected is not None
    raised = _raised(build, plain=False, options={"accumulation_steps": accumulation_steps})
    assert raised is expected, f"plain Keras raises {expected}, k={accumulation_steps} {raised}"


# -- a misspelt option ------------------------------------------------------------


class Subclassed(accum_keras.AccumulatingModel, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)


class FunctionalSubclass(accum_keras.AccumulatingModel, keras.Model):
    """Built with inputs and outputs: Keras makes it a functional model."""


def _graph():
    inputs = keras.Input((3,))
    return inputs, keras.layers.Dense(1)(inputs)


CONSTRUCTORS = {
    "functional": lambda **kw: accum_keras.Model(*_graph(), **kw),
    "sequential": lambda **kw: accum_keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(1)], **kw
    ),
    "subclassed": lambda **kw: Subclassed(**kw),
    "functional_subclass": lambda **kw: FunctionalSubclass(*_graph(), **kw),
    "accumulate": lambda **kw: accum_keras.accumulate(keras.Model(*_graph()), 2, **kw),
}


@pytest.mark.parametrize("kind", sorted(CONSTRUCTORS))
@pytest.mark.parametrize(
    ("typo", "meant"),
    [("accumulation_step", "accumulation_steps"), ("acumulator_dtype", "accumulator_dtype")],
)
def test_a_misspelt_option_is_refused_naming_the_option_meant(kind, typo, meant):
    with pytest.raises(
        TypeError, match=rf"unexpected keyword argument `{typo}`\. Did you mean `{meant}`\?"
    ):
        CONSTRUCTORS[kind](**{typo: 8})


def test_a_keyword_argument_close_to_no_option_is_refused_listing_the_options():
    with pytest.raises(TypeError, match=r"`colour`\. The model options are `accumulation_steps`"):
        accum_keras.Model(*_graph(), colour="blue")


def test_keras_own_keyword_arguments_still_reach_the_functional_constructor():
    model = accum_keras.Model(*_graph(), name="named", trainable=False, accumulation_steps=3)
    assert (model.name, model.trainable, model.accumulation_steps) == ("named", False, 3)
    subclassed = Subclassed(name="net", dtype="float64")
    assert (subclassed.name, subclassed.dtype_policy.name) == ("net", "float64")


def test_a_saved_functional_model_loads_with_its_options_and_name(tmp_path):
    model = accum_keras.Model(*_graph(), name="saved", trainable=False, accumulation_steps=3)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is accum_keras.Model
    assert (loaded.name, loaded.trainable, loaded.accumulation_steps) == ("saved", False, 3)


# -- the mixin's place in the bases ---------------------------------------------------


@pytest.mark.parametrize(
    ("keras_class", "written"),
    [(keras.Model, "keras.Model"), (keras.Sequential, "keras.Sequential")],
)
def test_the_mixin_after_a_keras_model_is_refused_saying_what_to_write(keras_class, written):
    expected = f"class Net(accum_keras.AccumulatingModel, {written}):"
    with pytest.raises(TypeError, match=r"must come first") as caught:
        type("Net", (keras_class, accum_keras.AccumulatingModel), {})
    assert expected in str(caught.value)


def test_the_mixin_after_a_users_own_keras_base_is_refused_too():
    class UserBase(keras.Model):
        pass

    with pytest.raises(TypeError, match=r"class Net\(accum_keras.AccumulatingModel, UserBase\):"):

        class Net(UserBase, accum_keras.AccumulatingModel):
            pass
