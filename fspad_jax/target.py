"""A loaded target model on a mesh, with its jitted, sharded entry points.

>>> target = Target.from_pretrained("/ckpt/Meta-Llama-3-8B-Instruct", mesh_shape=(1, 1, 8),
...                                 dtype="bfloat16")
>>> cache = target.new_cache(batch=4, max_len=2048)
>>> logits, features, cache = target.forward(tokens, positions, cache)   # cache donated
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from fspad_jax.config import ModelConfig
from fspad_jax.generate import VanillaGenerator
from fspad_jax.hf_checkpoint import load_target
from fspad_jax.model import KVCache
from fspad_jax.sharding import LOGICAL_LAYOUTS, ShardingRules, make_mesh


@dataclasses.dataclass
class Target:
  cfg: ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  mesh: jax.sharding.Mesh
  rules: ShardingRules = dataclasses.field(default_factory=ShardingRules)
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def from_pretrained(cls, model_dir: str, mesh_shape=(1, 1, -1), dtype: str = "float32",
                      rules: ShardingRules | None = None, devices=None) -> "Target":
    mesh = make_mesh(mesh_shape, devices)
    rules = rules or ShardingRules()
    cfg, graphdef, params = load_target(model_dir, mesh, rules, dtype=dtype)
    return cls(cfg, graphdef, params, mesh, rules)

  def sharding(self, layout: str, shape):
    return self.rules.sharding(self.mesh, LOGICAL_LAYOUTS[layout], shape)

  def cache_shardings(self, batch: int, max_len: int) -> KVCache:
    shapes = jax.eval_shape(lambda: KVCache.create(self.cfg, batch, max_len))
    return shapes.shardings(self.mesh, self.rules)

  def new_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty cache, allocated directly in its sharded layout."""
    return jax.jit(lambda: KVCache.create(self.cfg, batch, max_len),
                   out_shardings=self.cache_shardings(batch, max_len))()

  @functools.cached_property
  def param_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.params)

  def forward(self, tokens, positions, cache: KVCache, block_mask=None, write_slots=None):
    """Jitted forward of a block (see Transformer.features), sharded over the mesh.

    tokens/positions/write_slots: [batch, seq]; block_mask: [batch, seq, seq]. The cache
    is donated: do not reuse the passed-in object. Returns (logits, features, cache)."""
    batch, seq = tokens.shape
    key = (batch, seq, cache.max_len, block_mask is not None, write_slots is not None)
    if key not in self._compiled:
      self._compiled[key] = self._compile_forward(*key)
    return self._compiled[key](self.params, tokens, positions, cache, block_mask, write_slots)

  def _compile_forward(self, batch, seq, max_len, has_mask, has_slots):
    graphdef = self.graphdef
    tok = self.sharding("act_tokens", (batch, seq))
    cache = self.cache_shardings(batch, max_len)
    out = (self.sharding("act_logits", (batch, seq, self.cfg.vocab_size)),
           self.sharding("act_hidden", (batch, seq, self.cfg.hidden_size)), cache)

    def forward(params, tokens, positions, cache, block_mask, write_slots):
      model = nnx.merge(graphdef, params)
      return model(tokens, positions, cache, block_mask, write_slots)

    mask_sh = self.sharding("block_mask", (batch, seq, seq)) if has_mask else None
    return jax.jit(forward, in_shardings=(self.param_shardings, tok, tok, cache, mask_sh,
                                          tok if has_slots else None),
                   out_shardings=out, donate_argnames=("cache",))

  def vanilla_generator(self) -> VanillaGenerator:
    return VanillaGenerator(self.graphdef, self.params, self.mesh, self.rules)

