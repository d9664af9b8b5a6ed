"""Where metrics go: stdout progress lines, `metrics.jsonl`, TensorBoard event files.

Only process 0 writes; TensorBoard events are written with tensorboardX (no TensorFlow).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional


class MetricsWriter:
  """Appends one JSON object per record to <workdir>/metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, "time": time.time()}
    record.update({k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "dtype") else v)
                   for k, v in metrics.items()})
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k not in ("step", "kind", "time") and isinstance(v, float):
        self._tb.add_scalar(f"{kind}/{k}", v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, kind: Optional[str] = None,
                 missing_ok: bool = False) -> list[dict[str, Any]]:
  """The records of <workdir>/metrics.jsonl (optionally of one kind), in order.

  A line that is not a whole record (the torn last line of a run being written, or of one
  killed mid-write) is skipped. missing_ok: no records, instead of FileNotFoundError, for a
  run that has not written the file yet.
  """
  records = []
  if missing_ok and not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return records
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and "kind" in record and (kind is None or record["kind"] == kind):
        records.append(record)
  return records
