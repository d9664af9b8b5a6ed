r"""Table 3 of the paper (section 6.2): parameter counts of every row, and the mini Table 3 report.

  python -m launch.table3 params [--vocab_size=V]   # every experiments/paper/table3 row, shapes only
  python -m launch.table3 report ROOT [--out=DIR]   # a finished experiments/sweeps/table3_mini.json

`params` builds each row's model from its flag file with `jax.eval_shape` (no memory, no
compute) and prints our count next to the paper's params column, which is read from the
row's header comment (`params x1e6 N`). `--vocab_size` overrides the shared vocabulary.

`report` reads the sweep ROOT (launch.sweep's layout: one workdir per row, named like the
paper's rows), prints each row's dev perplexity and BLEU next to the paper's, states for each
claim of section 6.2 whether it held at this scale, and draws PNG figures. A difference counts
only when it is larger than the seed noise: |base - base_seed1| (the same row at another seed
and data order), measured in the same sweep.
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
SEED_ROW = "base_seed1"
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


def count_parameters(model_cfg) -> int:
  """Parameters of the model, from shapes only."""
  from transformer.model import count_parameters as count  # pylint: disable=g-import-not-at-top
  return count(model_cfg)


def _row_config(name: str, extra: list[str]):
  from transformer import config as config_lib  # pylint: disable=g-import-not-at-top
  cwd = os.getcwd()
  os.chdir(REPO)  # nested --flagfile paths are relative to the repository root
  try:
    return config_lib.from_args([f"--flagfile={os.path.join(TABLE3_DIR, name + '.flags')}",
                                 *extra])
  finally:
    os.chdir(cwd)


def params_table(vocab_size: Optional[int] = None) -> list[dict[str, Any]]:
  paper = paper_rows()
  extra = [f"--vocab_size={vocab_size}"] if vocab_size else []
  out = []
  for name in ROWS:
    cfg = _row_config(name, extra).model
    out.append({"row": name, "title": paper[name]["title"], "vocab": cfg.vocab_size,
                "d_model": cfg.d_model, "ours": count_parameters(cfg),
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
# Mini Table 3 report
# ----------------------------------------------------------------------------

def read_run(root: str, name: str) -> Optional[dict[str, Any]]:
  """Dev perplexity/BLEU (the evaluate step's JSON), last train loss and parameters of a run."""
  workdir = os.path.join(root, name)
  reports = sorted(glob.glob(os.path.join(workdir, "*.latest.json")))
  if not reports:
    return None
  with open(reports[-1], encoding="utf-8") as f:
    ev = json.load(f)
  train_nll = None
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if record.get("kind") == "train":
        train_nll = record.get("nll")
  with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
    run = json.load(f)
  from transformer import config as config_lib  # pylint: disable=g-import-not-at-top
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    cfg = config_lib.from_args(run["flags"])
  finally:
    os.chdir(cwd)
  return {"step": ev["step"], "ppl": ev["test_perplexity"], "dev_nll": ev["test_nll"],
          "bleu": ev["sacrebleu"], "bleu_tok": ev["bleu_tok_compound_split"],
          "train_nll": train_nll, "params": count_parameters(cfg.model),
          "overrides": run.get("overrides", {}), "decode_seconds": ev.get("decode_seconds")}


def _compare(ours: dict, better: list[str], worse: list[str], noise: dict) -> tuple[str, str]:
  """Verdict that every run in `better` beats every run in `worse` on dev PPL and BLEU.

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


def verdicts(ours: dict[str, dict], noise: dict[str, float]) -> list[dict[str, str]]:
  """One entry per claim of section 6.2 (and the label smoothing remark of row D)."""
  out = []
  def add(claim, verdict_evidence, note=""):
    verdict, evidence = verdict_evidence
    out.append({"claim": claim, "verdict": verdict, "evidence": evidence + (
        f". {note}" if note else "")})

  heads = ["a_h1", "a_h4", "base", "a_h16", "a_h32"]
  best = min(heads, key=lambda r: ours[r]["ppl"])
  add("(A) single-head attention is worse than the best setting",
      _compare(ours, [best], ["a_h1"], noise) if best != "a_h1" else
      ("did not hold", f"h=1 has the best dev PPL of {', '.join(heads)}"),
      f"best by dev PPL: {best}")
  best_fewer = min(["a_h4", "base", "a_h16"], key=lambda r: ours[r]["ppl"])
  add("(A) quality drops off with too many heads (h=32)",
      _compare(ours, [best_fewer], ["a_h32"], noise), f"best of h=4/8/16: {best_fewer}")
  add("(B) reducing the attention key size d_k hurts model quality",
      _compare(ours, ["base"], ["b_dk32", "b_dk16"], noise))
  for small, large, what in (("c_n2", "c_n8", "N"), ("c_d256", "c_d1024", "d_model"),
                             ("c_dff1024", "c_dff4096", "d_ff"), ("base", "big", "big")):
    add(f"(C) bigger models are better: {what}", _compare(ours, [large], [small], noise))
  verdict, evidence = _compare(ours, ["base"], ["d_drop0"], noise)
  gap0 = ours["d_drop0"]["dev_nll"] - ours["d_drop0"]["train_nll"]
  gap1 = ours["base"]["dev_nll"] - ours["base"]["train_nll"]
  add("(D) dropout is very helpful in avoiding over-fitting (P_drop 0.1 vs 0.0)",
      (verdict, evidence),
      f"dev NLL - train NLL (over-fitting gap): {gap0:.3f} without dropout, {gap1:.3f} with")
  d_ppl = abs(ours["e_learned"]["ppl"] - ours["base"]["ppl"])
  d_bleu = abs(ours["e_learned"]["bleu"] - ours["base"]["bleu"])
  same = d_ppl <= max(noise["ppl"], 0.02 * ours["base"]["ppl"]) and d_bleu <= max(
      noise["bleu"], 0.5)
  add("(E) learned positional embeddings give nearly identical results to sinusoids",
      ("held" if same else "did not hold",
       f"e_learned vs base: PPL {ours['e_learned']['ppl']:.2f} vs {ours['base']['ppl']:.2f},"
       f" BLEU {ours['e_learned']['bleu']:.1f} vs {ours['base']['bleu']:.1f}"),
      "nearly identical = |dPPL| <= max(seed noise, 2%) and |dBLEU| <= max(seed noise, 0.5)")
  base, ls0 = ours["base"], ours["d_ls0"]
  ppl_held = base["ppl"] - ls0["ppl"] > noise["ppl"]        # smoothing raised perplexity
  bleu_held = base["bleu"] - ls0["bleu"] > noise["bleu"]    # smoothing raised BLEU
  against = (ls0["ppl"] - base["ppl"] > noise["ppl"]) or (ls0["bleu"] - base["bleu"] > noise["bleu"])
  if ppl_held and bleu_held:
    verdict = "held"
  elif ppl_held or bleu_held:
    verdict = f"half held ({'perplexity' if ppl_held else 'BLEU'} only)"
  else:
    verdict = "did not hold" if against else "inconclusive (within seed noise)"
  out.append({"claim": "(D, section 5.4) label smoothing hurts perplexity but improves BLEU",
              "verdict": verdict,
              "evidence": f"eps_ls 0.1 vs 0.0: PPL {base['ppl']:.2f} vs {ls0['ppl']:.2f},"
                          f" BLEU {base['bleu']:.1f} vs {ls0['bleu']:.1f}"})
  return out


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
    if "base_seed1" in ours:
      noise = (ours["base_seed1"][key] / ours["base"][key] if key == "ppl"
               else ours["base_seed1"][key] - ours["base"][key])
      ax.axhline(noise, color="C0", ls=":", lw=1, label="ours: base at seed 1")
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


def _cmd_report(args) -> int:
  root = os.path.abspath(args.root)
  if not os.path.isdir(root):
    print(f"error: {root} is not a directory", file=sys.stderr)
    return 2
  paper = paper_rows()
  ours = {}
  for name in (*ROWS, SEED_ROW):
    run = read_run(root, name)
    if run is not None:
      ours[name] = run
  missing = [r for r in (*ROWS, SEED_ROW) if r not in ours]
  if missing:
    print(f"error: {root}: no finished evaluate step for runs {', '.join(missing)}"
          " (run the sweep to the end first; it resumes)", file=sys.stderr)
    return 2
  noise = {"ppl": abs(ours["base"]["ppl"] - ours[SEED_ROW]["ppl"]),
           "bleu": abs(ours["base"]["bleu"] - ours[SEED_ROW]["bleu"])}
  lines = ["| row | changes (mini) | params | train NLL | dev PPL | dev BLEU | BLEU tok |"
           " paper PPL | paper BLEU | paper params (M) |", "|" + "---|" * 10]
  for name in (*ROWS, SEED_ROW):
    r, p = ours[name], paper.get(name, {})
    changes = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines.append(f"| {name} | {changes} | {r['params']:,} | {fmt(r['train_nll'], '.3f')} |"
                 f" {r['ppl']:.2f} | {r['bleu']:.1f} | {r['bleu_tok']:.1f} |"
                 f" {fmt(p.get('ppl'), '.2f')} | {fmt(p.get('bleu'), '.1f')} |"
                 f" {fmt(p.get('params_m'), 'g')} |")
  table = "\n".join(lines)
  claims = verdicts(ours, noise)
  text = [f"# Mini Table 3 ({root})", "", table, "",
          f"Seed noise (|base - {SEED_ROW}|): dev PPL {noise['ppl']:.3f}, dev BLEU"
          f" {noise['bleu']:.2f}. A gap counts only beyond it.", "",
          "| claim (section 6.2) | at this scale | evidence |", "|---|---|---|"]
  text += [f"| {c['claim']} | **{c['verdict']}** | {c['evidence']} |" for c in claims]
  out_dir = os.path.abspath(args.out or os.path.join(root, "report"))
  os.makedirs(out_dir, exist_ok=True)
  pngs = _plot(ours, paper, out_dir)
  text += ["", *(f"![{os.path.basename(p)}]({p})" for p in pngs)]
  report_path = os.path.join(out_dir, "table3_mini.md")
  with open(report_path, "w", encoding="utf-8") as f:
    f.write("\n".join(text) + "\n")
  with open(os.path.join(out_dir, "table3_mini.json"), "w", encoding="utf-8") as f:
    json.dump({"rows": ours, "noise": noise, "claims": claims}, f, indent=2)
  print("\n".join(text))
  print(f"\nwrote {report_path}, table3_mini.json and {', '.join(map(os.path.basename, pngs))}")
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.table3", allow_abbrev=False,
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("params", help="parameter counts of every Table 3 row vs the paper")
  p.add_argument("--vocab_size", type=int, default=None, help="override the shared vocabulary")
  r = sub.add_parser("report", help="report a finished mini Table 3 sweep")
  r.add_argument("root", help="the sweep's --root")
  r.add_argument("--out", default=None, help="output directory (default ROOT/report)")
  args = parser.parse_args(argv)
  if args.command == "params":
    if args.vocab_size is not None and args.vocab_size <= 0:
      print(f"error: --vocab_size must be positive, got {args.vocab_size}", file=sys.stderr)
      return 2
    return _cmd_params(args)
  return _cmd_report(args)


if __name__ == "__main__":
  sys.exit(main())
