"""Dropout masks (section 5.4) and the two-stage top-k against independent computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import ops


def test_dropout_mask_is_threefry_16_bit_uniforms_with_exact_scale():
  from jax.extend.random import threefry_2x32  # pylint: disable=g-import-not-at-top
  rate, key = 0.1, jax.random.PRNGKey(7)
  shape = (64, 37, 50)  # last axis not a multiple of 4: 13 hashes per row, 52 -> 50 values
  out = np.asarray(ops.dropout(jnp.ones(shape), rate, key))
  threshold = 6554  # round(0.1 * 2^16)
  scale = 65536 / (65536 - threshold)
  kept = out != 0
  np.testing.assert_allclose(out[kept], scale, rtol=1e-6)
  # Element (i, j, q * 13 + r) is kept iff the q-th 16-bit quarter of the hash of counters
  # (j * 13 + r, i), recomputed here with the public Threefry function, is >= the threshold
  # (rate 0.5 here, so that a wrong construction fails each check with probability 1/2).
  half = np.asarray(ops.dropout(jnp.ones(shape), 0.5, key)) != 0
  rng = np.random.RandomState(0)
  for i, j, col in zip(rng.randint(0, 64, 60), rng.randint(0, 37, 60), rng.randint(0, 50, 60)):
    q, r = divmod(int(col), 13)
    b1, b2 = np.asarray(threefry_2x32(key, np.array([j * 13 + r, i], np.uint32)))
    u = [b1 & 0xFFFF, b1 >> 16, b2 & 0xFFFF, b2 >> 16][q]
    assert half[i, j, col] == (u >= 32768) and kept[i, j, col] == (u >= threshold)
  # Statistics: the keep rate is 1 - 6554/65536 (binomial, 5 standard deviations), and the
  # four quarters of each hash are uncorrelated.
  n, p = kept.size, 1 - threshold / 65536
  assert abs(kept.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
  blocks = [kept[..., q * 13:(q + 1) * 13].reshape(-1)[:64 * 37 * 11] for q in range(4)]
  for a in range(4):
    for b in range(a + 1, 4):
      assert abs(np.corrcoef(blocks[a], blocks[b])[0, 1]) < 5 / math.sqrt(blocks[a].size)
  # E[dropout(x)] = x; the gradient is the same mask times the scale.
  big = np.asarray(ops.dropout(jnp.ones((512, 1024)), rate, key))
  assert abs(big.mean() - 1.0) < 5 * scale * math.sqrt(p * (1 - p) / big.size)
  grad = np.asarray(jax.grad(lambda x: ops.dropout(x, rate, key).sum())(jnp.ones(shape)))
  np.testing.assert_array_equal(grad, out)
  # A typed key with the same data gives the same mask; other keys and PRNGs give others.
  np.testing.assert_array_equal(np.asarray(ops.dropout(jnp.ones(shape), rate, jax.random.key(7))),
                                out)
  assert (np.asarray(ops.dropout(jnp.ones(shape), rate, jax.random.PRNGKey(8))) != out).any()
  rbg = np.asarray(ops.dropout(jnp.ones(shape), rate, jax.random.key(7, impl="rbg"))) != 0
  assert abs(rbg.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
  # Rates 0 and 1; bf16 stays bf16.
  np.testing.assert_array_equal(np.asarray(ops.dropout(jnp.ones(shape), 0.0, key)), 1.0)
  np.testing.assert_array_equal(np.asarray(ops.dropout(jnp.ones(shape), 1.0, key)), 0.0)
  assert ops.dropout(jnp.ones(shape, jnp.bfloat16), rate, key).dtype == jnp.bfloat16


@pytest.mark.parametrize("n,k,block", [(32000, 8, 64), (1000, 3, 7), (4001, 8, 50), (40, 8, 64)])
def test_block_top_k_equals_a_stable_sort(n, k, block):
  """Values and indices of the k largest, ties to the lowest index: numpy's stable argsort."""
  rng = np.random.default_rng(n)
  x = rng.integers(-5, 5, size=(6, n)).astype(np.float32)   # many ties
  x[0] = rng.standard_normal(n)                              # none
  x[1, : n // 2] = -np.inf                                   # masked candidates
  x[2] = -np.inf
  x[2, [n - 1, 0, n // 3]] = 1.0                             # fewer finite than k
  x[3] = 0.0                                                 # all equal
  x[4] = 0.0  # the k-th value is tied in a late block with a larger maximum and in early blocks
  x[4, [n - 1, n - 2]] = [2.0, 1.0]
  x[4, np.arange(k - 1) * block % n] = 1.0
  values, idx = jax.jit(lambda a: ops.top_k(a, k, block))(x)
  expect_idx = np.argsort(-x, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(np.asarray(idx), expect_idx)
  np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(x, expect_idx, axis=1))
