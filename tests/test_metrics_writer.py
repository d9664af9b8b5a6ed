"""metrics.jsonl: records in order, by kind; a torn line is skipped."""

import json

import pytest

from transformer import metrics_writer


def test_read_metrics_by_kind_skips_a_torn_line(tmp_path):
  records = [{"step": 2, "kind": "train", "loss": 7.5}, {"step": 2, "kind": "eval", "nll": 6.0},
             {"step": 4, "kind": "train", "loss": 6.5}]
  text = "".join(json.dumps(r) + "\n" for r in records)
  (tmp_path / "metrics.jsonl").write_text(text + "\n" + '{"step": 6, "kind": "tr')
  assert metrics_writer.read_metrics(str(tmp_path)) == records
  assert metrics_writer.read_metrics(str(tmp_path), "train") == [records[0], records[2]]
  assert metrics_writer.read_metrics(str(tmp_path), "test_latest") == []


def test_writer_appends_records_the_reader_returns(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(3, "train", {"loss": 2, "note": "x"})
  writer.close()
  (record,) = metrics_writer.read_metrics(str(tmp_path))
  assert {k: record[k] for k in ("step", "kind", "loss", "note")} == {
      "step": 3, "kind": "train", "loss": 2.0, "note": "x"}


def test_read_metrics_of_a_run_without_the_file(tmp_path):
  assert metrics_writer.read_metrics(str(tmp_path), "eval", missing_ok=True) == []
  with pytest.raises(FileNotFoundError):
    metrics_writer.read_metrics(str(tmp_path))
