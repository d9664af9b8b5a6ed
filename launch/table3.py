r"""Table 3 of the paper (section 6.2): parameter counts of every row, and the mini Table 3.

  python -m launch.table3 params [--vocab_size=V]          # every experiments/paper/table3 row
  python -m launch.table3 report PATH... [--out=DIR] [--partial]   # table, verdicts, PNGs
  python -m launch.table3 record ROOT --out=DIR            # one JSON record per finished run
  python -m launch.table3 seeds PATH... --spec=S --out=F   # second seeds for close verdicts
  python -m launch.table3 remaining PATH... --spec=S --out=F   # the runs not yet recorded
  python -m launch.table3 converged PATH... --short=A --long=B --png=P   # budget check
  python -m launch.table3 converged PATH... --run=R --budget=B --png=P   # on one run's curve

`params` builds each row's model from its flag file with `jax.eval_shape` (no memory, no
compute) and prints our count next to the paper's params column, which is read from the
row's header comment (`params x1e6 N`). `--vocab_size` overrides the shared vocabulary.

A PATH is a sweep root (launch.sweep's layout: one workdir per run, named like the paper's
rows) or a directory of run records written by `record` (e.g. under docs/, so that the table
does not depend on one machine's disk). Extra seeds of a row are runs named `<row>_seed<k>`;
a row's numbers are the mean over its seeds. The seed noise is the spread (max - min) of the
base's dev perplexity and BLEU over its seeds (at least --min_seeds of them); a difference
counts only when it is larger. `report` prints each row next to the paper's, one verdict per
claim of section 6.2, the rows whose compared gap lies within twice the noise with one seed
(`seeds` writes a sweep spec that runs them again at another seed), and draws PNG figures;
with `--partial` it reports a sweep that has not finished (the base's seeds are still needed).
`remaining` writes the spec's runs that have no record yet, so a sweep continues on another
machine or disk from the committed records. `converged` checks that dev perplexity at a budget
is within 5% of what twice it gives: from two runs, or from one run's dev curve at B and 2B
steps (the learning rate schedule does not depend on the number of steps and training is
deterministic, so the first B steps of a longer run are the B-step run). A run named `base_2x` (the base at twice the steps, same seed) makes
`report` do the check too.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE3_DIR = os.path.join(REPO, "experiments", "paper", "table3")
# Row order of the paper's Table 3.
ROWS = ("base", "a_h1", "a_h4", "a_h16", "a_h32", "b_dk16", "b_dk32", "c_n2", "c_n4", "c_n8",
        "c_d256", "c_d1024", "c_dff1024", "c_dff4096", "d_drop0", "d_drop02", "d_ls0", "d_ls02",
        "e_learned", "big")
_HEADER = re.compile(r"PPL\(dev\) ([\d.]+|-), BLEU\(dev\) ([\d.]+|-), params x1e6 ([\d.]+|-)")


def _num(text: str) -> Optional[float]:
  return None if text == "-" else float(text)


def paper_rows() -> dict[str, dict[str, Any]]:
  """{row: {'title', 'ppl', 'bleu', 'params_m'}} from the headers of experiments/paper/table3."""
  rows = {}
  for path in sorted(glob.glob(os.path.join(TABLE3_DIR, "*.flags"))):
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding="utf-8") as f:
      header = [line[1:].strip() for line in f if line.startswith("#")]
    text = " ".join(header)
    match = _HEADER.search(text)
    if match is None:
      raise ValueError(f"{path}: no 'PPL(dev) x, BLEU(dev) y, params x1e6 z' in its header")
    title = header[0].split("row", 1)[-1].strip(" .") if header else name
    rows[name] = {"title": title, "ppl": _num(match[1]), "bleu": _num(match[2]),
                  "params_m": _num(match[3])}
  missing = [r for r in ROWS if r not in rows]
  if missing:
    raise ValueError(f"{TABLE3_DIR}: no flag file for rows {missing}")
  return rows


def _row_config(name: str, extra: list[str]):
  from transformer import config as config_lib  # pylint: disable=g-import-not-at-top
  # Nested --flagfile paths are relative to the repository root.
  return config_lib.from_args([f"--flagfile={os.path.join(TABLE3_DIR, name + '.flags')}",
                               *extra], cwd=REPO)


def params_table(vocab_size: Optional[int] = None) -> list[dict[str, Any]]:
  paper = paper_rows()
  extra = [f"--vocab_size={vocab_size}"] if vocab_size else []
  from transformer.train import count_params  # pylint: disable=g-import-not-at-top
  out = []
  for name in ROWS:
    cfg = _row_config(name, extra).model
    out.append({"row": name, "title": paper[name]["title"], "vocab": cfg.vocab_size,
                "d_model": cfg.d_model, "ours": count_params(cfg),
                "paper_m": paper[name]["params_m"]})
  return out


def _cmd_params(args) -> int:
  rows = params_table(args.vocab_size)
  print("| row | ours | ours (M) | paper (M) | vocab |")
  print("|---|---|---|---|---|")
  for r in rows:
    paper = "-" if r["paper_m"] is None else f"{r['paper_m']:g}"
    match = ""
    if r["paper_m"] is not None:
      match = " ✓" if round(r["ours"] / 1e6) == round(r["paper_m"]) else " ✗"
    print(f"| {r['row']} ({r['title']}) | {r['ours']:,} | {r['ours'] / 1e6:.1f}{match} | {paper}"
          f" | {r['vocab']} |")
  print("\n✓/✗: ours rounds / does not round to the paper's millions. Rows without a paper"
        " number (-) are the ones the paper left blank.\n")
  family = [r for r in rows if r["paper_m"] is not None and r["row"] != "big"]
  for label, subset in (("base-family rows (base, B, C)", family),
                        ("big", [r for r in rows if r["row"] == "big"])):
    lo, hi = vocab_interval(subset)
    found = f"{lo:,}-{hi:,}" if lo <= hi else "none"
    print(f"shared vocabularies V for which every one of the {label} rounds to the paper: {found}")
  return 0


def vocab_interval(rows: list[dict[str, Any]]) -> tuple[int, int]:
  """[lo, hi] of shared vocabulary sizes V with round(params(V) / 1e6) == paper for every row.

  Only the embedding depends on V (V x d_model, shared by both stacks and the softmax), so
  params(V) = ours + (V - vocab) * d_model; round() keeps the paper's half-up convention.
  """
  lo, hi = 0, 10**9
  for r in rows:
    d = r["d_model"]
    base = r["ours"] - r["vocab"] * d               # params without the embedding
    low_params = (r["paper_m"] - 0.5) * 1e6          # inclusive
    high_params = (r["paper_m"] + 0.5) * 1e6         # exclusive
    lo = max(lo, math.ceil((low_params - base) / d))
    hi = min(hi, math.ceil((high_params - base) / d) - 1)
  return lo, hi


# ----------------------------------------------------------------------------
# Mini Table 3: run records, seeds, noise and verdicts
# ----------------------------------------------------------------------------

_SEEDED = re.compile(r"^(?P<row>.+?)_seed(?P<seed>\d+)$")


def row_and_seed(name: str) -> tuple[str, int]:
  """'c_n8' -> ('c_n8', 0); 'c_n8_seed2' -> ('c_n8', 2): extra seeds of a row are named so."""
  match = _SEEDED.match(name)
  return (match["row"], int(match["seed"])) if match else (name, 0)


def read_run(workdir: str) -> Optional[dict[str, Any]]:
  """The record of one finished sweep run, or None if its evaluate step has not finished.

  A record is what the report needs and nothing machine-specific: the run's flags and
  overrides, the dev perplexity/NLL/BLEU of its evaluate step, the last train NLL, the dev
  curve (every eval record of metrics.jsonl), the parameter count and each step's wall time.
  """
  reports = sorted(glob.glob(os.path.join(workdir, "*.latest.json")))
  if not reports:
    return None
  with open(reports[-1], encoding="utf-8") as f:
    ev = json.load(f)
  from transformer.metrics_writer import read_metrics  # pylint: disable=g-import-not-at-top
  train = read_metrics(workdir, "train")
  train_nll = train[-1].get("nll") if train else None
  curve = [{"step": r["step"], "nll": r["nll"], "perplexity": r["perplexity"]}
           for r in read_metrics(workdir, "eval")]
  with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
    run = json.load(f)
  status = {}
  if os.path.exists(os.path.join(workdir, "status.json")):
    with open(os.path.join(workdir, "status.json"), encoding="utf-8") as f:
      status = json.load(f)
  from transformer import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer.train import count_params  # pylint: disable=g-import-not-at-top
  cfg = config_lib.from_args(run["flags"], cwd=REPO)
  flags = [f for f in run["flags"] if not f.startswith(("--tfds_data_dir=", "--vocab_path=",
                                                        "--raw_data_dir="))]
  return {"name": os.path.basename(os.path.normpath(workdir)), "step": ev["step"],
          "ppl": ev["test_perplexity"], "dev_nll": ev["test_nll"], "bleu": ev["sacrebleu"],
          "bleu_tok": ev["bleu_tok_compound_split"], "train_nll": train_nll,
          "params": count_params(cfg.model), "overrides": run.get("overrides", {}),
          "flags": flags, "curve": curve,
          "seconds": {k: v["seconds"] for k, v in status.get("steps", {}).items()}}


def read_records(paths: list[str]) -> dict[str, dict[str, Any]]:
  """{run name: record} from sweep roots (one workdir per run) or directories of record JSONs."""
  out = {}
  for path in paths:
    if not os.path.isdir(path):
      raise ValueError(f"{path} is not a directory")
    for entry in sorted(os.listdir(path)):
      full = os.path.join(path, entry)
      if entry.endswith(".json") and os.path.isfile(full) and entry not in ("sweep.json",):
        with open(full, encoding="utf-8") as f:
          record = json.load(f)
        if isinstance(record, dict) and "ppl" in record and "name" in record:
          out[record["name"]] = record
      elif os.path.isfile(os.path.join(full, "run.json")):
        record = read_run(full)
        if record is not None:
          out[record["name"]] = record
  return out


def write_records(records: dict[str, dict[str, Any]], out_dir: str) -> list[str]:
  """One `<run>.json` per finished run, e.g. under docs/ so the table needs no sweep disk."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, record in records.items():
    path = os.path.join(out_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
      f.write("\n")
    os.replace(tmp, path)
    paths.append(path)
  return paths


_MEAN_KEYS = ("ppl", "dev_nll", "bleu", "bleu_tok", "train_nll")


def by_row(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Records grouped by Table 3 row: the mean of every seed's numbers, and the seeds' values."""
  groups: dict[str, list[tuple[int, dict]]] = {}
  for name, record in records.items():
    row, seed = row_and_seed(name)
    groups.setdefault(row, []).append((seed, record))
  out = {}
  for row, members in groups.items():
    members.sort(key=lambda m: m[0])
    first = members[0][1]
    mean = {}
    for k in _MEAN_KEYS:
      values = [r[k] for _, r in members if r.get(k) is not None]
      mean[k] = sum(values) / len(values) if values else None
    mean.update(seeds=[s for s, _ in members], seed_ppl=[r["ppl"] for _, r in members],
                seed_bleu=[r["bleu"] for _, r in members], params=first["params"],
                overrides={k: v for k, v in first["overrides"].items()
                           if k not in ("seed", "shuffle_seed")})
    out[row] = mean
  return out


def seed_noise(rows: dict[str, dict[str, Any]], min_seeds: int = 3) -> dict[str, float]:
  """The base's spread over seeds (max - min of dev PPL and of BLEU): the noise of a verdict."""
  base = rows.get("base")
  if base is None or len(base["seeds"]) < min_seeds:
    have = 0 if base is None else len(base["seeds"])
    raise ValueError(f"the seed noise needs at least {min_seeds} seeds of the base; have {have}")
  return {"ppl": max(base["seed_ppl"]) - min(base["seed_ppl"]),
          "bleu": max(base["seed_bleu"]) - min(base["seed_bleu"]), "seeds": len(base["seeds"])}


def _compare(ours: dict, better: list[str], worse: list[str], noise: dict) -> tuple[str, str]:
  """Verdict that every row in `better` beats every row in `worse` on dev PPL and BLEU.

  Returns (verdict, evidence). 'held' when all the PPL gaps exceed the PPL seed noise in the
  claimed direction and no BLEU gap goes the other way by more than the BLEU noise; 'did not
  hold' when some PPL gap goes the other way by more than the noise; else 'inconclusive'.
  """
  pairs, ok, against = [], True, False
  for b in better:
    for w in worse:
      d_ppl = ours[w]["ppl"] - ours[b]["ppl"]        # > 0: claim direction
      d_bleu = ours[b]["bleu"] - ours[w]["bleu"]     # > 0: claim direction
      pairs.append(f"{b} vs {w}: PPL {ours[b]['ppl']:.2f} vs {ours[w]['ppl']:.2f},"
                   f" BLEU {ours[b]['bleu']:.1f} vs {ours[w]['bleu']:.1f}")
      if d_ppl <= noise["ppl"] or d_bleu < -noise["bleu"]:
        ok = False
      if d_ppl < -noise["ppl"]:
        against = True
  verdict = "held" if ok else ("did not hold" if against else "inconclusive (within seed noise)")
  return verdict, "; ".join(pairs)


NOT_RUN = "not run yet"


def verdicts(ours: dict[str, dict], noise: dict[str, float]) -> list[dict[str, Any]]:
  """One entry per claim of section 6.2 (and the label smoothing remark of row D).

  Each entry has the claim, the verdict, the evidence and `pairs`: the pairs of rows it compares
  (used to decide which rows lie within twice the noise and need a second seed). A claim with a
  row missing from `ours` gets the verdict NOT_RUN and no pairs.
  """
  out = []
  def add(claim, rows, judge):
    missing = [r for r in rows if r not in ours]
    if missing:
      out.append({"claim": claim, "verdict": NOT_RUN, "pairs": [],
                  "evidence": f"no result for {', '.join(missing)}"})
      return
    verdict, evidence, pairs = judge()
    out.append({"claim": claim, "verdict": verdict, "pairs": pairs, "evidence": evidence})

  def compare(better, worse):
    return lambda: (*_compare(ours, better, worse, noise), [(b, w) for b in better for w in worse])

  def single_head():
    best = min(heads, key=lambda r: ours[r]["ppl"])
    if best == "a_h1":
      return "did not hold", f"h=1 has the best dev PPL of {', '.join(heads)}", []
    verdict, evidence = _compare(ours, [best], ["a_h1"], noise)
    return verdict, f"{evidence}. best by dev PPL: {best}", [(best, "a_h1")]

  def many_heads():
    best = min(["a_h4", "base", "a_h16"], key=lambda r: ours[r]["ppl"])
    verdict, evidence = _compare(ours, [best], ["a_h32"], noise)
    return verdict, f"{evidence}. best of h=4/8/16: {best}", [(best, "a_h32")]

  def dropout():
    verdict, evidence = _compare(ours, ["base"], ["d_drop0"], noise)
    gap0 = ours["d_drop0"]["dev_nll"] - ours["d_drop0"]["train_nll"]
    gap1 = ours["base"]["dev_nll"] - ours["base"]["train_nll"]
    return verdict, (f"{evidence}. dev NLL - train NLL (over-fitting gap): {gap0:.3f} without"
                     f" dropout, {gap1:.3f} with"), [("base", "d_drop0")]

  def learned_positions():
    d_ppl = abs(ours["e_learned"]["ppl"] - ours["base"]["ppl"])
    d_bleu = abs(ours["e_learned"]["bleu"] - ours["base"]["bleu"])
    same = d_ppl <= max(noise["ppl"], 0.02 * ours["base"]["ppl"]) and d_bleu <= max(
        noise["bleu"], 0.5)
    return ("held" if same else "did not hold",
            f"e_learned vs base: PPL {ours['e_learned']['ppl']:.2f} vs {ours['base']['ppl']:.2f},"
            f" BLEU {ours['e_learned']['bleu']:.1f} vs {ours['base']['bleu']:.1f}. nearly"
            " identical = |dPPL| <= max(seed noise, 2%) and |dBLEU| <= max(seed noise, 0.5)",
            [("e_learned", "base")])

  def label_smoothing():
    base, ls0 = ours["base"], ours["d_ls0"]
    ppl_held = base["ppl"] - ls0["ppl"] > noise["ppl"]        # smoothing raised perplexity
    bleu_held = base["bleu"] - ls0["bleu"] > noise["bleu"]    # smoothing raised BLEU
    against = (ls0["ppl"] - base["ppl"] > noise["ppl"]) or (
        ls0["bleu"] - base["bleu"] > noise["bleu"])
    if ppl_held and bleu_held:
      verdict = "held"
    elif ppl_held or bleu_held:
      verdict = f"half held ({'perplexity' if ppl_held else 'BLEU'} only)"
    else:
      verdict = "did not hold" if against else "inconclusive (within seed noise)"
    return verdict, (f"eps_ls 0.1 vs 0.0: PPL {base['ppl']:.2f} vs {ls0['ppl']:.2f},"
                     f" BLEU {base['bleu']:.1f} vs {ls0['bleu']:.1f}"), [("base", "d_ls0")]

  heads = ["a_h1", "a_h4", "base", "a_h16", "a_h32"]
  add("(A) single-head attention is worse than the best setting", heads, single_head)
  add("(A) quality drops off with too many heads (h=32)", heads[1:], many_heads)
  add("(B) reducing the attention key size d_k hurts model quality", ["base", "b_dk32", "b_dk16"],
      compare(["base"], ["b_dk32", "b_dk16"]))
  for small, large, what in (("c_n2", "c_n8", "N"), ("c_d256", "c_d1024", "d_model"),
                             ("c_dff1024", "c_dff4096", "d_ff"), ("base", "big", "big")):
    add(f"(C) bigger models are better: {what}", [large, small], compare([large], [small]))
  add("(D) dropout is very helpful in avoiding over-fitting (P_drop 0.1 vs 0.0)",
      ["base", "d_drop0"], dropout)
  add("(E) learned positional embeddings give nearly identical results to sinusoids",
      ["e_learned", "base"], learned_positions)
  add("(D, section 5.4) label smoothing hurts perplexity but improves BLEU", ["base", "d_ls0"],
      label_smoothing)
  return out


def rows_needing_a_seed(ours: dict[str, dict], claims: list[dict], noise: dict[str, float]
                        ) -> list[str]:
  """Rows with one seed in a compared pair whose PPL or BLEU gap is within twice the noise."""
  need = []
  for claim in claims:
    for a, b in claim["pairs"]:
      close = (abs(ours[a]["ppl"] - ours[b]["ppl"]) <= 2 * noise["ppl"]
               or abs(ours[a]["bleu"] - ours[b]["bleu"]) <= 2 * noise["bleu"])
      if close:
        need += [r for r in (a, b) if len(ours[r]["seeds"]) < 2 and r not in need]
  return [r for r in (*ROWS,) if r in need]


def second_seed_spec(spec: dict[str, Any], rows: list[str], seed: int = 1) -> dict[str, Any]:
  """A sweep spec with `<row>_seed<seed>` for each row: its flags plus another seed and order."""
  by_name = {r["name"]: r for r in spec.get("runs", [])}
  missing = [r for r in rows if r not in by_name]
  if missing:
    raise ValueError(f"rows {missing} are not runs of the spec")
  out = {k: v for k, v in spec.items() if k != "runs"}
  out["description"] = (f"Second seeds ({seed}) of the rows whose verdict lies within twice the"
                        f" seed noise: {', '.join(rows)}. " + spec.get("description", ""))
  out["runs"] = [dict(by_name[r], name=f"{r}_seed{seed}",
                      flags={**by_name[r].get("flags", {}), "seed": seed, "shuffle_seed": seed})
                 for r in rows]
  return out


def converged(short: dict[str, Any], long: dict[str, Any], tolerance: float = 0.05
              ) -> dict[str, Any]:
  """Whether dev PPL at a budget is within `tolerance` of what twice the budget gives."""
  ratio = short["ppl"] / long["ppl"] - 1.0
  return {"budget_steps": short["step"], "double_steps": long["step"], "ppl": short["ppl"],
          "ppl_double": long["ppl"], "relative_gap": ratio, "converged": ratio <= tolerance}


def converged_on_curve(record: dict[str, Any], budget: int, tolerance: float = 0.05
                       ) -> dict[str, Any]:
  """`converged` on one run's dev curve: its perplexity at step `budget` and at 2 x budget."""
  at = {c["step"]: c["perplexity"] for c in record["curve"]}
  for step in (budget, 2 * budget):
    if step not in at:
      raise ValueError(f"run {record['name']} has no dev perplexity at step {step};"
                       f" its curve has steps {sorted(at)}")
  return converged({"step": budget, "ppl": at[budget]},
                   {"step": 2 * budget, "ppl": at[2 * budget]}, tolerance)


def _plot(ours: dict, paper: dict, out_dir: str) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows = [r for r in ROWS if r in ours]
  x = np.arange(len(rows))
  fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
  for ax, key, label in ((axes[0], "ppl", "dev PPL / base dev PPL"),
                         (axes[1], "bleu", "dev BLEU - base dev BLEU")):
    if key == "ppl":
      mine = [ours[r]["ppl"] / ours["base"]["ppl"] for r in rows]
      theirs = [paper[r]["ppl"] / paper["base"]["ppl"] if paper[r]["ppl"] else np.nan
                for r in rows]
      ax.axhline(1.0, color="gray", lw=0.8)
    else:
      mine = [ours[r]["bleu"] - ours["base"]["bleu"] for r in rows]
      theirs = [paper[r]["bleu"] - paper["base"]["bleu"] if paper[r]["bleu"] else np.nan
                for r in rows]
      ax.axhline(0.0, color="gray", lw=0.8)
    ax.bar(x - 0.2, mine, 0.4, label="ours (mini, Multi30k)")
    ax.bar(x + 0.2, theirs, 0.4, label="paper (WMT14, newstest2013)")
    seeds = ours["base"]["seed_ppl" if key == "ppl" else "seed_bleu"]
    lo, hi = ((min(seeds) / ours["base"]["ppl"], max(seeds) / ours["base"]["ppl"]) if key == "ppl"
              else (min(seeds) - ours["base"]["bleu"], max(seeds) - ours["base"]["bleu"]))
    ax.axhspan(lo, hi, color="C0", alpha=0.15, label="ours: base's spread over seeds")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  axes[0].set_title("Table 3 rows relative to the base model (lower PPL, higher BLEU = better)")
  axes[1].set_xticks(x, rows, rotation=45, ha="right")
  fig.tight_layout()
  path1 = os.path.join(out_dir, "table3_mini_rows.png")
  fig.savefig(path1, dpi=100)
  plt.close(fig)

  # Dev perplexity against the varied hyper-parameter, per block (ours solid, paper dashed).
  blocks = [("heads h (d_k = d_model/h)", [("a_h1", 1), ("a_h4", 4), ("base", 8), ("a_h16", 16),
                                           ("a_h32", 32)], True),
            ("d_k (fraction of base)", [("b_dk16", 0.25), ("b_dk32", 0.5), ("base", 1.0)], True),
            ("N (fraction of base)", [("c_n2", 1 / 3), ("c_n4", 2 / 3), ("base", 1.0),
                                      ("c_n8", 4 / 3)], False),
            ("d_model (fraction of base)", [("c_d256", 0.5), ("base", 1.0), ("c_d1024", 2.0)],
             True),
            ("d_ff (fraction of base)", [("c_dff1024", 0.5), ("base", 1.0), ("c_dff4096", 2.0)],
             True),
            ("P_drop", [("d_drop0", 0.0), ("base", 0.1), ("d_drop02", 0.2)], False)]
  fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
  for ax, (title, points, log) in zip(axes.flat, blocks):
    points = [(r, v) for r, v in points if r in ours]
    xs = [v for _, v in points]
    ax.plot(xs, [ours[r]["ppl"] / ours["base"]["ppl"] for r, _ in points], "o-",
            label="ours")
    ax.plot(xs, [paper[r]["ppl"] / paper["base"]["ppl"] for r, _ in points], "s--",
            label="paper")
    if log:
      ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("dev PPL / base", fontsize=9)
  axes.flat[0].legend(fontsize=8)
  fig.suptitle("Dev perplexity relative to the base model, per Table 3 block")
  fig.tight_layout()
  path2 = os.path.join(out_dir, "table3_mini_blocks.png")
  fig.savefig(path2, dpi=100)
  plt.close(fig)
  return [path1, path2]


def _plot_curves(records: list[dict[str, Any]], path: str, title: str,
                 marks: tuple[int, ...] = ()) -> str:
  """Dev perplexity against step, one line per run record; dotted lines at the `marks` steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for record in records:
    curve = record["curve"]
    ax.plot([c["step"] for c in curve], [c["perplexity"] for c in curve], "o-", ms=3,
            label=f"{record['name']} ({record['step']} steps)")
  for step in marks:
    ax.axvline(step, color="gray", ls=":", lw=1)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("dev perplexity")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def _cmd_report(args) -> int:
  paths = [os.path.abspath(p) for p in args.paths]
  try:
    records = read_records(paths)
  except ValueError as e:
    return _error(str(e))
  ours = by_row(records)
  missing = [r for r in ROWS if r not in ours]
  if missing and not args.partial:
    return _error(f"{', '.join(paths)}: no finished evaluate step for runs {', '.join(missing)}"
                  " (run the sweep to the end first, it resumes; or report with --partial)")
  try:
    noise = seed_noise(ours, args.min_seeds)
  except ValueError as e:
    return _error(str(e))
  paper = paper_rows()
  lines = ["| row | changes (mini) | params | seeds | train NLL | dev PPL | dev BLEU | BLEU tok |"
           " paper PPL | paper BLEU | paper params (M) |", "|" + "---|" * 11]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
  for name in ROWS:
    r, p = ours.get(name), paper.get(name, {})
    theirs = (f"{fmt(p.get('ppl'), '.2f')} | {fmt(p.get('bleu'), '.1f')} |"
              f" {fmt(p.get('params_m'), 'g')} |")
    if r is None:
      lines.append(f"| {name} | {NOT_RUN} | | | | | | | {theirs}")
      continue
    changes = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
    lines.append(f"| {name} | {changes} | {r['params']:,} | {len(r['seeds'])} |"
                 f" {fmt(r['train_nll'], '.3f')} | {r['ppl']:.2f} | {r['bleu']:.1f} |"
                 f" {r['bleu_tok']:.1f} | {theirs}")
  claims = verdicts(ours, noise)
  need = rows_needing_a_seed(ours, claims, noise)
  out_dir = os.path.abspath(args.out or os.path.join(paths[0], "report"))
  os.makedirs(out_dir, exist_ok=True)
  seconds = sum(sum(r["seconds"].values()) for r in records.values())
  base_seeds = ", ".join(f"{v:.2f}" for v in ours["base"]["seed_ppl"])
  title = f"# Mini Table 3 ({', '.join(args.paths)})"
  if missing:
    title += f": partial, {len(ROWS) - len(missing)} of {len(ROWS)} rows"
  text = [title, "", *lines, "",
          f"Rows with several seeds show the mean. Seed noise = the spread (max - min) over the"
          f" {noise['seeds']} seeds of the base (dev PPL {base_seeds}): dev PPL"
          f" {noise['ppl']:.3f}, dev BLEU {noise['bleu']:.2f}. A gap counts only beyond it.", "",
          "| claim (section 6.2) | at this scale | evidence |", "|---|---|---|"]
  cell = lambda v: v.replace("|", "\\|")  # noqa: E731  (a '|' in a cell would split it)
  text += [f"| {c['claim']} | **{c['verdict']}** | {cell(c['evidence'])} |" for c in claims]
  budget_png = None
  if "base_2x" in records and "base" in records:
    check = converged(records["base"], records["base_2x"])
    text += ["", f"Budget: the base (seed 0) reaches dev PPL {check['ppl']:.2f} at"
             f" {check['budget_steps']} steps and {check['ppl_double']:.2f} at"
             f" {check['double_steps']} (base_2x): {100 * check['relative_gap']:+.1f}%,"
             + (" within 5%: converged." if check["converged"] else
                " more than 5% above: NOT converged at this budget.")]
    budget_png = os.path.join(out_dir, "table3_mini_budget.png")
  text += ["", "Rows within twice the noise that have one seed: "
           + (", ".join(need) if need else "none") + ".",
           f"Run time summed over the {len(records)} runs (train + evaluate steps; runs in"
           f" parallel share the wall time): {seconds / 3600:.2f} h."]
  pngs = _plot(ours, paper, out_dir)
  if budget_png:
    pngs.append(_plot_curves([records["base"], records["base_2x"]], budget_png,
                             "Dev perplexity of the base at the budget and at twice it"))
  base_runs = [records[n] for n in sorted(records) if row_and_seed(n)[0] == "base"]
  pngs.append(_plot_curves(base_runs, os.path.join(out_dir, "table3_mini_base_curves.png"),
                           "Dev perplexity of the base, every seed"))
  text += ["", *(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs)]
  report_path = os.path.join(out_dir, "table3_mini.md")
  with open(report_path, "w", encoding="utf-8") as f:
    f.write("\n".join(text) + "\n")
  with open(os.path.join(out_dir, "table3_mini.json"), "w", encoding="utf-8") as f:
    json.dump({"rows": ours, "noise": noise, "claims": claims, "need_second_seed": need,
               "run_seconds_summed": seconds}, f, indent=2)
  print("\n".join(text))
  print(f"\nwrote {report_path}, table3_mini.json and {', '.join(map(os.path.basename, pngs))}")
  return 0


def remaining_spec(spec: dict[str, Any], records: dict[str, dict[str, Any]]
                   ) -> dict[str, Any]:
  """`spec` with only the runs that have no record, in the spec's order.

  Raises:
    ValueError: a record whose overrides differ from its run's flags in the spec.
  """
  runs = spec.get("runs", [])
  stale = [r["name"] for r in runs
           if r["name"] in records and records[r["name"]].get("overrides") != r.get("flags", {})]
  if stale:
    raise ValueError(f"records {', '.join(stale)} were made with other flags than the spec's")
  left = [r for r in runs if r["name"] not in records]
  return dict(spec, runs=left, description=(
      f"The runs without a record ({len(runs) - len(left)} of {len(runs)} recorded). "
      + spec.get("description", "")))


def _write_spec(spec: dict[str, Any], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(spec, f, indent=2)
    f.write("\n")
  print(f"wrote {path}: {', '.join(r['name'] for r in spec['runs'])}")


def _cmd_remaining(args) -> int:
  from launch import sweep  # pylint: disable=g-import-not-at-top
  try:
    records = read_records([os.path.abspath(p) for p in args.paths])
    spec = remaining_spec(sweep.load_spec(args.spec), records)
  except (ValueError, sweep.SpecError) as e:
    return _error(str(e))
  if not spec["runs"]:
    print("every run of the spec has a record: nothing to run")
    return 0
  _write_spec(spec, args.out)
  return 0


def _cmd_record(args) -> int:
  try:
    records = read_records([os.path.abspath(args.root)])
  except ValueError as e:
    return _error(str(e))
  if not records:
    return _error(f"{args.root}: no finished run")
  for path in write_records(records, args.out):
    print(f"wrote {path}")
  return 0


def _cmd_seeds(args) -> int:
  from launch import sweep  # pylint: disable=g-import-not-at-top
  try:
    records = read_records([os.path.abspath(p) for p in args.paths])
    ours = by_row(records)
    missing = [r for r in ROWS if r not in ours]
    if missing:
      raise ValueError(f"no finished evaluate step for runs {', '.join(missing)}")
    noise = seed_noise(ours, args.min_seeds)
    need = rows_needing_a_seed(ours, verdicts(ours, noise), noise)
    spec = second_seed_spec(sweep.load_spec(args.spec), need, args.seed)
  except (ValueError, sweep.SpecError) as e:
    return _error(str(e))
  if not need:
    print("every row within twice the noise already has two seeds: nothing to run")
    return 0
  _write_spec(spec, args.out)
  return 0


def _cmd_converged(args) -> int:
  try:
    records = read_records([os.path.abspath(p) for p in args.paths])
  except ValueError as e:
    return _error(str(e))
  if (args.run is None) == (args.short is None or args.long is None):
    return _error("give --short and --long (two runs), or --run and --budget (one run's curve)")
  names = [args.run] if args.run else [args.short, args.long]
  missing = [n for n in names if n not in records]
  if missing:
    return _error(f"no finished run {', '.join(missing)}; have {', '.join(sorted(records))}")
  if args.run:
    if args.budget is None or args.budget <= 0:
      return _error("--run needs a positive --budget (steps)")
    try:
      result = converged_on_curve(records[args.run], args.budget, args.tolerance)
    except ValueError as e:
      return _error(str(e))
    marks = (args.budget, 2 * args.budget)
  else:
    result = converged(records[args.short], records[args.long], args.tolerance)
    marks = ()
  png = _plot_curves([records[n] for n in names], args.png,
                     "Dev perplexity at the budget and at twice it", marks)
  print(json.dumps({**result, "png": png}))
  return 0 if result["converged"] else 1


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.table3", allow_abbrev=False,
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("params", help="parameter counts of every Table 3 row vs the paper")
  p.add_argument("--vocab_size", type=int, default=None, help="override the shared vocabulary")
  r = sub.add_parser("report", help="report a finished mini Table 3 sweep")
  r.add_argument("paths", nargs="+", help="sweep roots and/or directories of run records")
  r.add_argument("--out", default=None, help="output directory (default FIRST_PATH/report)")
  r.add_argument("--min_seeds", type=int, default=3, help="seeds of the base the noise needs")
  r.add_argument("--partial", action="store_true",
                 help="report the rows that have finished; claims missing a row are not judged")
  c = sub.add_parser("record", help="one JSON record per finished run of a sweep root")
  c.add_argument("root")
  c.add_argument("--out", required=True, help="directory of the records (e.g. under docs/)")
  s = sub.add_parser("seeds", help="a sweep spec of second seeds for rows within 2x the noise")
  s.add_argument("paths", nargs="+", help="sweep roots and/or directories of run records")
  s.add_argument("--spec", required=True, help="the sweep spec the rows came from")
  s.add_argument("--out", required=True, help="where to write the second-seed spec (JSON)")
  s.add_argument("--seed", type=int, default=1)
  s.add_argument("--min_seeds", type=int, default=3)
  m = sub.add_parser("remaining", help="a sweep spec of the spec's runs without a record")
  m.add_argument("paths", nargs="+", help="sweep roots and/or directories of run records")
  m.add_argument("--spec", required=True, help="the sweep spec")
  m.add_argument("--out", required=True, help="where to write the spec of remaining runs (JSON)")
  v = sub.add_parser("converged", help="dev PPL at a budget within --tolerance of twice it?")
  v.add_argument("paths", nargs="+", help="sweep roots and/or directories of run records")
  v.add_argument("--short", default=None, help="run name at the budget")
  v.add_argument("--long", default=None, help="run name at twice the budget")
  v.add_argument("--run", default=None, help="one run that went to at least twice the budget")
  v.add_argument("--budget", type=int, default=None, help="with --run: the budget in steps")
  v.add_argument("--tolerance", type=float, default=0.05)
  v.add_argument("--png", required=True, help="where to draw both dev curves")
  args = parser.parse_args(argv)
  if args.command == "params":
    if args.vocab_size is not None and args.vocab_size <= 0:
      return _error(f"--vocab_size must be positive, got {args.vocab_size}")
    return _cmd_params(args)
  return {"report": _cmd_report, "record": _cmd_record, "seeds": _cmd_seeds,
          "remaining": _cmd_remaining, "converged": _cmd_converged}[args.command](args)


if __name__ == "__main__":
  sys.exit(main())
