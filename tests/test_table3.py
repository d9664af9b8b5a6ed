"""launch/table3.py: the paper's Table 3 numbers, the vocabulary solve, claim verdicts, report."""

from __future__ import annotations

import json
import os

import pytest

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
  ppl = {"base": 10.0, "base_seed1": 10.1, "base_seed2": 10.05, "base_2x": 9.8, "a_h1": 11.0,
         "a_h4": 10.2, "a_h16": 9.9, "a_h32": 10.5, "b_dk16": 10.8, "b_dk32": 10.4, "c_n2": 12.0,
         "c_n4": 10.6, "c_n8": 9.6, "c_d256": 12.5, "c_d1024": 9.0, "c_dff1024": 10.5,
         "c_dff4096": 9.7, "d_drop0": 10.6, "d_drop02": 10.1, "d_ls0": 9.5, "d_ls02": 10.3,
         "e_learned": 10.05, "big": 8.8}
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


NOISE = {"ppl": 0.1, "bleu": 0.2}


def test_every_claim_held_on_numbers_made_to_hold():
  claims = table3.verdicts(_ours(), NOISE)
  assert all(c["verdict"] == "held" for c in claims), claims
  assert len(claims) == 10  # A x2, B, C x4, D dropout, E, D label smoothing


def test_verdict_did_not_hold_when_the_gap_goes_the_other_way_beyond_the_noise():
  claims = table3.verdicts(_ours(a_h1=9.0, c_n8=12.5), NOISE)
  assert _verdict(claims, "(A) single-head") == "did not hold"       # h=1 is the best
  assert _verdict(claims, "(C) bigger models are better: N") == "did not hold"
  assert _verdict(claims, "(C) bigger models are better: d_model") == "held"


def test_verdict_inconclusive_when_the_gap_is_within_the_noise():
  # h=32 at 9.95 against the best of h=4/8/16 (a_h16, 9.9): 0.05 < 0.1.
  claims = table3.verdicts(_ours(a_h32=9.95), NOISE)
  assert _verdict(claims, "(A) quality drops off") == "inconclusive (within seed noise)"
  # The same gap with a smaller noise counts.
  claims = table3.verdicts(_ours(a_h32=9.95), {"ppl": 0.01, "bleu": 0.01})
  assert _verdict(claims, "(A) quality drops off") == "held"


def test_verdict_nearly_identical_for_learned_positions():
  # |10.05 - 10.0| = 0.05 <= max(noise 0.1, 2% of 10 = 0.2) and |dBLEU| 0.1 <= 0.5 -> held.
  assert _verdict(table3.verdicts(_ours(), NOISE), "(E)") == "held"
  # 10.25: 0.25 > 0.2 -> not nearly identical, though it is better by less than a point.
  assert _verdict(table3.verdicts(_ours(e_learned=10.25), NOISE), "(E)") == "did not hold"


def test_claims_with_a_missing_row_are_not_judged():
  ours = _ours()
  for row in ("a_h32", "c_d1024", "d_ls0"):
    del ours[row]
  claims = table3.verdicts(ours, NOISE)
  assert len(claims) == 10
  # h=32 is in both head claims: the best head count is not known without it.
  for prefix in ("(A) single-head", "(A) quality drops off", "(C) bigger models are better: d_model",
                 "(D, section 5.4)"):
    assert _verdict(claims, prefix) == table3.NOT_RUN
  assert [c["pairs"] for c in claims if c["verdict"] == table3.NOT_RUN] == [[], [], [], []]
  assert sum(c["verdict"] == "held" for c in claims) == 6


def test_verdict_label_smoothing_has_two_halves():
  ours = _ours()
  ours["d_ls0"]["bleu"] = 31.0  # PPL better without smoothing, but BLEU better too
  assert _verdict(table3.verdicts(ours, NOISE), "(D, section 5.4)") == (
      "half held (perplexity only)")
  ours["d_ls0"].update(ppl=10.05, bleu=29.0)  # PPL within noise, BLEU better with smoothing
  assert _verdict(table3.verdicts(ours, NOISE), "(D, section 5.4)") == "half held (BLEU only)"
  ours["d_ls0"].update(ppl=10.05, bleu=30.1)
  assert _verdict(table3.verdicts(ours, NOISE), "(D, section 5.4)") == (
      "inconclusive (within seed noise)")
  ours["d_ls0"].update(ppl=11.0, bleu=31.0)  # smoothing lowered PPL and BLEU
  assert _verdict(table3.verdicts(ours, NOISE), "(D, section 5.4)") == "did not hold"


