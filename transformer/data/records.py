"""Reading text records of a prepared TFDS split fast: raw ArrayRecord bytes, parsed as tf.Example.

TFDS decodes a record without TensorFlow through its generic numpy path
(`features.deserialize_example_np`), a few thousand records per second on one CPU core. The
records of a translation dataset are flat: one string per language and at most an integer id.
For those, `open_split` reads the raw serialized records from TFDS's own data source
(`DeserializeMethod.RAW_BYTES`) and parses them with TFDS's `tf_example_pb2` (protobuf's C
parser), returning the same values (`bytes` for text, `int` for integers). Any other feature
layout gets TFDS's decoding unchanged.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2


def _flat_kinds(features) -> dict[str, str] | None:
  """{name: 'text' | 'int'} if every feature is a scalar Text (no encoder) or integer Scalar."""
  if not isinstance(features, tfds.features.FeaturesDict):
    return None
  kinds = {}
  for name, feature in features.items():
    if type(feature) is tfds.features.Text and feature.encoder is None:  # pylint: disable=unidiomatic-typecheck
      kinds[name] = "text"
    elif (type(feature) is tfds.features.Scalar  # pylint: disable=unidiomatic-typecheck
          and np.issubdtype(feature.np_dtype, np.integer)):
      kinds[name] = "int"
    else:
      return None
  return kinds


class TextRecords(Sequence):
  """Random access to `{name: bytes | int}` records of a split with flat text/integer features."""

  def __init__(self, raw_source, kinds: dict[str, str]):
    self._raw = raw_source  # TFDS data source returning serialized tf.Example bytes
    self._kinds = kinds

  def __len__(self) -> int:
    return len(self._raw)

  def _parse(self, serialized: bytes) -> dict[str, Any]:
    feature = tf_example_pb2.Example.FromString(serialized).features.feature
    out = {}
    for name, kind in self._kinds.items():
      values = (feature[name].bytes_list.value if kind == "text"
                else feature[name].int64_list.value)
      if len(values) != 1:
        raise ValueError(f"record feature {name!r}: expected one {kind} value, got {len(values)}")
      out[name] = values[0]
    return out

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._parse(self._raw[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._parse(r) for r in self._raw.__getitems__(list(indices))]


def open_split(builder: tfds.core.DatasetBuilder, split: str):
  """A random-access data source of a prepared `split` ('train', 'test[:100]', ...)."""
  kinds = _flat_kinds(builder.info.features)
  if kinds is None:
    return builder.as_data_source(split=split)
  raw = builder.as_data_source(split=split,
                               deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return TextRecords(raw, kinds)
