r"""The peer: our training and decoding measurements for PyTorch + Hugging Face MarianMTModel.

  /work/peer_venv/bin/python -m benchmarks.peer --config=small|base|big --mode=train
      [--batch=N --length=L --warmup=3 --steps=10] [--compile] [--bf16]
  /work/peer_venv/bin/python -m benchmarks.peer --config=small|base|big --mode=decode
      [--batch=N --src_len=L --out_len=T --beam=4 --warmup=1 --reps=5] [--bf16]

Runs from the repository root in its own venv (`bash benchmarks/peer_setup.sh`; no JAX
there) and prints one JSON object with the field names of benchmarks.train_throughput and
benchmarks.decode. Shapes and token batches come from benchmarks/shapes.py, as for ours.

The model is MarianMTModel configured like ours: post-LN layers, sinusoidal positions, one
embedding matrix shared by source, target and the output projection, scaled by sqrt(d_model),
ReLU FFN, dropout P_drop on sublayer outputs and embedding sums (none on attention weights or
ReLU), random initialisation; torch.set_num_threads(os.cpu_count()) unless --threads. What
still differs: Marian's attention projections have biases, its LayerNorm epsilon is 1e-5
(ours 1e-6), it adds a (zero) final logits bias, and its sinusoids are [sin | cos] halves
rather than interleaved.

Training step: forward, label-smoothed (0.1) cross entropy over the target tokens (all real,
no padding), backward, Adam(0.9, 0.98, 1e-9) with our learning-rate schedule. fp32 eager by
default; --compile wraps forward + loss in torch.compile; --bf16 runs them under
torch.autocast(cpu, bfloat16) (parameters stay fp32, like ours with --dtype=bfloat16).
Decoding: generate(num_beams=beam) with the KV cache, min_new_tokens=out_len - 1,
max_new_tokens=out_len and EOS forced last, so every sentence is out_len tokens ending in EOS,
the work of benchmarks.decode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

from benchmarks import shapes
from transformer import host  # no JAX: ctypes only

try:
  import torch
  import torch.nn.functional as F
  import transformers
  from transformers import GenerationConfig, MarianConfig, MarianMTModel
except ImportError as e:
  sys.exit(f"error: benchmarks.peer needs torch and transformers ({e}); run it with the peer"
           " venv's python, created by: bash benchmarks/peer_setup.sh")

LABEL_SMOOTHING = 0.1
WARMUP_STEPS = 4000  # our TrainConfig default


def marian_config(shape: shapes.Shape) -> MarianConfig:
  return MarianConfig(
      vocab_size=shape.vocab_size, decoder_vocab_size=shape.vocab_size,
      max_position_embeddings=512,  # our max_len
      encoder_layers=shape.num_layers, decoder_layers=shape.num_layers,
      encoder_ffn_dim=shape.d_ff, decoder_ffn_dim=shape.d_ff,
      encoder_attention_heads=shape.num_heads, decoder_attention_heads=shape.num_heads,
      d_model=shape.d_model, activation_function="relu",
      dropout=shape.dropout, attention_dropout=0.0, activation_dropout=0.0,
      scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
      pad_token_id=shapes.PAD_ID, eos_token_id=shapes.EOS_ID, bos_token_id=None,
      decoder_start_token_id=shapes.BOS_ID, forced_eos_token_id=shapes.EOS_ID)


def make_model(shape: shapes.Shape) -> MarianMTModel:
  torch.manual_seed(0)
  model = MarianMTModel(marian_config(shape))
  emb = model.get_input_embeddings().weight
  if not (model.lm_head.weight is emb and model.model.decoder.embed_tokens.weight is emb):
    raise RuntimeError("MarianMTModel did not tie its embeddings; the comparison would be unfair")
  return model


def count_params(model) -> int:
  """Trainable parameters, each shared tensor once (the sinusoids are not trainable)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def autocast(bf16: bool):
  return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def learning_rate(count: int, d_model: int) -> float:
  """Our schedule: d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step = count + 1."""
  step = count + 1
  return d_model ** -0.5 * min(step ** -0.5, step * WARMUP_STEPS ** -1.5)


def common_fields(args, model) -> dict:
  attention = getattr(model.config, "_attn_implementation", None)  # 'sdpa' by default
  return {"config": args.config, "framework": f"torch {torch.__version__}, transformers"
          f" {transformers.__version__}", "model": "MarianMTModel",
          "dtype": "bfloat16-autocast" if args.bf16 else "float32",
          "attn_implementation": attention, "params": count_params(model),
          "threads": torch.get_num_threads()}


