"""Configuration: absl flags -> frozen dataclasses.

The library never reads global FLAGS. `main.py` calls `define_flags()` once and
`from_flags()` to build the frozen dataclasses that every other module takes.
Defaults are the paper's Transformer base (Vaswani et al. 2017, Table 3 "base").

Each field carries its flag's help text and, where it has one, its range check
(`validate`) and its checkpoint rule (`restore="must_match"`: a checkpoint restores only
into a run whose value is the same; see checkpoints.check_compatible) in its metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Optional

from absl import flags


class ConfigError(ValueError):
  """A user-facing configuration problem (one line, no traceback)."""


# Special token ids shared by the tokenizer, the pipeline, the model and decoding.
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3

NON_UTF8_POLICIES = ("replace", "skip")

# Range checks a field can name in its metadata, with their error texts.
_CHECKS = {
    "positive": (lambda v: v > 0, "must be positive"),
    "nonnegative": (lambda v: v >= 0, "must be >= 0"),
    "fraction": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
}


def _field(default: Any, help: str, check: Optional[str] = None,  # pylint: disable=redefined-builtin
           restore: Optional[str] = None) -> Any:
  """A config field: its default, the help text of its flag, an optional range check
  (a key of _CHECKS; None values pass) and an optional checkpoint rule ('must_match')."""
  metadata = {"help": help}
  if check is not None:
    metadata["check"] = check
  if restore is not None:
    metadata["restore"] = restore
  return dataclasses.field(default=default, metadata=metadata)


MUST_MATCH = "must_match"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Section 3 hyperparameters (Table 3 column names in the help texts)."""
  vocab_size: int = _field(37000, "Vocabulary size (shared source+target SentencePiece model).",
                           "positive", MUST_MATCH)
  target_vocab_size: Optional[int] = _field(
      None, "Target vocabulary size when --noshare_embeddings.", "positive", MUST_MATCH)
  num_encoder_layers: int = _field(6, "N, encoder layers.", "positive", MUST_MATCH)
  num_decoder_layers: int = _field(6, "N, decoder layers.", "positive", MUST_MATCH)
  d_model: int = _field(512, "Model width d_model.", "positive", MUST_MATCH)
  d_ff: int = _field(2048, "Inner FFN width d_ff.", "positive", MUST_MATCH)
  num_heads: int = _field(8, "h, attention heads.", "positive", MUST_MATCH)
  d_k: Optional[int] = _field(None, "Query/key width per head (default d_model/h).",
                              "positive", MUST_MATCH)
  d_v: Optional[int] = _field(None, "Value width per head (default d_model/h).",
                              "positive", MUST_MATCH)
  dropout_rate: float = _field(
      0.1, "P_drop: dropout on sublayer outputs and embedding+position sums.", "fraction")
  attention_dropout_rate: float = _field(0.0, "Dropout on attention weights (paper: 0).",
                                         "fraction")
  relu_dropout_rate: float = _field(0.0, "Dropout after the FFN ReLU (paper: 0).", "fraction")
  pre_layer_norm: bool = _field(False, "Pre-LN residual blocks instead of the paper's post-LN.",
                                restore=MUST_MATCH)
  positional_encoding: str = _field("sinusoidal",
                                    "'sinusoidal' (paper) or 'learned' (Table 3 row E).",
                                    restore=MUST_MATCH)
  max_len: int = _field(512, "Longest position the positional table covers.", "positive",
                        MUST_MATCH)
  share_embeddings: bool = _field(True, "One matrix for source/target embeddings and the softmax.",
                                  restore=MUST_MATCH)
  layer_norm_epsilon: float = _field(1e-6, "LayerNorm epsilon.")
  dtype: str = _field("float32", "Compute dtype (float32|bfloat16).")
  param_dtype: str = _field("float32", "Parameter dtype.", restore=MUST_MATCH)
  attention_impl: str = _field(
      "xla", "xla | cudnn: jax.nn.dot_product_attention's fused kernel inside the model's one"
      " attention function; einsum: the plain formula (always used with attention dropout,"
      " d_k != d_v, and by cached decoding's head-major layout).")
  remat: bool = _field(False, "Rematerialise each layer in the backward pass.")
  scan_layers: bool = _field(
      False, "Run the N layers of each stack as one nn.scan (parameters stacked on a leading"
      " 'layers' axis): compile time independent of N. Checkpoints are not interchangeable"
      " with --noscan_layers.", restore=MUST_MATCH)

  @property
  def head_dim_k(self) -> int:
    return self.d_k if self.d_k is not None else self.d_model // self.num_heads

  @property
  def head_dim_v(self) -> int:
    return self.d_v if self.d_v is not None else self.d_model // self.num_heads

  @property
  def output_vocab_size(self) -> int:
    if self.share_embeddings or self.target_vocab_size is None:
      return self.vocab_size
    return self.target_vocab_size


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where sentence pairs come from and how they become batches."""
  task: str = _field("translation", "translation (BLEU) | parsing (EVALB F1, section 6.3).")
  dataset: str = _field(
      "multi30k", "multi30k | parallel_text | wmt14_translate/de-en | wmt14_translate/fr-en |"
      " ptb_wsj (sections 02-21/22/23) | ptb_wsj_sample (NLTK WSJ sample) | craft_treebank"
      " (CRAFT: <raw_data_dir>/{train,dev}/*.tree).")
  source_lang: str = _field("en", "Source language code (translation direction is explicit).")
  target_lang: str = _field("de", "Target language code.")
  raw_data_dir: Optional[str] = _field(None, "Local directory with raw text files (no download).")
  tfds_data_dir: Optional[str] = _field(None, "TFDS data dir (array_record). Default:"
                                        " <workdir>/tfds.")
  train_split: str = _field("train", "Training split.")
  eval_split: str = _field("validation", "Dev split for periodic evaluation.")
  test_split: str = _field(
      "test", "Split scored by --mode=evaluate. --task=parsing: a split with a '/' is a"
      " directory of *.tree / *.mrg files, read directly (e.g. ../craft/test/).")
  parallel_text_splits: str = _field(
      "", "For dataset=parallel_text: 'train=/p/train,validation=/p/dev' prefixes (files"
      " '<prefix>.<lang>').")
  spm_model_type: str = _field(
      "bpe", "SentencePiece model type: bpe (paper) | unigram | word (whole whitespace-separated"
      " words, rarer ones UNK: parsing, where each source token then matches one XX of the"
      " target) | char.")
  spm_character_coverage: float = _field(1.0, "SentencePiece character coverage.")
  spm_max_sentences: int = _field(1_000_000, "Sentences sampled to train SentencePiece.")
  spm_split_by_unicode_script: bool = _field(
      True, "SentencePiece splits letters from punctuation (off for parsing, so '(NP' is one"
      " piece).")
  vocab_path: Optional[str] = _field(
      None, "Existing SentencePiece model (default: <workdir>/spm.model, trained if absent).")
  max_source_length: int = _field(256, "Drop training pairs whose source is longer (tokens).")
  max_target_length: int = _field(256, "Drop training pairs whose target is longer (tokens).")
  tokens_per_batch: int = _field(4096, "Approximate source (and target) tokens per global"
                                 " batch.", "positive")
  bucket_boundaries: str = _field(
      "8,12,16,20,24,32,40,48,64,96,128,192,256", "Comma-separated padded lengths of the bucket"
      " shapes, or auto:K[:M]: the K lengths (multiples of M, default 8) that minimise padding"
      " on the split's length distribution.")
  shuffle_seed: int = _field(0, "Data order seed.")
  eval_tokens_per_batch: int = _field(8192, "Tokens per eval batch.", "positive")
  non_utf8: str = _field("replace", "Policy for undecodable bytes: replace | skip.")
  tokenize_workers: int = _field(0, "Processes that encode a split into its tokenized store,"
                                 " each reading its own rows (0: min(CPUs, 8)).", "nonnegative")
  parsing_extra_train: str = _field(
      "", "Comma-separated extra tree files or directories (their *.tree / *.mrg files) for"
      " training, relative to --raw_data_dir, e.g. for the semi-supervised setting or another"
      " treebank's train split.")
  parse_target: str = _field(
      "xx", "--task=parsing target form: xx (Vinyals et al. 2015, the paper: each word a"
      " placeholder XX, `(S (NP XX )NP ...`) | words (each word itself, `(S (NP John )NP ...`;"
      " constrained decoding forces it to be the next source word; needs"
      " --spm_model_type=word).")
  evalb_params: Optional[str] = _field(None, "EVALB parameter file (default: built-in"
                                       " COLLINS.prm).")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Section 5: optimizer, schedule, regularisation, and the loop."""
  seed: int = _field(0, "Parameter init and dropout seed.")
  num_train_steps: int = _field(100_000, "Training steps.", "positive")
  warmup_steps: int = _field(4000, "warmup_steps of the learning rate schedule.", "positive")
  learning_rate_scale: float = _field(
      1.0, "Multiplier of d_model^-0.5 * min(step^-0.5, step*warmup^-1.5).")
  adam_b1: float = _field(0.9, "Adam beta1.")
  adam_b2: float = _field(0.98, "Adam beta2.")
  adam_eps: float = _field(1e-9, "Adam epsilon.")
  label_smoothing: float = _field(0.1, "eps_ls.", "fraction")
  grad_accum_steps: int = _field(1, "Micro-batches per optimizer step.", "positive")
  log_every_steps: int = _field(50, "Progress line period.", "positive")
  eval_every_steps: int = _field(1000, "Dev evaluation period.", "positive")
  eval_bleu_sentences: int = _field(0, "Dev sentences beam-decoded for BLEU (--task=parsing: F1)"
                                    " at each eval (0: none).")
  eval_beam_size: int = _field(
      0, "Beam size of the periodic dev decode during training (0: --beam_size), e.g. 1 for a"
      " cheap F1 learning curve; --mode=evaluate uses --beam_size.", "nonnegative")
  checkpoint_every_steps: int = _field(1000, "Checkpoint period.", "positive")
  keep_checkpoints: int = _field(20, "Checkpoints kept.", "positive")
  max_train_minutes: float = _field(0.0, "Stop training after this many minutes (0: no limit).")
  nonfinite: str = _field(
      "stop", "On a NaN/Inf loss or gradient: 'stop' (diagnostic, last good checkpoint kept)"
      " or 'skip' the update (counted and logged).")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Section 6.1: beam search."""
  beam_size: int = _field(4, "Beam size (1 = greedy).", "positive")
  alpha: float = _field(0.6, "Length penalty alpha.", "nonnegative")
  max_decode_len_offset: int = _field(50, "Max output length = input length + this.", "positive")
  decode_tokens_per_batch: int = _field(4096, "Source tokens x beam per decoding batch.",
                                        "positive")
  cache_segment: int = _field(
      0, "If > 0, beam search grows its self-attention cache through widths of this many"
      " positions, 2x, 4x, ... up to the output limit, one loop (and one more compiled body)"
      " each, so that steps do not read the whole limit's cache; pays off when many batches"
      " share a shape (0: one loop).", "nonnegative")
  num_average: int = _field(5, "Checkpoints averaged by --mode=average.", "positive")
  average_window_steps: int = _field(
      0, "If > 0, --mode=average averages every checkpoint of the last this many steps"
      " (step > latest - window) instead of --num_average.", "nonnegative")
  tree_constraints: bool = _field(
      True, "--task=parsing: beam search only emits well-formed linearised trees (matching"
      " labelled brackets, one XX per source word).")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh over ('data', 'fsdp', 'tensor'); -1 means 'the rest'."""
  mesh: str = _field("data:-1,fsdp:1,tensor:1",
                     "Mesh shape, e.g. data:-1,fsdp:1,tensor:1 (-1 = the rest).")
  coordinator_address: Optional[str] = _field(
      None, "jax.distributed coordinator host:port (multi-process).")
  num_processes: Optional[int] = _field(None, "jax.distributed process count.")
  process_id: Optional[int] = _field(None, "This process's id.")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  decode: DecodeConfig = DecodeConfig()
  mesh: MeshConfig = MeshConfig()

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    return cls(model=ModelConfig(**d["model"]), data=DataConfig(**d["data"]),
               train=TrainConfig(**d["train"]), decode=DecodeConfig(**d["decode"]),
               mesh=MeshConfig(**d["mesh"]))


