"""Every public option, and every Keras training feature we claim, is drawn or linked to its test.

The randomized test (`tests/test_window_state_machine.py`) checks options in
combination only if its configuration draws them. The lists below name every
keyword argument of the public API, read from the code itself (the model
options' declaration `accum_keras._options.MODEL_OPTIONS`, and the signatures
of `accumulate()`, `AccumulationCallback` and `AccumBatchNormalization`), and
the axis of the drawn configuration that varies it. A keyword argument that
exists in the code but in no list fails here, so a new option cannot arrive
untested: give it an axis in `configurations()` and a line below.

The Keras features of the compatibility matrix (docs/compatibility.md) are
listed here too; each row of the matrix links a test per backend, and every
linked test must exist.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
from collections.abc import Callable

import keras
import pytest
from hypothesis import HealthCheck, given, settings
from test_window_state_machine import BACKEND, Configuration, configurations

import accum_keras
from accum_keras._options import OPTION_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX = os.path.join(ROOT, "docs", "compatibility.md")

Axis = Callable[[Configuration], object]


def _scaling(field: str) -> Axis:
    # No callback at all is one more value of every callback argument.
    return lambda config: (
        "no callback" if config.scaling is None else getattr(config.scaling, field)
    )


def _batch_norm(name: str) -> Axis:
    return lambda config: None if config.batch_norm is None else config.batch_norm.get(name)


# The model options (constructors, get_config, clones and `accumulate()` read
# `MODEL_OPTIONS`): each one's axis.
MODEL_OPTION_AXES: dict[str, Axis] = {
    "accumulation_steps": lambda config: config.accumulation_steps,
    "skip_nonfinite_updates": lambda config: config.skip_nonfinite,
    "accumulator_dtype": lambda config: config.accumulator_dtype,
    # The mode axis: None is the streaming mode, an int the in-step mode.
    "micro_batch_size": lambda config: config.micro_batch_size,
}

# `accumulate(model, accumulation_steps, **options)`: the twin kind calls it
# with every model option (`Configuration.options`).
ACCUMULATE_AXES: dict[str, Axis] = {
    "model": lambda config: config.kind == "twin",
    "accumulation_steps": lambda config: config.accumulation_steps,
}

CALLBACK_AXES: dict[str, Axis] = {
    "lr_scaling": _scaling("rule"),
    "base_batch_size": _scaling("base_batch_size"),
    "warmup_updates": _scaling("warmup_updates"),
    "warmup_epochs": _scaling("warmup_epochs"),
    "accumulation_schedule": lambda config: (
        "no callback" if config.scaling is None else repr(config.scaling.schedule)
    ),
    "verbose": _scaling("verbose"),
}

BATCH_NORM_AXES: dict[str, Axis] = {
    name: _batch_norm(name)
    for name in (
        "axis",
        "momentum",
        "epsilon",
        "center",
        "scale",
        "beta_initializer",
        "gamma_initializer",
        "moving_mean_initializer",
        "moving_variance_initializer",
        "beta_regularizer",
        "gamma_regularizer",
        "beta_constraint",
        "gamma_constraint",
        "synchronized",
    )
}
# Arguments no axis draws, each with the reason and the test that covers it.
BATCH_NORM_NOT_DRAWN: dict[str, tuple[str, str]] = {
    "renorm": (
        "refused with a ValueError (its corrections depend on each batch's statistics)",
        "tests/test_batch_norm.py::test_renorm_is_rejected",
    ),
    "renorm_clipping": (
        "acts only with renorm=True",
        "tests/test_batch_norm.py::test_renorm_is_rejected",
    ),
    "renorm_momentum": (
        "acts only with renorm=True",
        "tests/test_batch_norm.py::test_renorm_is_rejected",
    ),
}
# Arguments drawn with one value on some backends, and why.
SINGLE_VALUED: dict[str, str] = (
    {}
    if BACKEND == "tensorflow"
    else {"synchronized": "Keras refuses synchronized=True off TensorFlow"}
)

# The Keras training features the randomized test draws: feature -> whether a
# configuration has it. Every one is a row of the compatibility matrix.
DRAWN_FEATURES: dict[str, Callable[[Configuration], bool]] = {
    "dtype policy `mixed_bfloat16`": lambda config: config.policy == "mixed_bfloat16",
    "dtype policy `bfloat16`": lambda config: config.policy == "bfloat16",
    "`LossScaleOptimizer`": lambda config: config.loss_scaling == "loss_scale_optimizer",
    "`loss_scale_factor` / a user step that scales its loss": lambda config: (
        config.loss_scaling == "factor"
    ),
    "sparse embedding gradients": lambda config: config.embedding,
    "`AccumBatchNormalization`": lambda config: (
        config.batch_norm is not None and config.batch_norm.kind == "accum"
    ),
    "save/load mid-window": lambda config: True,  # an event of every example
    "user-written `train_step`": lambda config: config.kind in ("super_step", "own_gradients_step"),
    "in-step mode (`micro_batch_size`)": lambda config: config.micro_batch_size is not None,
    'float8 training (`quantize("float8")`)': lambda config: config.float8,
}
# The other rows of the matrix: tested apart (costly set-ups: other processes,
# devices, downloads of architectures) or not supported.
OTHER_FEATURES = [
    "dtype policy `mixed_float16`",  # left out of the draw for now (see POLICIES there)
    "int8 quantization + LoRA",
    "`MirroredStrategy`",
    "`MultiWorkerMirroredStrategy`",
    "JAX `DataParallel`",
    "JAX `ModelParallel` (`LayoutMap`)",
    "JAX multi-process",
    "XLA (`jit_compile=True`)",
    "`steps_per_execution`",
    "KerasHub tasks",
    "`keras.applications`",
    "`BackupAndRestore`",
]
FEATURES = list(DRAWN_FEATURES) + OTHER_FEATURES


def _keyword_arguments(function) -> set[str]:
    return {
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self"
        and parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }


def _batch_norm_arguments() -> set[str]:
    # AccumBatchNormalization takes **kwargs and hands them to BatchNormalization.
    own = _keyword_arguments(accum_keras.layers.AccumBatchNormalization.__init__)
    return own | _keyword_arguments(keras.layers.BatchNormalization.__init__)


PUBLIC_ARGUMENTS = {
    "model options": (set(OPTION_NAMES), MODEL_OPTION_AXES),
    "accumulate()": (
        _keyword_arguments(accum_keras.accumulate) | set(OPTION_NAMES),
        {**ACCUMULATE_AXES, **MODEL_OPTION_AXES},
    ),
    "AccumulationCallback": (
        _keyword_arguments(accum_keras.AccumulationCallback.__init__),
        CALLBACK_AXES,
    ),
    "AccumBatchNormalization": (
        _batch_norm_arguments() - set(BATCH_NORM_NOT_DRAWN),
        BATCH_NORM_AXES,
    ),
}


@pytest.mark.parametrize("where", list(PUBLIC_ARGUMENTS))
def test_every_public_keyword_argument_has_an_axis(where):
    arguments, axes = PUBLIC_ARGUMENTS[where]
    missing = sorted(arguments - set(axes))
    assert not missing, (
        f"{where} takes {missing}, which the randomized test does not draw: add an axis "
        "to configurations() in tests/test_window_state_machine.py and list it here"
    )
    stale = sorted(set(axes) - arguments)
    assert not stale, f"{where} no longer takes {stale}: remove their axes"


@pytest.fixture(scope="module")
def drawn() -> list[Configuration]:
    """Configurations as the randomized test draws them (no model is built)."""
    found: list[Configuration] = []

    @settings(
        max_examples=300,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(configurations())
    def collect(config):
        found.append(config)

    collect()
    return found


def test_the_configuration_passes_every_model_option(drawn):
    for config in drawn[:20]:
        assert set(config.options(config.accumulation_steps)) == set(OPTION_NAMES)


@pytest.mark.parametrize("where", list(PUBLIC_ARGUMENTS))
def test_every_axis_takes_more_than_one_value(drawn, where):
    _, axes = PUBLIC_ARGUMENTS[where]
    for name, axis in axes.items():
        values = {repr(axis(config)) for config in drawn}
        if name in SINGLE_VALUED:
            continue
        assert len(values) > 1, f"{where} `{name}` is drawn with one value only: {values}"


@pytest.mark.parametrize("feature", list(DRAWN_FEATURES))
def test_every_drawn_keras_feature_is_drawn(drawn, feature):
    assert any(DRAWN_FEATURES[feature](config) for config in drawn), feature


# -- the compatibility matrix ----------------------------------------------------

_LINK = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]]*\])?`")


def _matrix_rows() -> dict[str, list[str]]:
    """The feature x backend table of docs/compatibility.md: feature -> its cells."""
    with open(MATRIX) as file:
        text = file.read()
    section = text.split("## Feature × backend matrix", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 4 or set(cells[0]) <= {"-", " "} or cells[0] == "feature":
            continue
        rows[cells[0]] = cells[1:]
    return rows


def _test_names(path: str) -> set[str]:
    with open(os.path.join(ROOT, path)) as file:
        tree = ast.parse(file.read())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_the_matrix_has_a_row_for_every_listed_feature():
    rows = _matrix_rows()
    assert sorted(rows) == sorted(FEATURES)


def test_every_cell_of_the_matrix_links_a_test_or_says_why_not():
    for feature, cells in _matrix_rows().items():
        for cell in cells:
            assert _LINK.search(cell) or cell.startswith(("not supported", "not tested", "n/a")), (
                f"{feature}: the cell {cell!r} links no test and gives no reason"
            )


def test_every_test_the_matrix_links_exists():
    with open(MATRIX) as file:
        text = file.read()
    links = _LINK.findall(text)
    assert links
    for path, name in links:
        assert os.path.exists(os.path.join(ROOT, path)), path
        assert name in _test_names(path), f"{path}::{name} does not exist"


def test_every_test_the_not_drawn_list_links_exists():
    for _, link in BATCH_NORM_NOT_DRAWN.values():
        path, name = link.split("::")
        assert name in _test_names(path), link
