"""KerasHub tasks trained through the mixin: exact, saved, reloaded, resumed.

Tiny models built from constructor arguments (no preset downloads). The plain
KerasHub task on the big batch is the reference.
"""

import keras
import numpy as np
import pytest
from helpers import assert_same_training

import accum_keras

keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is not installed (pip install -e '.[test]' installs it)"
)

K = 4
MICRO = 4
SEQUENCE = 16
VOCABULARY = 100


@keras.saving.register_keras_serializable(package="accum_keras_tests")
class AccumGPT2CausalLM(accum_keras.AccumulatingModel, keras_hub.models.GPT2CausalLM):
    pass


@keras.saving.register_keras_serializable(package="accum_keras_tests")
class AccumBertTextClassifier(accum_keras.AccumulatingModel, keras_hub.models.BertTextClassifier):
    pass


def gpt2(cls, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=SEQUENCE,
        dropout=0.0,
    )
    model = cls(backbone=backbone, preprocessor=None, **kwargs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    return model


def bert(cls, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=SEQUENCE,
        dropout=0.0,
    )
    model = cls(backbone=backbone, num_classes=3, preprocessor=None, dropout=0.0, **kwargs)
    # SGD: Keras' TensorFlow Adam treats the embeddings' sparse gradients
    # differently on the big batch (see the guarantees table).
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def padded_text(samples, seed=0):
    """Token ids with padding of varying length: the loss is masked per token."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCABULARY, size=(samples, SEQUENCE)).astype("int32")
    lengths = rng.integers(4, SEQUENCE + 1, size=samples)
    mask = np.arange(SEQUENCE)[None, :] < lengths[:, None]
    ids = np.where(mask, ids, 0)
    return ids, mask


def causal_lm_data(samples=32, seed=0):
    ids, mask = padded_text(samples, seed)
    x = {"token_ids": ids, "padding_mask": mask}
    y = np.roll(ids, -1, axis=1)
    sample_weight = (mask & np.roll(mask, -1, axis=1)).astype("float32")
    return x, y, sample_weight


def classifier_data(samples=32, seed=0):
    ids, mask = padded_text(samples, seed)
    x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}
    y = np.random.default_rng(seed + 1).integers(0, 3, size=samples)
    return x, y


def test_bert_text_classifier_is_exact_and_reloads(tmp_path):
    x, y = classifier_data(samples=40)  # the last window of each epoch is short
    accumulating = bert(AccumBertTextClassifier, accumulation_steps=K)
    plain = bert(keras_hub.models.BertTextClassifier)
    plain.set_weights(accumulating.get_weights())
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)

    path = str(tmp_path / "bert.keras")
    accumulating.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is AccumBertTextClassifier and loaded.accumulation_steps == K
    assert_same_training(loaded, plain)

    preset = str(tmp_path / "preset")
    accumulating.save_to_preset(preset)
    from_preset = AccumBertTextClassifier.from_preset(preset, accumulation_steps=3)
    assert type(from_preset) is AccumBertTextClassifier and from_preset.accumulation_steps == 3
    _assert_same_weights(from_preset, accumulating)


def test_a_misspelt_option_on_a_keras_hub_task_is_refused_naming_the_option_meant():
    # The task's own arguments (backbone, num_classes, preprocessor, dropout)
    # and Keras' (name) pass; its loading from a config and a preset is
    # `test_bert_text_classifier_is_exact_and_reloads`.
    with pytest.raises(TypeError, match=r"`accumulation_step`\. Did you mean `accumulation_steps`"):
        bert(AccumBertTextClassifier, accumulation_step=K, name="classifier")
    assert (
        bert(AccumBertTextClassifier, accumulation_steps=K, name="classifier").name == "classifier"
    )


def _assert_same_weights(model, reference):
    for actual, expected in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)


def _micro_batches(x, y, sample_weight, start, stop):
    for index in range(start, stop):
        window = slice(index * MICRO, (index + 1) * MICRO)
        yield {key: value[window] for key, value in x.items()}, y[window], sample_weight[window]


def test_gpt2_reloads_mid_window_continues_exactly_and_round_trips_presets(tmp_path):
    x, y, sample_weight = causal_lm_data(samples=2 * K * MICRO)
    accumulating = gpt2(AccumGPT2CausalLM, accumulation_steps=K)
    plain = gpt2(keras_hub.models.GPT2CausalLM)
    plain.set_weights(accumulating.get_weights())

    # One full window, then half of the next one: save with a pending window.
    for batch in _micro_batches(x, y, sample_weight, 0, K + K // 2):
        accumulating.train_on_batch(*batch)
    assert accumulating.pending_micro_steps == K // 2
    path = str(tmp_path / "gpt2.keras")
    accumulating.save(path)
    del accumulating

    resumed = keras.models.load_model(path)
    assert type(resumed) is AccumGPT2CausalLM
    assert resumed.accumulation_steps == K
    assert resumed.pending_micro_steps == K // 2
    for batch in _micro_batches(x, y, sample_weight, K + K // 2, 2 * K):
        resumed.train_on_batch(*batch)

    big = K * MICRO
    for start in range(0, len(y), big):
        window = slice(start, start + big)
        plain.train_on_batch(
            {key: value[window] for key, value in x.items()}, y[window], sample_weight[window]
        )
    assert_same_training(resumed, plain)

    # A preset keeps the weights; `from_preset` takes the number of steps.
    preset = str(tmp_path / "preset")
    resumed.save_to_preset(preset)
    loaded = AccumGPT2CausalLM.from_preset(preset, accumulation_steps=2 * K)
    assert type(loaded) is AccumGPT2CausalLM
    assert loaded.accumulation_steps == 2 * K
    _assert_same_weights(loaded, resumed)
    _assert_same_weights(keras_hub.models.GPT2CausalLM.from_preset(preset), resumed)
