"""Pictures of a run: learning curves from metrics.jsonl, attention heatmaps (paper Figs. 3-5)."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import jax
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from transformer.io_utils import atomic_write
from transformer.config import ModelConfig
from transformer.metrics_writer import read_metrics
from transformer.model import Transformer


def plot_run(workdir: str, out_path: Optional[str] = None) -> str:
  """Learning curves of <workdir>/metrics.jsonl -> out_path (default
  <workdir>/plots/learning_curves.png)."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    raise FileNotFoundError(f"no metrics.jsonl in {workdir}: train first")
  return plot_learning_curves(
      workdir, out_path or os.path.join(workdir, "plots", "learning_curves.png"))


def plot_learning_curves(workdir: str, out_path: str) -> str:
  """Train/dev loss, dev perplexity, dev BLEU and learning rate against step, one PNG."""
  train = read_metrics(workdir, "train")
  evals = read_metrics(workdir, "eval")
  if not train:
    raise ValueError(f"{workdir}/metrics.jsonl has no training records yet")
  fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
  ax = axes[0, 0]
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (smoothed)")
  ax.plot([r["step"] for r in train], [r["nll"] for r in train], label="train NLL")
  if evals:
    ax.plot([r["step"] for r in evals], [r["nll"] for r in evals], "o-", label="dev NLL")
  ax.set(title="loss per target token", xlabel="step", ylabel="nats")
  ax.legend()
  ax = axes[0, 1]
  if evals:
    ax.plot([r["step"] for r in evals], [r["perplexity"] for r in evals], "o-")
    ax.set_yscale("log")
  ax.set(title="dev perplexity", xlabel="step")
  ax = axes[1, 0]
  bleu = [r for r in evals if "bleu" in r]
  f1 = [r for r in evals if "f1" in r]  # --task=parsing
  if bleu:
    ax.plot([r["step"] for r in bleu], [r["bleu"] for r in bleu], "o-")
  if f1:
    ax.plot([r["step"] for r in f1], [r["f1"] for r in f1], "o-", label="all trees")
    sent = [r for r in f1 if "sentence_f1" in r]
    if sent:
      ax.plot([r["step"] for r in sent], [r["sentence_f1"] for r in sent], "s--",
              label="sentence trees")
    ax.legend()
  ax.set(title=("dev F1 (EVALB; subset decoded during training)" if f1 and not bleu
                else "dev sacreBLEU (subset decoded during training)"), xlabel="step")
  ax = axes[1, 1]
  ax.plot([r["step"] for r in train], [r["lr"] for r in train])
  ax.set(title="learning rate", xlabel="step")
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  _save(fig, out_path)
  return out_path


def plot_attention(weights: Sequence[np.ndarray], queries: Sequence[str], keys: Sequence[str],
                   title: str, out_path: str) -> str:
  """One heatmap per layer (rows) and head (columns).

  weights: per layer [heads, len(queries), len(keys)].
  """
  layers, heads = len(weights), weights[0].shape[0]
  cell = max(2.2, 0.28 * max(len(queries), len(keys)))
  fig, axes = plt.subplots(layers, heads, figsize=(cell * heads, cell * layers), dpi=80,
                           squeeze=False)
  for i, w in enumerate(weights):
    for h in range(heads):
      ax = axes[i, h]
      ax.imshow(w[h], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
      ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
      ax.set_yticks(range(len(queries)), queries, fontsize=7)
      ax.set_title(f"layer {i + 1} head {h + 1}", fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, out_path)
  return out_path


def plot_attention_maps(model_cfg: ModelConfig, params, source: np.ndarray, target: np.ndarray,
                        id_to_piece: Callable[[int], str], step: int, out_dir: str) -> list[str]:
  """The encoder self-, decoder self- and encoder-decoder attention of one sentence pair, each
  as `plot_attention` heatmaps of every layer and head: <out_dir>/attention_<stack>_<name>.png.

  source: [src_len] ids (with EOS); target: [tgt_len] ids, e.g. the beam search's output.
  """
  src, tgt = source[None], target[None]  # [1, len]
  model = Transformer(model_cfg)  # sows attention weights: "intermediates" is mutable
  _, inter = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y, mutable=["intermediates"]))(
      params, src, tgt)
  inter = jax.device_get(inter["intermediates"])
  pieces = lambda ids: [id_to_piece(int(i)) for i in ids]
  src_tok, tgt_tok = pieces(src[0]), pieces(tgt[0])
  dec_in = ["<s>"] + tgt_tok[:-1]  # decoder inputs: BOS + shifted target
  kinds = [("encoder", "self_attention", src_tok, src_tok, "encoder self-attention"),
           ("decoder", "self_attention", dec_in, dec_in, "decoder self-attention (masked)"),
           ("decoder", "cross_attention", dec_in, src_tok, "encoder-decoder attention")]
  paths = []
  for stack, name, q, k, title in kinds:
    n = model_cfg.num_encoder_layers if stack == "encoder" else model_cfg.num_decoder_layers
    weights = [np.asarray(inter[stack][f"layer_{i}"][name]["attention_weights"][0])[0]
               for i in range(n)]
    path = os.path.join(out_dir, f"attention_{stack}_{name}.png")
    paths.append(plot_attention(weights, q, k, f"{title} (step {step})", path))
  return paths


def _save(fig, out_path: str) -> None:
  with atomic_write(out_path) as f:
    fig.savefig(f, format="png")
  plt.close(fig)
