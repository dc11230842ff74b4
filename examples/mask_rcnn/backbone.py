"""A small convolutional backbone and a feature pyramid network (FPN).

Normalization is GroupNormalization throughout: it normalizes each image on
its own, whereas BatchNormalization would mix statistics of all images in a
(micro-)batch, so a micro-batch of 2 would not compute the same function as a
batch of 16 and gradient accumulation could not reproduce big-batch training.
"""

import keras
from keras import layers


class ConvGNReLU(layers.Layer):
    def __init__(self, filters, strides=1, groups=8, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(filters, 3, strides, padding="same", use_bias=False)
        self.norm = layers.GroupNormalization(groups=min(groups, filters))

    def call(self, x):
        return keras.activations.relu(self.norm(self.conv(x)))


class Backbone(layers.Layer):
    """Stem (stride 2) and three stages returning C2, C3, C4 (strides 4, 8, 16)."""

    def __init__(self, widths, groups, **kwargs):
        super().__init__(**kwargs)
        self.stem = ConvGNReLU(widths[0], 2, groups, name="stem")
        self.stages = [
            [
                ConvGNReLU(w, 2, groups, name=f"c{i + 2}_down"),
                ConvGNReLU(w, 1, groups, name=f"c{i + 2}_conv"),
            ]
            for i, w in enumerate(widths[1:])
        ]

    def call(self, images):
        x = self.stem(images)
        features = []
        for down, conv in self.stages:
            x = down(x)
            x = x + conv(x)  # residual connection eases training from scratch
            features.append(x)
        return features


class FPN(layers.Layer):
    """Top-down pathway with lateral 1x1 connections: C2..C4 -> P2..P4."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.lateral = [layers.Conv2D(channels, 1, name=f"lateral{i}") for i in (2, 3, 4)]
        self.output_convs = [
            layers.Conv2D(channels, 3, padding="same", name=f"p{i}") for i in (2, 3, 4)
        ]
        self.upsample = layers.UpSampling2D(2)

    def call(self, features):
        laterals = [conv(c) for conv, c in zip(self.lateral, features)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + self.upsample(merged[0]))
        return [conv(p) for conv, p in zip(self.output_convs, merged)]
