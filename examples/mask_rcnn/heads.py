"""Box/class head and mask head of the second stage."""

import keras
import tensorflow as tf
from keras import layers


class BoxHead(layers.Layer):
    """Two fully connected layers, then class logits and per-class box deltas."""

    def __init__(self, hidden, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.flatten = layers.Flatten()
        self.fc1 = layers.Dense(hidden, activation="relu")
        self.fc2 = layers.Dense(hidden, activation="relu")
        self.class_logits = layers.Dense(
            num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01)
        )
        self.box_deltas = layers.Dense(
            4 * num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001)
        )

    def call(self, pooled):
        """``pooled [B, K, s, s, C]`` -> logits ``[B, K, C+1]``, deltas ``[B, K, C, 4]``."""
        batch, k = tf.shape(pooled)[0], tf.shape(pooled)[1]
        x = tf.reshape(pooled, [-1, *pooled.shape[2:]])
        x = self.fc2(self.fc1(self.flatten(x)))
        logits = tf.reshape(self.class_logits(x), [batch, k, self.num_classes + 1])
        deltas = tf.reshape(self.box_deltas(x), [batch, k, self.num_classes, 4])
        return logits, deltas


class MaskHead(layers.Layer):
    """Small FCN: convs, 2x transposed conv, one mask logit map per class."""

    def __init__(self, channels, num_convs, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.convs = [
            layers.Conv2D(channels, 3, padding="same", activation="relu") for _ in range(num_convs)
        ]
        self.upsample = layers.Conv2DTranspose(channels, 2, strides=2, activation="relu")
        self.logits = layers.Conv2D(num_classes, 1)

    def call(self, pooled):
        """``pooled [B, K, s, s, C]`` -> mask logits ``[B, K, 2s, 2s, classes]``."""
        batch, k = tf.shape(pooled)[0], tf.shape(pooled)[1]
        x = tf.reshape(pooled, [-1, *pooled.shape[2:]])
        for conv in self.convs:
            x = conv(x)
        x = self.logits(self.upsample(x))
        return tf.reshape(x, [batch, k, *x.shape[1:]])
