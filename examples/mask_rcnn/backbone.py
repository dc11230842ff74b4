"""Backbones (a small GroupNorm net, ResNet-50) and a feature pyramid network (FPN).

Normalization never uses batch statistics. The small backbone uses
GroupNormalization, which normalizes each image on its own; the ResNet-50
keeps its BatchNormalization layers *frozen* (the fixed moving statistics and
affine parameters, as Detectron does at 2 images per GPU). BatchNormalization
in training mode would mix the statistics of all images in a (micro-)batch, so
a micro-batch of 2 would not compute the same function as a batch of 16 and
gradient accumulation could not reproduce big-batch training.

Both backbones take uint8 images and do their own input scaling.
"""

import keras
import tensorflow as tf
from keras import layers

# Keras' ResNet50 ImageNet weights expect "caffe" inputs: BGR, mean subtracted.
_IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


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
        x = self.stem(tf.cast(images, self.compute_dtype) / 127.5 - 1.0)
        features = []
        for down, conv in self.stages:
            x = down(x)
            x = x + conv(x)  # residual connection eases training from scratch
            features.append(x)
        return features


class ResNet50Backbone(layers.Layer):
    """``keras.applications.ResNet50`` returning C2..C5 (strides 4, 8, 16, 32).

    Every BatchNormalization layer is frozen: it always normalizes with its
    stored moving statistics (the network is called with ``training=False``)
    and its scale and offset are not trained, also after the backbone is
    unfrozen with ``backbone.trainable = True``. Then an image's features do
    not depend on the other images of its batch, as gradient accumulation
    needs, and a micro-batch of 2 does not suffer from noisy batch statistics.

    Args:
        image_size: side of the square input images.
        weights: ``None`` for random initialization, or the path of a Keras
            ResNet50 weights file without the top (e.g. ImageNet weights
            ``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``).
    """

    OUTPUTS = ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")

    def __init__(self, image_size, weights=None, **kwargs):
        super().__init__(**kwargs)
        resnet = keras.applications.ResNet50(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
        )
        self.network = keras.Model(
            resnet.input, [resnet.get_layer(name).output for name in self.OUTPUTS], name="resnet50"
        )
        self._freeze_batch_norm()

    def _freeze_batch_norm(self):
        for layer in self.network.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False

    @property
    def trainable(self):
        return layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        # Layer.trainable propagates to every sublayer; keep BatchNorm frozen.
        layers.Layer.trainable.fset(self, value)
        self._freeze_batch_norm()

    def call(self, images):
        x = tf.cast(images, self.compute_dtype)[..., ::-1] - tf.constant(_IMAGENET_BGR_MEAN)
        return self.network(x, training=False)


class FPN(layers.Layer):
    """Top-down pathway with lateral 1x1 connections: C2..Cn -> P2..Pn."""

    def __init__(self, channels, num_levels=3, **kwargs):
        super().__init__(**kwargs)
        levels = range(2, 2 + num_levels)
        self.lateral = [layers.Conv2D(channels, 1, name=f"lateral{i}") for i in levels]
        self.output_convs = [
            layers.Conv2D(channels, 3, padding="same", name=f"p{i}") for i in levels
        ]
        self.upsample = layers.UpSampling2D(2)

    def call(self, features):
        laterals = [conv(c) for conv, c in zip(self.lateral, features)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + self.upsample(merged[0]))
        return [conv(p) for conv, p in zip(self.output_convs, merged)]
