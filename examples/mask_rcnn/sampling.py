"""Per-image seeded random sampling.

Mask R-CNN samples a random subset of anchors (for the RPN loss) and of
proposals (for the second stage loss) in every image. If that randomness came
from one generator shared by the batch, an image's sample would depend on
which other images are in its batch, and a micro-batch of 2 could never
reproduce a batch of 16. Here every image draws from a stateless generator
seeded by its own integer id (carried in the data) and the optimizer step, so
its sample is the same whatever batch it is in.
"""

import tensorflow as tf

# Distinct streams for the different sampling decisions of one image.
RPN_SALT, ROI_SALT, NUM_SALTS = 0, 1, 2


def image_seeds(image_ids, step, salt):
    """``[B, 2]`` seeds: (image id, step-and-purpose) for each image."""
    image_ids = tf.cast(image_ids, tf.int32)
    stream = tf.cast(step, tf.int32) * NUM_SALTS + salt
    return tf.stack([image_ids, tf.fill(tf.shape(image_ids), stream)], axis=1)


def per_image_uniform(seeds, shape):
    """Uniform ``[0, 1)`` noise of ``[B, *shape]``, image ``b`` from ``seeds[b]``."""
    return tf.map_fn(
        lambda seed: tf.random.stateless_uniform(shape, seed=seed),
        seeds,
        fn_output_signature=tf.float32,
    )


def random_subset(candidates, max_count, noise, count=None):
    """Mask choosing at most ``max_count`` random candidates in each image.

    Args:
      candidates: bool ``[B, N]``.
      max_count: static upper bound on the number chosen per image.
      noise: ``[B, N]`` uniform noise from :func:`per_image_uniform`.
      count: optional int ``[B]``, a smaller per-image number to choose.
    """
    scores = tf.where(candidates, noise, -1.0)
    top = tf.math.top_k(scores, k=max_count)
    keep = top.values >= 0.0
    if count is not None:
        keep &= tf.range(max_count)[None, :] < count[:, None]
    chosen = tf.one_hot(top.indices, tf.shape(scores)[1]) * tf.cast(keep, tf.float32)[..., None]
    return tf.reduce_max(chosen, axis=1) > 0.0
