"""Tests for transformer/data/records.py: raw records parsed as tf.Example, against TFDS's decoder."""

from __future__ import annotations

import sys

import numpy as np
import tensorflow_datasets as tfds

from transformer.config import DataConfig
from transformer.data import datasets, records


def _builder(tmp_path, lines_en, lines_de):
  raw = tmp_path / "raw"
  raw.mkdir()
  for lang, lines in (("en", lines_en), ("de", lines_de)):
    (raw / f"train.{lang}").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
  cfg = DataConfig(dataset="parallel_text", source_lang="en", target_lang="de",
                   parallel_text_splits=f"train={raw}/train")
  builder = datasets.make_builder(cfg, str(tmp_path / "tfds"))
  datasets.prepare(builder)
  return builder


def test_raw_parse_equals_tfds_decoding(tmp_path):
  en = [f"sentence {i} with ümlauts and 中文 {'x' * (i % 7)}" for i in range(300)] + [""]
  de = [f"Satz {i}" for i in range(301)]
  builder = _builder(tmp_path, en, de)
  for split in ("train", "train[5:40]", "train[-3:]"):
    fast = records.open_split(builder, split)
    assert isinstance(fast, records.TextRecords)  # flat text + int features: the raw path
    slow = builder.as_data_source(split=split)  # TFDS's own decoding: the oracle
    assert len(fast) == len(slow)
    keys = list(range(len(slow)))
    expected = slow.__getitems__(keys)
    got = fast.__getitems__(keys)
    for g, e in zip(got, expected):
      assert set(g) == set(e) == {"en", "de", "id"}
      assert g["en"] == e["en"] and g["de"] == e["de"] and isinstance(g["en"], bytes)
      assert g["id"] == int(e["id"])
    assert fast[len(fast) - 1] == got[-1]
  # Independent of TFDS: the record with id 300 holds the empty English line, 17 its text.
  by_id = {r["id"]: r for r in records.open_split(builder, "train").__getitems__(range(301))}
  assert by_id[300]["en"] == b"" and by_id[17]["en"].decode() == en[17]
  assert "tensorflow" not in sys.modules


def test_other_feature_layouts_keep_tfds_decoding():
  seq = tfds.features.FeaturesDict({"words": tfds.features.Sequence(tfds.features.Text())})
  encoded = tfds.features.FeaturesDict({"en": tfds.features.Text(
      encoder=tfds.deprecated.text.ByteTextEncoder())})
  floats = tfds.features.FeaturesDict({"x": tfds.features.Scalar(dtype=np.float32)})
  for features in (seq, encoded, floats, tfds.features.Text()):
    assert records._flat_kinds(features) is None  # pylint: disable=protected-access
  flat = tfds.features.Translation(languages=["en", "fr"])
  assert records._flat_kinds(flat) == {"en": "text", "fr": "text"}  # pylint: disable=protected-access
