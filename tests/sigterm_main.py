"""`python -m tests.sigterm_main STEP <transformer.main flags>`: transformer.main that sends
itself SIGTERM as soon as the device has finished optimizer step STEP (1-based), as a
scheduler's preemption notice would arrive at a known point of the run.

A thread waits for that step's metrics (the host may have dispatched later steps by then)
and then signals; `Trainer.train_step` is wrapped from outside, the jitted step is unchanged.
"""

import os
import signal
import sys
import threading

import jax

from transformer import main, train

_step = train.Trainer.train_step


def _signal_after(step: int):
  calls = []

  def train_step(self, state, batch):
    state, metrics = _step(self, state, batch)
    calls.append(None)
    if len(calls) == step:
      def send():
        jax.block_until_ready(metrics)
        os.kill(os.getpid(), signal.SIGTERM)
      threading.Thread(target=send, daemon=True).start()
    return state, metrics
  return train_step


if __name__ == "__main__":
  train.Trainer.train_step = _signal_after(int(sys.argv.pop(1)))
  main.run_main()
