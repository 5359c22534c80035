"""Hot-vocabulary drafting (FR-Spec; EAGLE-3's `d2t` map): the draft proposes only the N most
frequent target tokens, so each draft pass reads N rows of the LM head instead of all of them.

  * Data preparation counts every token of the training split's assistant turns
    (`count_assistant_tokens`, stored as `token_counts.npy` beside the prepared data).
  * train.py with `draft.vocab_size = N > 0` keeps the N most frequent ids
    (`select_hot_ids`: count descending, ties to the lower id, stored ascending) in
    `<workdir>/hot_vocab.npy`, beside draft_config.json; EAGLE-layout exports carry them as
    EAGLE-3's `d2t` offsets (target id = draft id + d2t[draft id]).
  * Decoding slices the target's LM head to those rows once, at load (`DraftVocab`); the draft's
    top-k runs over the N hot logits and maps back to target ids. Training's token loss runs
    over the full vocabulary (`train.token_loss = "full"`, the default) or over the hot ids,
    against the target's distribution restricted to them and renormalized ("hot", EAGLE-3's
    recipe; train_lib.token_terms). Per-depth agreement counts the hot top-1 either way.

Verification always uses the target's full distribution, so output stays lossless: a hot-only
draft just cannot propose a cold token, and the verifier supplies it as the bonus token.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from fspad_jax.config import ConfigError

HOT_IDS_FILE = "hot_vocab.npy"
TOKEN_COUNTS_FILE = "token_counts.npy"

Array = Any  # jax.Array; jax is imported where it is used, so data preparation stays light


def count_assistant_tokens(examples, vocab_size: int) -> np.ndarray:
  """Occurrences of each token id on loss-masked (assistant) positions: int64 [vocab_size].

  examples: objects with `input_ids` and `loss_mask` arrays of equal length."""
  counts = np.zeros((vocab_size,), np.int64)
  for ex in examples:
    ids = np.asarray(ex.input_ids)[np.asarray(ex.loss_mask).astype(bool)]
    counts += np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
  return counts


def check_hot_vocab_size(n: int, vocab_size: int, key: str = "draft.vocab_size") -> int:
  """n (0 = the full vocabulary), refused in one line when negative or larger than vocab."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= vocab_size:
    raise ConfigError(f"config key {key}={n!r}: expected an integer in 0..{vocab_size} "
                      f"(the target's vocabulary; 0 = all of it)")
  return int(n)


def select_hot_ids(counts: np.ndarray, n: int) -> np.ndarray:
  """The n most frequent ids (count descending, ties to the lower id), sorted ascending."""
  counts = np.asarray(counts)
  order = np.lexsort((np.arange(len(counts)), -counts))  # by count desc, then id asc
  return np.sort(order[:n]).astype(np.int32)


def validate_hot_ids(ids, vocab_size: int, source: str) -> np.ndarray:
  """A stored hot-id list that fits the target: 1-D integers, distinct, within the vocabulary."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ConfigError(f"{source}: hot vocabulary must be a non-empty 1-D integer array, got "
                      f"{ids.dtype} {list(ids.shape)}")
  outside = ids[(ids < 0) | (ids >= vocab_size)]
  if outside.size:
    raise ConfigError(f"{source}: hot token id {int(outside[0])} is outside the target's "
                      f"vocabulary 0..{vocab_size - 1}")
  if len(np.unique(ids)) != len(ids):  # distinct and in range: at most vocab_size of them
    raise ConfigError(f"{source}: hot vocabulary repeats token ids")
  return ids.astype(np.int32)


def save_hot_ids(directory: str, ids: np.ndarray) -> str:
  path = os.path.join(directory, HOT_IDS_FILE)
  tmp = path + ".tmp.npy"
  np.save(tmp, np.asarray(ids, np.int32))
  os.replace(tmp, path)
  return path


def load_hot_ids(directory: str, vocab_size: int, expected: int | None = None
                 ) -> np.ndarray | None:
  """The validated hot ids stored in `directory`, or None when it has none."""
  path = os.path.join(directory, HOT_IDS_FILE)
  if not os.path.exists(path):
    if expected:
      raise ConfigError(f"{directory}: the draft was trained with a {expected}-token hot "
                        f"vocabulary, but {HOT_IDS_FILE} is missing")
    return None
  try:
    ids = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ConfigError(f"{path}: not a readable .npy array ({e})") from None
  ids = validate_hot_ids(ids, vocab_size, path)
  if expected is not None and ids.size != expected:
    raise ConfigError(f"{path}: {ids.size} hot ids, but the draft config says {expected}")
  return ids


class DraftVocab(NamedTuple):
  """The draft's hot vocabulary on device: its target ids and the LM head rows for them."""

  ids: Array  # [N] int32, ascending target token ids
  lm_head: Array  # [embed, N]: the target's LM head (or tied embedding) restricted to ids
  lm_head_scale: Array | None = None  # [1, N] float32 when lm_head holds int8 values


def make_draft_vocab(target, ids, weight_dtype: str = "") -> DraftVocab:
  """Slices the target's LM head to the hot ids (traceable; call once, at load); with
  weight_dtype "int8", quantized per hot row (fspad_jax.quant)."""
  import jax.numpy as jnp
  ids = jnp.asarray(ids, jnp.int32)
  if target.cfg.tie_word_embeddings:
    head = jnp.take(target.embedding[...], ids, axis=0).T  # [embed, N]
  else:
    head = jnp.take(target.lm_head[...], ids, axis=1)  # [embed, N]
  if weight_dtype != "int8":
    return DraftVocab(ids, head)
  from fspad_jax.quant import quantize_int8
  return DraftVocab(ids, *quantize_int8(head, (0,)))  # scale [1, N]: one per hot row


def hot_logits(vocab: DraftVocab, features: Array, dtype) -> Array:
  """Draft logits over the hot ids [..., N] (float32) from `predict` features [..., embed]."""
  import jax.numpy as jnp
  from fspad_jax.quant import dequantize
  head = vocab.lm_head
  if vocab.lm_head_scale is not None:
    head = dequantize(head, vocab.lm_head_scale, dtype)
  return jnp.einsum("...d,dn->...n", features.astype(dtype), head,
                    preferred_element_type=jnp.float32)
