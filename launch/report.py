r"""Final metrics of a sweep's runs as one table (markdown + CSV).

  python -m launch.report DIR [--out=DIR/report]

For each run under DIR (in the order of DIR/sweep.json when launch.sweep made it; otherwise
every sub-directory with a metrics.jsonl or run.json), reads <run>/metrics.jsonl and takes
the last 'train' record (step, loss, nll), the last 'eval' record (dev nll, perplexity, BLEU
when decoded) and the last record of each 'test_*' kind (sacreBLEU, tokenized+compound-split
BLEU, tokenized lowercased BLEU, test perplexity). The run's overrides are the first columns.
Prints the markdown table and writes OUT/report.md and OUT/report.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any, Optional

from transformer.metrics_writer import read_metrics

# (column suffix, metrics.jsonl key) for each record kind.
_TRAIN = (("step", "step"), ("loss", "loss"), ("nll", "nll"))
_EVAL = (("step", "step"), ("nll", "nll"), ("perplexity", "perplexity"), ("bleu", "bleu"))
_TEST = (("step", "step"), ("sacrebleu", "sacrebleu"),
         ("bleu_tok_compound_split", "bleu_tok_compound_split"), ("bleu_tok_lc", "bleu_tok_lc"),
         ("nll", "test_nll"), ("perplexity", "test_perplexity"))


def find_runs(root: str) -> list[dict[str, Any]]:
  """[{'name', 'overrides'}] in sweep order (sweep.json) or by name."""
  manifest = os.path.join(root, "sweep.json")
  if os.path.exists(manifest):
    with open(manifest, encoding="utf-8") as f:
      return json.load(f)["runs"]
  runs = []
  for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if not os.path.isdir(d):
      continue
    if os.path.exists(os.path.join(d, "run.json")):
      with open(os.path.join(d, "run.json"), encoding="utf-8") as f:
        runs.append({"name": name, "overrides": json.load(f).get("overrides", {})})
    elif os.path.exists(os.path.join(d, "metrics.jsonl")):
      runs.append({"name": name, "overrides": {}})
  return runs


def _last(records: list[dict], kind: str) -> Optional[dict]:
  matching = [r for r in records if r["kind"] == kind]
  return matching[-1] if matching else None


def run_row(root: str, run: dict) -> dict[str, Any]:
  workdir = os.path.join(root, run["name"])
  records = read_metrics(workdir, missing_ok=True)  # not started: no records
  row: dict[str, Any] = {"run": run["name"], **run.get("overrides", {})}
  status_path = os.path.join(workdir, "status.json")
  if os.path.exists(status_path):
    with open(status_path, encoding="utf-8") as f:
      row["steps_done"] = "+".join(json.load(f).get("steps", {}))
  for prefix, kind, fields in (("train", "train", _TRAIN), ("dev", "eval", _EVAL)):
    record = _last(records, kind)
    for column, key in fields:
      if record is not None and key in record:
        row[f"{prefix}_{column}"] = record[key]
  for kind in sorted({r["kind"] for r in records if r["kind"].startswith("test_")}):
    record = _last(records, kind)
    for column, key in _TEST:
      if key in record:
        row[f"{kind}_{column}"] = record[key]
  return row


def build(root: str) -> tuple[list[str], list[dict[str, Any]], tuple[str, ...]]:
  """(columns, rows, override columns) of the runs under root."""
  runs = find_runs(root)
  rows = [run_row(root, run) for run in runs]
  columns: list[str] = ["run"]
  for run in runs:  # overrides first, in spec order
    for k in run.get("overrides", {}):
      if k not in columns:
        columns.append(k)
  overrides = tuple(columns[1:])
  for row in rows:
    for k in row:
      if k not in columns:
        columns.append(k)
  return columns, rows, overrides


def _fmt(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    if value.is_integer() and abs(value) < 1e15:
      return str(int(value))
    return f"{value:.4g}"
  return str(value)


def _fmt_override(value: Any) -> str:
  """Overrides as the spec wrote them (0.0 stays 0.0)."""
  if value is None:
    return ""
  if isinstance(value, bool):
    return str(value).lower()
  return repr(value) if isinstance(value, float) else str(value)


def markdown(columns: list[str], rows: list[dict[str, Any]],
             override_columns: tuple[str, ...] = ()) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join((_fmt_override if c in override_columns else _fmt)(row.get(c))
                                  for c in columns) + " |")
  return "\n".join(lines) + "\n"


def write_csv(path: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({c: row.get(c, "") for c in columns})


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.report", allow_abbrev=False,
                                   description="Final metrics of a sweep as markdown + CSV.")
  parser.add_argument("root", help="the sweep's --root")
  parser.add_argument("--out", default=None, help="output directory (default ROOT/report)")
  args = parser.parse_args(argv)
  root = os.path.abspath(args.root)
  if not os.path.isdir(root):
    print(f"error: {root} is not a directory", file=sys.stderr)
    return 2
  columns, rows, overrides = build(root)
  if not rows:
    print(f"error: no runs under {root} (no sweep.json, run.json or metrics.jsonl)",
          file=sys.stderr)
    return 2
  out = os.path.abspath(args.out or os.path.join(root, "report"))
  os.makedirs(out, exist_ok=True)
  table = markdown(columns, rows, overrides)
  with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
    f.write(f"# Sweep {root}\n\n{table}")
  write_csv(os.path.join(out, "report.csv"), columns, rows)
  sys.stdout.write(table)
  print(f"\nwrote {os.path.join(out, 'report.md')} and {os.path.join(out, 'report.csv')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