def run_train(args, shape: shapes.Shape) -> dict:
  batch, length = args.batch or shape.train_batch, args.length or shape.train_length
  model = make_model(shape).train()
  src, tgt = (torch.from_numpy(x).long() for x in shapes.train_batch(shape.vocab_size, batch,
                                                                      length))
  mask = torch.ones_like(src)  # no padding, as in ours
  dec_in = torch.cat([torch.full_like(tgt[:, :1], shapes.BOS_ID), tgt[:, :-1]], dim=1)
  opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda c: learning_rate(c, shape.d_model))

  def forward_loss(src, mask, dec_in, tgt):
    with autocast(args.bf16):
      logits = model(input_ids=src, attention_mask=mask, decoder_input_ids=dec_in).logits
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(),
                           ignore_index=shapes.PAD_ID, label_smoothing=LABEL_SMOOTHING)

  loss_fn = torch.compile(forward_loss) if args.compile else forward_loss

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(src, mask, dec_in, tgt)
    loss.backward()
    opt.step()
    sched.step()
    return loss

  t = time.perf_counter()
  loss = step()
  first = time.perf_counter() - t
  for _ in range(args.warmup - 1):
    step()
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t)
  loss = loss.detach()
  if not torch.isfinite(loss):
    raise RuntimeError(f"non-finite training loss {loss.item()}")
  step_time = float(np.median(times))
  return {"benchmark": "peer_train", **common_fields(args, model), "compile": args.compile,
          "batch": batch, "length": length,
          "median_step_s": step_time, "step_times_s": [round(t, 4) for t in times],
          "first_step_s": first, "loss": loss.item(),
          "source_tokens_per_s": batch * length / step_time,
          "target_tokens_per_s": batch * length / step_time}


def run_decode(args, shape: shapes.Shape) -> dict:
  batch = args.batch or shape.decode_batch
  src_len, out_len = args.src_len or shape.src_len, args.out_len or shape.out_len
  model = make_model(shape).eval()
  gen = GenerationConfig(
      num_beams=args.beam, max_new_tokens=out_len, min_new_tokens=out_len - 1,
      forced_eos_token_id=shapes.EOS_ID, eos_token_id=shapes.EOS_ID,
      pad_token_id=shapes.PAD_ID, decoder_start_token_id=shapes.BOS_ID,
      length_penalty=args.alpha, early_stopping=True, do_sample=False, use_cache=True)
  inputs = [torch.from_numpy(x).long() for x in
            shapes.decode_batches(shape.vocab_size, args.warmup + args.reps, batch, src_len)]

  def search(src):
    with torch.inference_mode(), autocast(args.bf16):
      return model.generate(input_ids=src, attention_mask=torch.ones_like(src),
                            generation_config=gen)

  t = time.perf_counter()
  outputs = [search(inputs[0])]
  first = time.perf_counter() - t
  outputs += [search(x) for x in inputs[1:args.warmup]]
  times = []
  for x in inputs[args.warmup:]:
    t = time.perf_counter()
    outputs.append(search(x))
    times.append(time.perf_counter() - t)
  for out in outputs:  # after timing: every batch did the fixed work
    problem = shapes.check_fixed_length(out[:, 1:].numpy(), out_len)  # drop the start token
    if problem:
      raise RuntimeError(f"fixed-length decoding failed: {problem}")
  batch_time = float(np.median(times))
  return {"benchmark": "peer_decode", **common_fields(args, model), "batch": batch,
          "src_len": src_len, "out_len": out_len, "beam": args.beam, "alpha": args.alpha,
          "median_batch_s": batch_time, "batch_times_s": [round(t, 4) for t in times],
          "first_call_s": first, "sentences_per_s": batch / batch_time,
          "output_tokens_per_s": batch * out_len / batch_time,
          "beam_tokens_per_s": batch * args.beam * out_len / batch_time,
          "outputs_checked": len(outputs)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", choices=list(shapes.SHAPES), default="small")
  p.add_argument("--mode", choices=["train", "decode"], default="train")
  p.add_argument("--batch", type=int, default=0, help="sentences per step/batch (0: config's)")
  p.add_argument("--length", type=int, default=0, help="train: tokens per sentence (0: config's)")
  p.add_argument("--src_len", type=int, default=0, help="decode: source tokens (0: config's)")
  p.add_argument("--out_len", type=int, default=0, help="decode: output tokens (0: config's)")
  p.add_argument("--beam", type=int, default=4)
  p.add_argument("--alpha", type=float, default=0.6, help="length penalty exponent")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps/batches (3 / 1)")
  p.add_argument("--steps", type=int, default=10, help="train: timed steps")
  p.add_argument("--reps", type=int, default=5, help="decode: timed batches")
  p.add_argument("--compile", action="store_true", help="train: torch.compile forward + loss")
  p.add_argument("--bf16", action="store_true", help="torch.autocast(cpu, bfloat16)")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: os.cpu_count())")
  p.add_argument("--retain_freed_memory", action="store_true",
                 help="keep freed host memory mapped, as ours does (transformer/host.py)")
  args = p.parse_args(argv)
  if args.warmup is None:
    args.warmup = 3 if args.mode == "train" else 1
  for name in ("batch", "length", "src_len", "out_len", "threads"):
    if getattr(args, name) < 0:
      p.exit(2, f"error: --{name} must be positive (0: the config's)\n")
  for name in ("beam", "warmup", "steps", "reps"):
    if getattr(args, name) <= 0:
      p.exit(2, f"error: --{name} must be positive, got {getattr(args, name)}\n")
  if args.compile and args.mode != "train":
    p.exit(2, "error: --compile is only supported with --mode=train\n")
  return args


def main(argv=None):
  args = parse_args(argv)
  retained = args.retain_freed_memory and host.retain_freed_memory()  # before torch's threads
  torch.set_num_threads(args.threads or os.cpu_count())
  transformers.logging.set_verbosity_error()
  shape = shapes.SHAPES[args.config]
  try:
    result = (run_train if args.mode == "train" else run_decode)(args, shape)
  except RuntimeError as e:
    sys.exit(f"error: {e}")
  print(json.dumps({**result, "retain_freed_memory": retained}))


if __name__ == "__main__":
  main()
