"""Layers that know about accumulation windows.

- `AccumBatchNormalization`: BatchNormalization whose moving statistics are
  updated once per window with the statistics of the whole window.
- `convert_batch_normalization`: swaps a model's BatchNormalization layers for
  it, keeping their weights.
"""

from accum_keras._batch_norm import AccumBatchNormalization, convert_batch_normalization

__all__ = ["AccumBatchNormalization", "convert_batch_normalization"]