def test_rows_are_grouped_by_seed_and_the_noise_is_the_base_spread():
  assert table3.row_and_seed("c_n8") == ("c_n8", 0)
  assert table3.row_and_seed("c_n8_seed2") == ("c_n8", 2)
  assert table3.row_and_seed("base_seed10") == ("base", 10)
  rec = lambda ppl, bleu: {"ppl": ppl, "bleu": bleu, "dev_nll": 2.0, "bleu_tok": bleu,  # noqa: E731
                           "train_nll": 1.0, "params": 7, "overrides": {}}
  rows = table3.by_row({"base": rec(10.0, 30.0), "base_seed1": rec(10.6, 29.0),
                        "base_seed2": rec(10.3, 29.9), "a_h1": rec(12.0, 25.0)})
  assert rows["base"]["seeds"] == [0, 1, 2]
  assert abs(rows["base"]["ppl"] - 10.3) < 1e-12 and abs(rows["base"]["bleu"] - 29.633333) < 1e-6
  assert rows["a_h1"]["seeds"] == [0] and rows["a_h1"]["ppl"] == 12.0
  noise = table3.seed_noise(rows)
  assert abs(noise["ppl"] - 0.6) < 1e-12 and abs(noise["bleu"] - 1.0) < 1e-12
  with pytest.raises(ValueError, match="at least 4 seeds of the base; have 3"):
    table3.seed_noise(rows, min_seeds=4)


def test_rows_within_twice_the_noise_get_a_second_seed():
  ours = _ours(a_h32=10.05, c_d1024=9.0)
  for r in ours.values():
    r["seeds"] = [0]
  ours["a_h16"]["seeds"] = [0, 1]
  claims = table3.verdicts(ours, NOISE)
  # (A) many heads: a_h16 (9.9, two seeds) vs a_h32 (10.05): 0.15 <= 2 x 0.1 -> a_h32 only.
  # (E): e_learned 10.05 vs base 10.0 -> both. (B) base vs b_dk32 (10.4): 0.4 > 0.2, and BLEU
  # 0.8 > 0.4 -> not close. Everything else is further apart than twice the noise.
  need = table3.rows_needing_a_seed(ours, claims, NOISE)
  assert need == ["base", "a_h32", "e_learned"], need
  spec = {"base_flagfile": "b.flags", "flags": {"x": 1}, "steps": ["train", "evaluate"],
          "runs": [{"name": "base"}, {"name": "a_h32", "flags": {"num_heads": 32}},
                   {"name": "e_learned", "flags": {"positional_encoding": "learned"}}]}
  second = table3.second_seed_spec(spec, need, seed=1)
  assert [r["name"] for r in second["runs"]] == ["base_seed1", "a_h32_seed1", "e_learned_seed1"]
  assert second["runs"][1]["flags"] == {"num_heads": 32, "seed": 1, "shuffle_seed": 1}
  assert second["flags"] == {"x": 1} and second["steps"] == ["train", "evaluate"]
  with pytest.raises(ValueError, match="not runs of the spec"):
    table3.second_seed_spec(spec, ["c_n8"])


def test_converged_compares_the_budget_with_twice_it():
  short = {"step": 1000, "ppl": 10.4}
  assert table3.converged(short, {"step": 2000, "ppl": 10.0})["converged"]       # 4% above
  result = table3.converged(short, {"step": 2000, "ppl": 9.8})                    # 6.1% above
  assert not result["converged"] and abs(result["relative_gap"] - (10.4 / 9.8 - 1)) < 1e-12


