"""`python -m tests.nan_main STEP <transformer.main flags>`: transformer.main whose optimizer
step STEP (1-based) runs on NaN parameters, to exercise --nonfinite=stop|skip end to end.

The poisoning wraps `Trainer.train_step` from outside: the jitted step itself has no test
hook. After the poisoned step the good parameters are put back, so a skipped step leaves
the run as if that batch had been dropped (train_step keeps the parameters it was given).
"""

import sys

import jax
import jax.numpy as jnp

from transformer import main, train

_step = train.Trainer.train_step


def _poisoned_at(bad_step: int):
  def train_step(self, state, batch):
    if int(state.step) + 1 != bad_step:
      return _step(self, state, batch)
    good = state.params  # not donated: the step receives the NaN copies below
    nan_params = jax.tree.map(lambda p: p * jnp.nan, good)
    new_state, metrics = _step(self, state.replace(params=nan_params), batch)
    return new_state.replace(params=good), metrics
  return train_step


if __name__ == "__main__":
  train.Trainer.train_step = _poisoned_at(int(sys.argv.pop(1)))
  main.run_main()
