"""The one token-distribution processor shared by vanilla and speculative decoding.

`processed_probs` turns target logits into the distribution p that a token is drawn from
(temperature, then top-k, then top-p, as transformers orders its warpers). Vanilla sampling
draws from it; speculative verification accepts/rejects against the very same p, so the
two output distributions are equal by construction.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 means greedy (argmax). top_k 0 and top_p 1.0 disable those filters."""

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def processed_probs(logits: Array, params: SamplingParams) -> Array:
  """logits [..., vocab] -> probabilities [..., vocab] (float32) after the filters.

  Greedy gives the one-hot of the argmax (first index on ties), so "sample from p" and
  "take the argmax" coincide."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if params.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), vocab, dtype=jnp.float32)
  logits = logits / params.temperature
  if 0 < params.top_k < vocab:
    # The k-th value as the min of the top k, not `[..., -1:]`: slicing top_k's result
    # again makes XLA sort each whole row instead of running its TopK kernel (32x slower
    # at 61 x 128,256 on CPU; tests/test_sampling.py).
    kth = jnp.min(jax.lax.top_k(logits, params.top_k)[0], axis=-1, keepdims=True)  # [..., 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)  # ties with the k-th are kept
  probs = jax.nn.softmax(logits, axis=-1)
  if params.top_p < 1.0:
    # Keep token x iff the mass of tokens strictly more probable than x is < top_p.
    sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]  # descending
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = mass_before < params.top_p
    threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    probs = jnp.where(probs >= threshold, probs, 0.0)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
  return probs


def sample_from_probs(rng: Array, probs: Array) -> Array:
  """One draw per row of probs [..., vocab] -> int32 [...]."""
  return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)


def sample_tokens(rng: Array, logits: Array, params: SamplingParams) -> Array:
  """Draws next tokens [...] from logits [..., vocab] under `params`.

  rng: one PRNG key, or one key per row ([batch] typed keys, logits [batch, ..., vocab]), so
  that a row's draw depends on its own key only (not on its batch slot or neighbours). Unused
  (may be None) when greedy."""
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  probs = processed_probs(logits, params)
  if jnp.ndim(rng) == 0:
    return sample_from_probs(rng, probs)
  return jax.vmap(sample_from_probs)(rng, probs)


def row_keys(seeds: Array) -> Array:
  """[batch] int32 seeds -> [batch] typed PRNG keys, one per row."""
  return jax.vmap(jax.random.key)(seeds)


def fold_rows(keys: Array, index: Array) -> Array:
  """Each row's key folded with its own counter: keys [batch], index [batch] int -> [batch]."""
  return jax.vmap(jax.random.fold_in)(keys, index)