_SECTIONS = (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
             ("decode", DecodeConfig), ("mesh", MeshConfig))


def must_match_fields(cls: type = ModelConfig) -> tuple[str, ...]:
  """The fields of `cls` a checkpoint must share with the run restoring it."""
  return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("restore") == MUST_MATCH)


def validate(cfg: Config) -> Config:
  """Every check of a configuration's values (one ConfigError naming the flag)."""
  for name, cls in _SECTIONS:
    section = getattr(cfg, name)
    for field in dataclasses.fields(cls):
      value = getattr(section, field.name)
      if "check" in field.metadata and value is not None:
        ok, text = _CHECKS[field.metadata["check"]]
        if not ok(value):
          raise ConfigError(f"--{field.name} {text}, got {value}")
  m, d, t = cfg.model, cfg.data, cfg.train
  if (m.d_k is None or m.d_v is None) and m.d_model % m.num_heads:
    raise ConfigError(f"--d_model={m.d_model} is not divisible by --num_heads={m.num_heads};"
                      " set --d_k and --d_v explicitly")
  if m.positional_encoding not in ("sinusoidal", "learned"):
    raise ConfigError("--positional_encoding must be 'sinusoidal' or 'learned'")
  if m.attention_impl not in ("einsum", "xla", "cudnn"):
    raise ConfigError("--attention_impl must be one of einsum, xla, cudnn")
  if t.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"--nonfinite must be 'stop' or 'skip', got {t.nonfinite!r}")
  if d.task not in ("translation", "parsing"):
    raise ConfigError(f"--task must be translation or parsing, got {d.task!r}")
  if d.spm_model_type not in ("bpe", "unigram", "word", "char"):
    raise ConfigError("--spm_model_type must be one of bpe, unigram, word, char, got"
                      f" {d.spm_model_type!r}")
  if d.parse_target not in ("xx", "words"):
    raise ConfigError(f"--parse_target must be xx or words, got {d.parse_target!r}")
  if d.parse_target == "words" and d.task == "parsing" and d.spm_model_type != "word":
    raise ConfigError("--parse_target=words needs --spm_model_type=word (one token per word)")
  if d.non_utf8 not in NON_UTF8_POLICIES:
    raise ConfigError(f"--non_utf8 must be one of {NON_UTF8_POLICIES}")
  if d.source_lang == d.target_lang:
    raise ConfigError("--source_lang and --target_lang must differ")
  return cfg


