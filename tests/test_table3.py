"""launch/table3.py: the paper's Table 3 numbers, the vocabulary solve, claim verdicts, report."""

from __future__ import annotations

import json
import os

from launch import sweep, table3


def test_paper_numbers_are_read_from_the_flag_file_headers():
  paper = table3.paper_rows()
  assert set(table3.ROWS) <= set(paper)
  assert (paper["base"]["ppl"], paper["base"]["bleu"], paper["base"]["params_m"]) == (
      4.92, 25.8, 65)
  assert (paper["a_h1"]["ppl"], paper["a_h1"]["bleu"], paper["a_h1"]["params_m"]) == (
      5.29, 24.9, None)
  assert (paper["big"]["ppl"], paper["big"]["bleu"], paper["big"]["params_m"]) == (
      4.33, 26.4, 213)
  assert paper["c_d256"]["params_m"] == 28 and paper["b_dk16"]["params_m"] == 58


def test_vocab_interval_by_hand():
  # Base at V=37000: 63,045,632 params, 18,944,000 of them the embedding -> 44,101,632 + 512 V.
  # round(. / 1e6) == 65  <=>  64.5e6 <= 44,101,632 + 512 V < 65.5e6  <=>  39,841 <= V <= 41,793.
  base = {"ours": 63_045_632, "vocab": 37000, "d_model": 512, "paper_m": 65}
  assert table3.vocab_interval([base]) == (39_841, 41_793)
  # With d_model=256 (37000 -> 26,816,512; paper 28): 17,344,512 + 256 V in [27.5e6, 28.5e6)
  # <=> 39,669.9 <= V < 43,576.1 (10,155,488 / 256 and 11,155,488 / 256) <=> 39,670..43,576.
  d256 = {"ours": 26_816_512, "vocab": 37000, "d_model": 256, "paper_m": 28}
  assert table3.vocab_interval([d256]) == (39_670, 43_576)
  assert table3.vocab_interval([base, d256]) == (39_841, 41_793)
  # Disjoint requirements -> an empty interval.
  big = {"ours": 214_171_648, "vocab": 37000, "d_model": 1024, "paper_m": 213}
  lo, hi = table3.vocab_interval([base, big])
  assert lo > hi


def test_params_table_solves_the_paper_vocabulary():
  rows = table3.params_table()
  by_name = {r["row"]: r for r in rows}
  assert by_name["base"]["ours"] == 63_045_632 and by_name["big"]["ours"] == 214_171_648
  family = [r for r in rows if r["paper_m"] is not None and r["row"] != "big"]
  assert len(family) == 10  # base, B x2, C x7
  assert table3.vocab_interval(family) == (41_004, 41_208)
  assert table3.vocab_interval([by_name["big"]]) == (35_368, 36_344)
  # At V=41,100 every base-family row lands on the paper's number.
  for r in table3.params_table(vocab_size=41_100):
    if r["paper_m"] is not None and r["row"] != "big":
      assert round(r["ours"] / 1e6) == r["paper_m"], r


def _ours(**changes):
  """Hand-made mini results in which every claim of section 6.2 holds (noise 0.1 PPL)."""
  ppl = {"base": 10.0, "base_seed1": 10.1, "a_h1": 11.0, "a_h4": 10.2, "a_h16": 9.9,
         "a_h32": 10.5, "b_dk16": 10.8, "b_dk32": 10.4, "c_n2": 12.0, "c_n4": 10.6, "c_n8": 9.6,
         "c_d256": 12.5, "c_d1024": 9.0, "c_dff1024": 10.5, "c_dff4096": 9.7, "d_drop0": 10.6,
         "d_drop02": 10.1, "d_ls0": 9.5, "d_ls02": 10.3, "e_learned": 10.05, "big": 8.8}
  ppl.update(changes)
  # BLEU falls 2 points per PPL point; ls0 is the exception (lower PPL, lower BLEU).
  out = {k: {"ppl": v, "bleu": 30 - 2 * (v - 10), "dev_nll": 2.0, "train_nll": 1.5}
         for k, v in ppl.items()}
  out["d_ls0"]["bleu"] = 29.0
  out["d_drop0"]["train_nll"] = 1.0  # bigger train/dev gap without dropout
  return out


