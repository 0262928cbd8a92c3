"""Input pipelines (tfds array_record + grain, no TensorFlow) and the embedded
`crate_shapes` and `crate_scenes` datasets. See docs/data.md."""

from crate_jax.data.pipeline import DatasetNotPreparedError
from crate_jax.data.pipeline import default_input_config
from crate_jax.data.pipeline import make_eval_iterator
from crate_jax.data.pipeline import make_train_iterator
from crate_jax.data.pipeline import num_examples
from crate_jax.data.pipeline import prepare_dataset

__all__ = [
  "DatasetNotPreparedError",
  "default_input_config",
  "make_eval_iterator",
  "make_train_iterator",
  "num_examples",
  "prepare_dataset",
]
