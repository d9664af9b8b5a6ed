"""Pictures of a run: learning curves from metrics.jsonl, attention heatmaps (paper Figs. 3-5)."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from transformer.io_utils import atomic_write
from transformer.metrics_writer import read_metrics


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


def _save(fig, out_path: str) -> None:
  with atomic_write(out_path) as f:
    fig.savefig(f, format="png")
  plt.close(fig)