def _verdict(claims, prefix):
  (match,) = [c for c in claims if c["claim"].startswith(prefix)]
  return match["verdict"]


def test_verdicts_follow_the_numbers():
  noise = {"ppl": 0.1, "bleu": 0.2}
  claims = table3.verdicts(_ours(), noise)
  assert all(c["verdict"] == "held" for c in claims), claims
  assert len(claims) == 10  # A x2, B, C x4, D dropout, E, D label smoothing
  # h=1 best -> single-head claim fails; h=32 within noise of the best -> inconclusive.
  claims = table3.verdicts(_ours(a_h1=9.0, a_h32=9.95), noise)
  assert _verdict(claims, "(A) single-head") == "did not hold"
  assert _verdict(claims, "(A) quality drops off") == "inconclusive (within seed noise)"
  # A larger model worse beyond the noise -> did not hold; learned positions far off -> not ~.
  claims = table3.verdicts(_ours(c_n8=12.5, e_learned=11.0), noise)
  assert _verdict(claims, "(C) bigger models are better: N") == "did not hold"
  assert _verdict(claims, "(E)") == "did not hold"
  assert _verdict(claims, "(C) bigger models are better: d_model") == "held"
  # Label smoothing: PPL better without it but BLEU too -> only the perplexity half holds.
  claims = table3.verdicts(_ours(d_ls0=9.5), noise)
  ours = _ours()
  ours["d_ls0"]["bleu"] = 31.0
  assert _verdict(table3.verdicts(ours, noise), "(D, section 5.4)") == (
      "half held (perplexity only)")
  # Both gaps within the noise -> inconclusive; both the other way -> did not hold.
  ours["d_ls0"].update(ppl=10.05, bleu=30.1)
  assert _verdict(table3.verdicts(ours, noise), "(D, section 5.4)") == (
      "inconclusive (within seed noise)")
  ours["d_ls0"].update(ppl=11.0, bleu=31.0)  # smoothing lowered PPL and BLEU
  assert _verdict(table3.verdicts(ours, noise), "(D, section 5.4)") == "did not hold"


def test_report_of_a_hand_made_sweep(tmp_path, capsys):
  spec = sweep.load_spec(os.path.join(table3.REPO, "experiments", "sweeps", "table3_mini.json"))
  runs = sweep.expand(spec, str(tmp_path))
  assert [r["name"] for r in runs] == ["base", "base_seed1", *table3.ROWS[1:]]
  ours = _ours()
  for run in runs:
    workdir = tmp_path / run["name"]
    workdir.mkdir()
    (workdir / "run.json").write_text(json.dumps({"name": run["name"], "flags": run["flags"],
                                                  "overrides": run["overrides"]}))
    r = ours[run["name"]]
    (workdir / "validation.latest.json").write_text(json.dumps({
        "step": 400, "test_perplexity": r["ppl"], "test_nll": r["dev_nll"], "sacrebleu": r["bleu"],
        "bleu_tok_compound_split": r["bleu"] + 0.1}))
    (workdir / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 400, "nll": r["train_nll"]}) + "\n")
  assert table3.main(["report", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "| a_h1 | num_heads=1, d_k=128, d_v=128 | " in out
  assert out.count("**held**") == 10
  assert "Seed noise (|base - base_seed1|): dev PPL 0.100, dev BLEU 0.20" in out
  for png in ("table3_mini_rows.png", "table3_mini_blocks.png"):
    assert (tmp_path / "report" / png).stat().st_size > 10_000
  # A sweep with a run missing is an error, not a partial verdict.
  (tmp_path / "c_n8" / "validation.latest.json").unlink()
  assert table3.main(["report", str(tmp_path)]) == 2
  assert "no finished evaluate step for runs c_n8" in capsys.readouterr().err