def test_converged_on_one_runs_curve(tmp_path, capsys):
  curve = [{"step": s, "nll": 0.0, "perplexity": p}
           for s, p in ((1000, 20.0), (2000, 10.4), (3000, 10.1), (4000, 10.0))]
  record = {"name": "lr1.0", "step": 4000, "ppl": 10.0, "curve": curve}
  result = table3.converged_on_curve(record, 2000)              # 10.4 / 10.0: 4% above
  assert result["converged"] and (result["budget_steps"], result["double_steps"]) == (2000, 4000)
  assert not table3.converged_on_curve(record, 1000)["converged"]  # 20.0 / 10.4
  with pytest.raises(ValueError, match="no dev perplexity at step 6000"):
    table3.converged_on_curve(record, 3000)
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "lr1.0.json").write_text(json.dumps(record))
  png = tmp_path / "budget.png"
  args = ["converged", str(tmp_path / "runs"), "--run=lr1.0", f"--png={png}"]
  assert table3.main(args + ["--budget=2000"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["converged"] and abs(out["relative_gap"] - 0.04) < 1e-12
  assert png.stat().st_size > 10_000
  assert table3.main(args + ["--budget=1000"]) == 1                # not converged: exit 1
  capsys.readouterr()
  for bad, message in ((["--budget=3000"], "no dev perplexity at step 6000"),
                       ([], "--run needs a positive --budget"),
                       (["--budget=2000", "--short=lr1.0", "--long=lr1.0"], "give --short")):
    assert table3.main(args + bad) == 2
    assert message in capsys.readouterr().err


def _write_hand_made_sweep(root, ours):
  """The runs of the committed mini Table 3 spec and of its budget check, as finished workdirs."""
  runs = []
  for name in ("table3_mini.json", "table3_budget.json"):
    spec = sweep.load_spec(os.path.join(table3.REPO, "experiments", "sweeps", name))
    runs += sweep.expand(spec, str(root))
  for run in runs:
    workdir = root / run["name"]
    workdir.mkdir(parents=True)
    (workdir / "run.json").write_text(json.dumps({"name": run["name"], "flags": run["flags"],
                                                  "overrides": run["overrides"]}))
    r = ours[run["name"]]
    (workdir / "validation.latest.json").write_text(json.dumps({
        "step": 400, "test_perplexity": r["ppl"], "test_nll": r["dev_nll"], "sacrebleu": r["bleu"],
        "bleu_tok_compound_split": r["bleu"] + 0.1}))
    (workdir / "metrics.jsonl").write_text(
        json.dumps({"kind": "eval", "step": 200, "nll": 2.5, "perplexity": 12.2}) + "\n"
        + json.dumps({"kind": "train", "step": 400, "nll": r["train_nll"]}) + "\n"
        + json.dumps({"kind": "eval", "step": 400, "nll": r["dev_nll"], "perplexity": r["ppl"]})
        + "\n")
    (workdir / "status.json").write_text(json.dumps(
        {"steps": {"train": {"seconds": 300.0}, "evaluate": {"seconds": 60.0}}}))
  return runs


def test_report_of_a_hand_made_sweep_and_of_its_records(tmp_path, capsys):
  ours = _ours()
  runs = _write_hand_made_sweep(tmp_path / "sweep", ours)
  assert [r["name"] for r in runs] == ["base", "base_seed1", "base_seed2",
                                       *table3.ROWS[1:-1], "big", "base_2x"]
  root = str(tmp_path / "sweep")
  # Fewer seeds of the base than asked for: an error, not a verdict.
  assert table3.main(["report", root, "--min_seeds=4"]) == 2
  assert "needs at least 4 seeds of the base; have 3" in capsys.readouterr().err
  assert table3.main(["report", root]) == 0
  out = capsys.readouterr().out
  assert "| a_h1 | num_heads=1, d_k=128, d_v=128 | " in out
  # base is the mean of 10.0, 10.1 and 10.05; the spread 0.1 is the noise.
  assert "| base | - | 1,895,936 | 3 | 1.500 | 10.05 | " in out
  assert out.count("**held**") == 10, out
  assert "nearly identical = \\|dPPL\\| <= max(seed noise, 2%) and \\|dBLEU\\|" in out
  assert "dev PPL 0.100, dev BLEU 0.20" in out
  # The budget check: seed 0 of the base (10.0) against base_2x (9.8) is 2.0% above.
  assert ("reaches dev PPL 10.00 at 400 steps and 9.80 at 400 (base_2x): +2.0%, within 5%:"
          " converged.") in out
  assert "Run time summed over the 23 runs (train + evaluate steps; runs in parallel share the" \
         " wall time): 2.30 h." in out
  for png in ("table3_mini_rows.png", "table3_mini_blocks.png", "table3_mini_base_curves.png",
              "table3_mini_budget.png"):
    assert (tmp_path / "sweep" / "report" / png).stat().st_size > 10_000
  # The same report from the committed records, with no sweep directory at all.
  assert table3.main(["record", root, f"--out={tmp_path / 'records'}"]) == 0
  capsys.readouterr()
  record = json.loads((tmp_path / "records" / "c_n8.json").read_text())
  assert record["curve"] == [{"step": 200, "nll": 2.5, "perplexity": 12.2},
                             {"step": 400, "nll": 2.0, "perplexity": 9.6}]
  assert record["seconds"] == {"train": 300.0, "evaluate": 60.0}
  assert not any("tfds_data_dir" in f or "vocab_path" in f for f in record["flags"])
  assert table3.main(["report", str(tmp_path / "records"), f"--out={tmp_path / 'r2'}"]) == 0
  out2 = capsys.readouterr().out
  assert out2.split("\n", 1)[1] == out.split("\n", 1)[1].replace(
      str(tmp_path / "sweep" / "report"), str(tmp_path / "r2"))
  # A sweep with a run missing is an error, not a partial verdict.
  (tmp_path / "sweep" / "c_n8" / "validation.latest.json").unlink()
  assert table3.main(["report", root]) == 2
  assert "no finished evaluate step for runs c_n8" in capsys.readouterr().err
  # ... unless asked for a partial report: the row is listed as not run, its claim not judged.
  assert table3.main(["report", root, "--partial", f"--out={tmp_path / 'r3'}"]) == 0
  out3 = capsys.readouterr().out
  assert out3.startswith(f"# Mini Table 3 ({root}): partial, 19 of 20 rows")
  assert "| c_n8 | not run yet | | | | | | | 4.88 | 25.5 | 80 |" in out3
  assert "| (C) bigger models are better: N | **not run yet** | no result for c_n8 |" in out3
  assert out3.count("**held**") == 9, out3
  assert (tmp_path / "r3" / "table3_mini_blocks.png").stat().st_size > 10_000


def test_remaining_lists_the_runs_without_a_record(tmp_path, capsys):
  """A sweep continued on another disk from the committed records runs only the others."""
  spec_path = os.path.join(table3.REPO, "experiments", "sweeps", "table3_mini.json")
  spec = sweep.load_spec(spec_path)
  records = tmp_path / "records"
  records.mkdir()
  done = {"base", "a_h16", "big"}
  for run in spec["runs"]:
    if run["name"] in done:
      (records / f"{run['name']}.json").write_text(json.dumps(
          {"name": run["name"], "ppl": 10.0, "overrides": run.get("flags", {})}))
  out = tmp_path / "R" / "left.json"  # its directory is made
  args = ["remaining", str(records), f"--spec={spec_path}", f"--out={out}"]
  assert table3.main(args) == 0
  left = json.loads(out.read_text())
  assert [r["name"] for r in left["runs"]] == [r["name"] for r in spec["runs"]
                                               if r["name"] not in done]
  assert left["runs"][0] == spec["runs"][1]  # base_seed1, unchanged
  assert {k: v for k, v in left.items() if k not in ("runs", "description")} == {
      k: v for k, v in spec.items() if k not in ("runs", "description")}
  assert "(3 of 22 recorded)" in left["description"]
  assert [r["name"] for r in sweep.expand(left, str(tmp_path / "R"))] == [
      r["name"] for r in left["runs"]]
  assert "wrote" in capsys.readouterr().out
  # A record made with other flags than the spec's: an error, nothing written.
  (records / "a_h16.json").write_text(json.dumps(
      {"name": "a_h16", "ppl": 10.0, "overrides": {"num_heads": 2}}))
  out.unlink()
  assert table3.main(args) == 2
  assert "records a_h16 were made with other flags" in capsys.readouterr().err
  assert not out.exists()
  assert table3.main(["remaining", str(tmp_path / "nowhere"), f"--spec={spec_path}",
                      f"--out={out}"]) == 2
  assert "is not a directory" in capsys.readouterr().err
  for run in spec["runs"]:  # every run recorded: nothing to run
    (records / f"{run['name']}.json").write_text(json.dumps(
        {"name": run["name"], "ppl": 10.0, "overrides": run.get("flags", {})}))
  assert table3.main(args) == 0
  assert "nothing to run" in capsys.readouterr().out and not out.exists()
