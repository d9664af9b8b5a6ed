"""Flag files -> frozen config; parameter counts of the paper's models against closed forms."""

import dataclasses
import glob
import os

import pytest

from tests.test_model import closed_form_params, count_shapes
from transformer import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
  monkeypatch.chdir(REPO)  # nested --flagfile paths are relative to the repository root


@pytest.mark.parametrize("name,paper_millions", [("base_en_de", 65), ("big_en_de", 213)])
def test_paper_models_parameter_count(name, paper_millions):
  cfg = config_lib.from_args([f"--flagfile=experiments/paper/{name}.flags"]).model
  assert cfg.vocab_size == 37000
  want = closed_form_params(V=37000, N=6, d=cfg.d_model, h=cfg.num_heads, d_k=64, d_v=64,
                            d_ff=cfg.d_ff)
  got = count_shapes(cfg)
  assert got == want
  assert abs(got / 1e6 - paper_millions) / paper_millions < 0.05  # 63.0M vs 65M, 214.2M vs 213M


def test_every_flag_file_parses():
  files = sorted(glob.glob("experiments/**/*.flags", recursive=True))
  assert len(files) >= 9
  for f in files:
    config_lib.from_args([f"--flagfile={f}"])


def test_table2_recipe_values():
  big_fr = config_lib.from_args(["--flagfile=experiments/paper/big_en_fr.flags"])
  big_de = config_lib.from_args(["--flagfile=experiments/paper/big_en_de.flags"])
  base = config_lib.from_args(["--flagfile=experiments/paper/base_en_de.flags"])
  assert big_fr.model.dropout_rate == 0.1 and big_de.model.dropout_rate == 0.3
  assert base.decode.num_average == 5 and big_de.decode.num_average == 20
  assert (base.decode.beam_size, base.decode.alpha, base.decode.max_decode_len_offset) == (4, 0.6, 50)
  assert base.data.tokens_per_batch == 25000 and base.train.warmup_steps == 4000
  assert (base.data.source_lang, base.data.target_lang) == ("en", "de")
  assert (big_fr.data.source_lang, big_fr.data.target_lang, big_fr.model.vocab_size) == ("en", "fr", 32000)


@pytest.mark.parametrize("args,message", [
    (["--d_model=0"], "--d_model must be positive"),
    (["--d_model=100", "--num_heads=8"], "not divisible"),
    (["--warmup_steps=0"], "--warmup_steps must be positive"),
    (["--beam_size=0"], "--beam_size must be positive"),
    (["--alpha=-1"], "--alpha must be >= 0"),
    (["--source_lang=en", "--target_lang=en"], "must differ"),
    (["--spm_model_type=wordpiece"], "--spm_model_type must be one of"),
    # ModelConfig.validate
    (["--d_k=0"], "--d_k must be positive, got 0"),
    (["--d_v=-4"], "--d_v must be positive, got -4"),
    (["--target_vocab_size=0"], "--target_vocab_size must be positive, got 0"),
    (["--d_model=100", "--num_heads=8", "--d_k=16"], "set --d_k and --d_v explicitly"),
    (["--dropout_rate=1.0"], r"--dropout_rate must be in \[0, 1\), got 1.0"),
    (["--attention_dropout_rate=-0.1"], r"--attention_dropout_rate must be in \[0, 1\)"),
    (["--positional_encoding=rotary"], "--positional_encoding must be 'sinusoidal' or 'learned'"),
    (["--attention_impl=flash"], "--attention_impl must be one of einsum, xla, cudnn"),
    # TrainConfig.validate
    (["--nonfinite=ignore"], "--nonfinite must be 'stop' or 'skip', got 'ignore'"),
    (["--label_smoothing=1.0"], r"--label_smoothing must be in \[0, 1\), got 1.0"),
    (["--grad_accum_steps=0"], "--grad_accum_steps must be positive, got 0"),
    # DecodeConfig.validate
    (["--max_decode_len_offset=0"], "--max_decode_len_offset must be positive, got 0"),
    (["--cache_segment=-1"], "--cache_segment must be >= 0, got -1"),
    (["--num_average=0"], "--num_average must be positive, got 0"),
    (["--average_window_steps=-5"], "--average_window_steps must be >= 0, got -5"),
    # from_flags
    (["--task=summarization"], "--task must be translation or parsing, got 'summarization'"),
    (["--tokens_per_batch=0"], "--tokens_per_batch must be positive, got 0"),
    (["--eval_tokens_per_batch=0"], "--eval_tokens_per_batch must be positive, got 0"),
    (["--decode_tokens_per_batch=-8"], "--decode_tokens_per_batch must be positive, got -8"),
    (["--non_utf8=ignore"], r"--non_utf8 must be one of \('replace', 'skip'\)"),
])
def test_invalid_values_are_rejected(args, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_args(args)


def test_flags_are_the_fields_with_their_help():
  fv = config_lib.flags.FlagValues()
  config_lib.define_flags(fv)
  fields = {f.name: f for _, cls in config_lib._SECTIONS for f in dataclasses.fields(cls)}
  assert "decode" not in fv  # set by the code, not a flag
  assert set(fv) == set(fields) - {"decode"}
  assert fv["d_ff"].help == "Inner FFN width d_ff." and fv["d_ff"].default == 2048
  for name in fv:
    assert fv[name].help == fields[name].metadata["help"] and fv[name].default == fields[name].default


def test_fields_a_checkpoint_must_share():
  """Shapes, layouts and parameter dtype; not dropout, compute dtype or attention kernel."""
  assert set(config_lib.must_match_fields()) == {
      "vocab_size", "target_vocab_size", "num_encoder_layers", "num_decoder_layers", "d_model",
      "d_ff", "num_heads", "d_k", "d_v", "positional_encoding", "max_len", "share_embeddings",
      "pre_layer_norm", "param_dtype", "scan_layers"}


def test_d_k_d_v_override_divisibility():
  cfg = config_lib.from_args(["--d_model=100", "--num_heads=8", "--d_k=16", "--d_v=16"])
  assert (cfg.model.head_dim_k, cfg.model.head_dim_v) == (16, 16)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "experiments/paper/table3/*.flags"))),
                         ids=os.path.basename)
def test_table3_rows_parameter_count(path):
  full = config_lib.from_args([f"--flagfile={path}"])
  # Table 3: newstest2013 (TFDS validation), no checkpoint averaging.
  assert (full.data.test_split, full.decode.num_average) == ("validation", 1)
  cfg = full.model
  assert cfg.num_encoder_layers == cfg.num_decoder_layers
  want = closed_form_params(V=cfg.vocab_size, N=cfg.num_encoder_layers, d=cfg.d_model,
                            h=cfg.num_heads, d_k=cfg.head_dim_k, d_v=cfg.head_dim_v, d_ff=cfg.d_ff)
  if cfg.positional_encoding == "learned":  # one [max_len, d_model] table per stack
    want += 2 * cfg.max_len * cfg.d_model
  assert count_shapes(cfg) == want
