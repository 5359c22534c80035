"""Weight-only int8 for the draft head (`draft.weight_dtype = "int8"`).

A kernel W is stored as int8 values q and one float32 scale per output channel,
W ~= q * scale with scale = max|W| over the input (contracted) axes / 127, rounded to nearest.
Matmuls read the int8 values and dequantize inside the product (`dequantize` at the use
site), so a bandwidth-bound draft pass reads about half the bytes of a bf16 head. Only the
draft is quantized: verification runs the target in its own dtype, so decoding stays
lossless; quantization can only change which tokens the draft proposes.
"""

from __future__ import annotations

WEIGHT_DTYPES = ("", "int8")  # "" = the draft's compute dtype
SCALE_SUFFIX = "_scale"


def check_weight_dtype(value: str, key: str = "draft.weight_dtype") -> str:
  from fspad_jax.config import ConfigError
  if value not in WEIGHT_DTYPES:
    raise ConfigError(f"config key {key}={value!r}: expected '' (the compute dtype) or 'int8'")
  return value


def quantize_int8(w, in_axes: tuple[int, ...]):
  """w -> (q int8 like w, scale float32 with size 1 on `in_axes`): w ~= q * scale.
  Traceable (the hot LM head is quantized inside jit)."""
  import jax.numpy as jnp
  w = jnp.asarray(w).astype(jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.rint(w / scale), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize(q, scale, dtype):
  """The kernel in `dtype` from int8 values and their scales (traced inside the product)."""
  import jax.numpy as jnp
  return (q.astype(jnp.float32) * scale).astype(dtype)


# (module path, kernel attribute, contracted axes of the kernel) for every draft matmul.
DRAFT_KERNELS = (
    (("fc",), "kernel", (0, 1)),  # [2, d, d]: "bscd,cde->bse"
    (("feature_sampling",), "gate_up_kernel", (1,)),  # [2, d, f]: the stack is a batch axis
    (("feature_sampling",), "down_kernel", (0,)),  # [f, d]
    (("layer", "attn"), "q_kernel", (0,)),  # [d, heads, head_dim]
    (("layer", "attn"), "kv_kernel", (0,)),  # [d, 2, kv_heads, head_dim]
    (("layer", "attn"), "o_kernel", (0, 1)),  # [heads, head_dim, d]
    (("layer", "mlp"), "gate_up_kernel", (0,)),  # [d, 2, f]
    (("layer", "mlp"), "down_kernel", (0,)),  # [f, d or 2d]
    (("feature_fc",), "kernel", (0, 1)),  # [k, d, d]: multi-layer feature fusion
    ((), "lm_head", (0,)),  # [d, N]: an 'eagle3' draft's own LM head
)


def draft_kernels(draft):
  """(module, kernel attribute, contracted axes) for each DRAFT_KERNELS entry the draft has."""
  for path, name, in_axes in DRAFT_KERNELS:
    module = draft
    for part in path:
      module = getattr(module, part, None)
    if module is not None and hasattr(module, name):  # e.g. no FS block in this kind
      yield module, name, in_axes


def quantize_draft(graphdef, params, mesh=None):
  """(graphdef, params) of a float draft -> the same draft with int8 kernels and float32
  per-channel scales (`<kernel>_scale` params beside each kernel), placed replicated on
  `mesh`. The modules dequantize at each matmul (`model.kernel`)."""
  import jax
  from flax import nnx
  from fspad_jax.sharding import replicated
  draft = nnx.merge(graphdef, params)
  place = (lambda x: jax.device_put(x, replicated(mesh))) if mesh is not None else jax.device_put
  for module, name, in_axes in draft_kernels(draft):
    q, scale = jax.jit(quantize_int8, static_argnums=1)(getattr(module, name)[...], in_axes)
    setattr(module, name, nnx.Param(place(q)))
    setattr(module, name + SCALE_SUFFIX, nnx.Param(place(scale)))
  return nnx.split(draft)


def weight_bytes(params) -> int:
  """Bytes of a params pytree (int8 kernels count one byte per value)."""
  import jax
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
