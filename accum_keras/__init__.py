"""accum_keras: train Keras 3 models with the batch size you want on the memory you have.

Public API:
- `AccumulatingModel`: mixin for `keras.Model` subclasses.
- `Model`, `Sequential`: functional and sequential models that accumulate.
- `accumulate`: an accumulating twin (shared weights) of a functional or
  Sequential model you already have.
- `clone_model`: `keras.models.clone_model` that keeps an accumulating model
  accumulating (same class, same model options).
- `AccumulationCallback`: learning rate for the effective batch, a schedule for
  the number of accumulation steps, and logs of the effective batch size.
- `ScaledLearningRate`: a learning-rate schedule multiplied for the effective
  batch, with warmup (standalone; the callback scales the rate itself).
- `layers.AccumBatchNormalization`, `layers.convert_batch_normalization`:
  BatchNormalization whose moving statistics follow windows, not micro-batches.
- `SparseUpdateWarning`: the category of the warning that Keras' TensorFlow
  sparse update of an optimizer differs from its update of a window's sum
  (filter it to silence it).
"""

from accum_keras import layers
from accum_keras._accumulate import accumulate, clone_model
from accum_keras._callback import AccumulationCallback
from accum_keras._model import AccumulatingModel, Model, Sequential
from accum_keras._schedules import ScaledLearningRate
from accum_keras._sparse import SparseUpdateWarning

__version__ = "0.3.0"

__all__ = [
    "AccumulatingModel",
    "AccumulationCallback",
    "Model",
    "ScaledLearningRate",
    "Sequential",
    "SparseUpdateWarning",
    "__version__",
    "accumulate",
    "clone_model",
    "layers",
]
