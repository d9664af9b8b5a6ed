"""Configuration: absl flags -> frozen dataclasses.

The library never reads global FLAGS. `main.py` calls `define_flags()` once and
`from_flags()` to build the frozen dataclasses that every other module takes.
Defaults are the paper's Transformer base (Vaswani et al. 2017, Table 3 "base").
"""

from __future__ import annotations

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Section 3 hyperparameters (Table 3 column names in comments)."""
  vocab_size: int = 37000              # shared source/target vocabulary
  target_vocab_size: Optional[int] = None  # only with share_embeddings=False
  num_encoder_layers: int = 6          # N
  num_decoder_layers: int = 6          # N
  d_model: int = 512                   # d_model
  d_ff: int = 2048                     # d_ff
  num_heads: int = 8                   # h
  d_k: Optional[int] = None            # d_k; None -> d_model // h
  d_v: Optional[int] = None            # d_v; None -> d_model // h
  dropout_rate: float = 0.1            # P_drop (residual + embeddings)
  attention_dropout_rate: float = 0.0  # not in the paper's base model
  relu_dropout_rate: float = 0.0       # not in the paper's base model
  pre_layer_norm: bool = False         # paper: post-LN
  positional_encoding: str = "sinusoidal"  # 'sinusoidal' | 'learned' (row E)
  max_len: int = 512                   # longest position (learned table size)
  share_embeddings: bool = True        # one matrix: source, target and softmax
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"               # compute dtype
  param_dtype: str = "float32"
  attention_impl: str = "xla"          # jax.nn.dot_product_attention: xla (CPU/TPU) | cudnn (GPU) | einsum
  remat: bool = False
  scan_layers: bool = False            # one nn.scan over the N layers (params [N, ...]): compiles once

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

  def validate(self) -> "ModelConfig":
    for name in ("vocab_size", "num_encoder_layers", "num_decoder_layers",
                 "d_model", "d_ff", "num_heads", "max_len"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
    for name in ("d_k", "d_v", "target_vocab_size"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ConfigError(f"--{name} must be positive, got {value}")
    if (self.d_k is None or self.d_v is None) and self.d_model % self.num_heads:
      raise ConfigError(
          f"--d_model={self.d_model} is not divisible by --num_heads={self.num_heads};"
          " set --d_k and --d_v explicitly")
    for name in ("dropout_rate", "attention_dropout_rate", "relu_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
    if self.positional_encoding not in ("sinusoidal", "learned"):
      raise ConfigError("--positional_encoding must be 'sinusoidal' or 'learned'")
    if self.attention_impl not in ("einsum", "xla", "cudnn"):
      raise ConfigError("--attention_impl must be one of einsum, xla, cudnn")
    return self


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where sentence pairs come from and how they become batches."""
  task: str = "translation"        # translation | parsing (section 6.3)
  dataset: str = "multi30k"        # multi30k | parallel_text | wmt14_translate/de-en | ptb_wsj | ...
  source_lang: str = "en"
  target_lang: str = "de"
  raw_data_dir: Optional[str] = None  # local raw files (e.g. ../shared/data/multi30k)
  tfds_data_dir: Optional[str] = None  # where TFDS writes array_record; None -> workdir/tfds
  train_split: str = "train"
  eval_split: str = "validation"
  test_split: str = "test"
  # parallel_text: file prefixes, '<prefix>.<lang>' per split, comma-separated split=prefix.
  parallel_text_splits: str = ""
  spm_model_type: str = "bpe"
  spm_character_coverage: float = 1.0
  spm_max_sentences: int = 1_000_000  # sentences sampled to train the vocabulary
  spm_split_by_unicode_script: bool = True  # False for parsing: '(NP' stays one piece
  vocab_path: Optional[str] = None  # existing SentencePiece model; None -> workdir/spm.model
  max_source_length: int = 256      # training filter (tokens incl. EOS)
  max_target_length: int = 256
  tokens_per_batch: int = 4096      # ~T source + T target tokens per batch
  bucket_boundaries: str = "8,12,16,20,24,32,40,48,64,96,128,192,256"
  shuffle_seed: int = 0
  eval_tokens_per_batch: int = 8192
  non_utf8: str = "replace"         # 'replace' | 'skip'
  tokenize_workers: int = 0         # processes building a tokenized store (0: min(cpus, 8))
  parsing_extra_train: str = ""     # parsing: extra tree files/directories for training
  evalb_params: Optional[str] = None  # parsing: EVALB .prm file; None -> built-in COLLINS.prm


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Section 5: optimizer, schedule, regularisation, and the loop."""
  seed: int = 0
  num_train_steps: int = 100_000
  warmup_steps: int = 4000
  learning_rate_scale: float = 1.0  # multiplies d_model^-0.5 * min(...)
  adam_b1: float = 0.9
  adam_b2: float = 0.98
  adam_eps: float = 1e-9
  label_smoothing: float = 0.1      # eps_ls
  grad_accum_steps: int = 1
  log_every_steps: int = 50
  eval_every_steps: int = 1000
  eval_bleu_sentences: int = 0       # dev sentences decoded at each eval (0: none)
  eval_beam_size: int = 0            # beam of that periodic decode (0: --beam_size)
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 20
  max_train_minutes: float = 0.0     # stop early after this wall time (0: no limit)
  nonfinite: str = "stop"            # NaN/Inf loss or gradient: 'stop' | 'skip' the step
  debug_nan_step: int = 0            # testing aid: poison the loss of this step (0: never)

  def validate(self) -> "TrainConfig":
    for name in ("num_train_steps", "warmup_steps", "grad_accum_steps",
                 "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                 "keep_checkpoints"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
    if self.nonfinite not in ("stop", "skip"):
      raise ConfigError(f"--nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
    if self.eval_beam_size < 0:
      raise ConfigError(f"--eval_beam_size must be >= 0, got {self.eval_beam_size}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
    return self


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Section 6.1: beam search."""
  beam_size: int = 4
  alpha: float = 0.6                 # GNMT length penalty exponent
  max_decode_len_offset: int = 50    # max output length = input length + offset
  decode_tokens_per_batch: int = 4096
  cache_segment: int = 0             # > 0: self-attention cache widths c, 2c, 4c, ...
  num_average: int = 5               # checkpoints averaged by --mode=average
  average_window_steps: int = 0      # > 0: instead, the checkpoints of the last this-many steps
  tree_constraints: bool = True      # --task=parsing: search only well-formed trees

  def validate(self) -> "DecodeConfig":
    if self.beam_size <= 0:
      raise ConfigError(f"--beam_size must be positive, got {self.beam_size}")
    if self.alpha < 0:
      raise ConfigError(f"--alpha must be >= 0, got {self.alpha}")
    if self.max_decode_len_offset <= 0:
      raise ConfigError(f"--max_decode_len_offset must be positive, got {self.max_decode_len_offset}")
    if self.cache_segment < 0:
      raise ConfigError(f"--cache_segment must be >= 0, got {self.cache_segment}")
    if self.num_average <= 0:
      raise ConfigError(f"--num_average must be positive, got {self.num_average}")
    if self.average_window_steps < 0:
      raise ConfigError(
          f"--average_window_steps must be >= 0, got {self.average_window_steps}")
    return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh over ('data', 'fsdp', 'tensor'); -1 means 'the rest'."""
  mesh: str = "data:-1,fsdp:1,tensor:1"
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


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

# Help strings: every dataclass field is a flag of the same name.
_HELP = {
    "vocab_size": "Vocabulary size (shared source+target SentencePiece model).",
    "target_vocab_size": "Target vocabulary size when --noshare_embeddings.",
    "num_encoder_layers": "N, encoder layers.", "num_decoder_layers": "N, decoder layers.",
    "d_model": "Model width d_model.", "d_ff": "Inner FFN width d_ff.",
    "num_heads": "h, attention heads.", "d_k": "Query/key width per head (default d_model/h).",
    "d_v": "Value width per head (default d_model/h).",
    "dropout_rate": "P_drop: dropout on sublayer outputs and embedding+position sums.",
    "attention_dropout_rate": "Dropout on attention weights (paper: 0).",
    "relu_dropout_rate": "Dropout after the FFN ReLU (paper: 0).",
    "pre_layer_norm": "Pre-LN residual blocks instead of the paper's post-LN.",
    "positional_encoding": "'sinusoidal' (paper) or 'learned' (Table 3 row E).",
    "max_len": "Longest position the positional table covers.",
    "share_embeddings": "One matrix for source/target embeddings and the softmax.",
    "layer_norm_epsilon": "LayerNorm epsilon.", "dtype": "Compute dtype (float32|bfloat16).",
    "param_dtype": "Parameter dtype.",
    "attention_impl": "xla | cudnn: jax.nn.dot_product_attention; einsum: the plain reference"
                      " (always used with attention dropout or d_k != d_v). Encoder and"
                      " training only: cached decoding has its own head-major einsum.",
    "remat": "Rematerialise each layer in the backward pass.",
    "scan_layers": "Run the N layers of each stack as one nn.scan (parameters stacked on a"
                   " leading 'layers' axis): compile time independent of N. Checkpoints are"
                   " not interchangeable with --noscan_layers.",
    "task": "translation (BLEU) | parsing (EVALB F1, section 6.3).",
    "dataset": "multi30k | parallel_text | wmt14_translate/de-en | wmt14_translate/fr-en |"
               " ptb_wsj (sections 02-21/22/23) | ptb_wsj_sample (NLTK WSJ sample) |"
               " craft_treebank (CRAFT: <raw_data_dir>/{train,dev}/*.tree).",
    "source_lang": "Source language code (translation direction is explicit).",
    "target_lang": "Target language code.",
    "raw_data_dir": "Local directory with raw text files (no download).",
    "tfds_data_dir": "TFDS data dir (array_record). Default: <workdir>/tfds.",
    "train_split": "Training split.", "eval_split": "Dev split for periodic evaluation.",
    "test_split": "Split scored by --mode=evaluate. --task=parsing: a split with a '/' is a"
                  " directory of *.tree / *.mrg files, read directly (e.g. ../craft/test/).",
    "parallel_text_splits": "For dataset=parallel_text: 'train=/p/train,validation=/p/dev' prefixes.",
    "spm_model_type": "SentencePiece model type: bpe (paper) | unigram | word (whole"
                      " whitespace-separated words, rarer ones UNK: parsing, where each source"
                      " token then matches one XX of the target) | char.",
    "spm_character_coverage": "SentencePiece character coverage.",
    "spm_max_sentences": "Sentences sampled to train SentencePiece.",
    "spm_split_by_unicode_script": "SentencePiece splits letters from punctuation (off for"
                                   " parsing, so '(NP' is one piece).",
    "parsing_extra_train": "Comma-separated extra tree files or directories (their *.tree /"
                           " *.mrg files) for training, relative to --raw_data_dir, e.g. for"
                           " the semi-supervised setting or another treebank's train split.",
    "evalb_params": "EVALB parameter file (default: built-in COLLINS.prm).",
    "vocab_path": "Existing SentencePiece model (default: <workdir>/spm.model, trained if absent).",
    "max_source_length": "Drop training pairs whose source is longer (tokens).",
    "max_target_length": "Drop training pairs whose target is longer (tokens).",
    "tokens_per_batch": "Approximate source (and target) tokens per global batch.",
    "bucket_boundaries": "Comma-separated padded lengths of the bucket shapes, or auto:K[:M]:"
                         " the K lengths (multiples of M, default 8) that minimise padding on"
                         " the split's length distribution.",
    "shuffle_seed": "Data order seed.", "eval_tokens_per_batch": "Tokens per eval batch.",
    "non_utf8": "Policy for undecodable bytes: replace | skip.",
    "tokenize_workers": "Processes that encode a split into its tokenized store, each reading"
                        " its own rows (0: min(CPUs, 8)).",
    "seed": "Parameter init and dropout seed.", "num_train_steps": "Training steps.",
    "warmup_steps": "warmup_steps of the learning rate schedule.",
    "learning_rate_scale": "Multiplier of d_model^-0.5 * min(step^-0.5, step*warmup^-1.5).",
    "adam_b1": "Adam beta1.", "adam_b2": "Adam beta2.", "adam_eps": "Adam epsilon.",
    "label_smoothing": "eps_ls.", "grad_accum_steps": "Micro-batches per optimizer step.",
    "log_every_steps": "Progress line period.", "eval_every_steps": "Dev evaluation period.",
    "eval_bleu_sentences": "Dev sentences beam-decoded for BLEU (--task=parsing: F1) at each"
                           " eval (0: none).",
    "eval_beam_size": "Beam size of the periodic dev decode during training (0: --beam_size),"
                      " e.g. 1 for a cheap F1 learning curve; --mode=evaluate uses --beam_size.",
    "checkpoint_every_steps": "Checkpoint period.", "keep_checkpoints": "Checkpoints kept.",
    "max_train_minutes": "Stop training after this many minutes (0: no limit).",
    "nonfinite": "On a NaN/Inf loss or gradient: 'stop' (diagnostic, last good checkpoint kept)"
                 " or 'skip' the update (counted and logged).",
    "debug_nan_step": "Testing aid: make the loss of this step NaN (0: never).",
    "beam_size": "Beam size (1 = greedy).", "alpha": "Length penalty alpha.",
    "max_decode_len_offset": "Max output length = input length + this.",
    "decode_tokens_per_batch": "Source tokens x beam per decoding batch.",
    "cache_segment": "If > 0, beam search grows its self-attention cache through widths of"
                     " this many positions, 2x, 4x, ... up to the output limit, one loop (and"
                     " one more compiled body) each, so that steps do not read the whole"
                     " limit's cache; pays off when many batches share a shape (0: one loop).",
    "num_average": "Checkpoints averaged by --mode=average.",
    "average_window_steps": "If > 0, --mode=average averages every checkpoint of the last this"
                            " many steps (step > latest - window) instead of --num_average.",
    "tree_constraints": "--task=parsing: beam search only emits well-formed linearised trees"
                        " (matching labelled brackets, one XX per source word).",
    "mesh": "Mesh shape, e.g. data:-1,fsdp:1,tensor:1 (-1 = the rest).",
    "coordinator_address": "jax.distributed coordinator host:port (multi-process).",
    "num_processes": "jax.distributed process count.", "process_id": "This process's id.",
}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per dataclass field, defaults from the dataclasses."""
  for _, cls in _SECTIONS:
    for field in dataclasses.fields(cls):
      default = field.default
      help_ = _HELP[field.name]
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
    sections[name] = cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls)})
  cfg = Config(**sections)
  cfg.model.validate()
  cfg.train.validate()
  cfg.decode.validate()
  if cfg.data.task not in ("translation", "parsing"):
    raise ConfigError(f"--task must be translation or parsing, got {cfg.data.task!r}")
  if cfg.data.tokenize_workers < 0:
    raise ConfigError(f"--tokenize_workers must be >= 0, got {cfg.data.tokenize_workers}")
  if cfg.data.tokens_per_batch <= 0:
    raise ConfigError(f"--tokens_per_batch must be positive, got {cfg.data.tokens_per_batch}")
  if cfg.data.spm_model_type not in ("bpe", "unigram", "word", "char"):
    raise ConfigError("--spm_model_type must be one of bpe, unigram, word, char, got"
                      f" {cfg.data.spm_model_type!r}")
  if cfg.data.source_lang == cfg.data.target_lang:
    raise ConfigError("--source_lang and --target_lang must differ")
  return cfg


def from_args(argv: list[str]) -> Config:
  """Config from command-line style arguments, e.g. ['--flagfile=x.flags', '--d_model=256'].

  Uses a private FlagValues, so it never touches the global FLAGS (tests, sweeps, reports).
  """
  fv = flags.FlagValues()
  define_flags(fv)
  fv(["config"] + list(argv))
  return from_flags(fv)