def _flag_fields(cls: type) -> list[dataclasses.Field]:
  """The fields of `cls` that are flags: those with a help text (the others are set by code)."""
  return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per dataclass field, with the field's default and help text."""
  for _, cls in _SECTIONS:
    for field in _flag_fields(cls):
      default, help_ = field.default, field.metadata["help"]
      ftype = field.type if isinstance(field.type, str) else field.type.__name__
      if ftype.startswith("bool"):
        flags.DEFINE_bool(field.name, default, help_, flag_values=flag_values)
      elif "int" in ftype:
        flags.DEFINE_integer(field.name, default, help_, flag_values=flag_values)
      elif "float" in ftype:
        flags.DEFINE_float(field.name, default, help_, flag_values=flag_values)
      else:
        flags.DEFINE_string(field.name, default, help_, flag_values=flag_values)


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Config:
  """Builds and validates the frozen Config from parsed flags."""
  sections = {}
  for name, cls in _SECTIONS:
    sections[name] = cls(**{f.name: flag_values[f.name].value for f in _flag_fields(cls)})
  return validate(Config(**sections))


def from_args(argv: list[str], cwd: Optional[str] = None) -> Config:
  """Config from command-line style arguments, e.g. ['--flagfile=x.flags', '--d_model=256'].

  Uses a private FlagValues, so it never touches the global FLAGS (tests, sweeps, reports).
  With `cwd`, relative --flagfile paths (nested ones too) are read from that directory.
  """
  fv = flags.FlagValues()
  define_flags(fv)
  with contextlib.chdir(cwd) if cwd else contextlib.nullcontext():
    fv(["config"] + list(argv))
  return from_flags(fv)
