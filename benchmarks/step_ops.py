"""Compile-only audit of the decode step: XLA ops, big copies, custom calls, loops, draft bytes.

Needs no GPU and no weights: the vanilla token step (`generate.decode_step`) and the
speculative step (`speculative.speculative_step`) are lowered from abstract shapes at
Llama-3-8B widths with 2 and 4 target layers, compiled by the local XLA backend (CPU here),
and their optimized HLO is read:

  ops            instructions that run as their own kernel (fusions, dots, scatters, copies,
                 custom calls, ...) in every non-fused computation, loop bodies included
                 once; parameters, constants, tuples, get-tuple-element and bitcasts are free,
                 and so are the bodies of fusions, reducers and comparators (TopK's too);
  executed_ops   kernels one call runs: loop bodies counted once per trip (equal to ops for
                 a step without loops, e.g. greedy; null if a trip count is unknown);
  fit            ops = fixed + per_layer * layers, from the 2- and 4-layer compiles;
  big_copies     `copy` instructions whose result is >= 1 MB (cache-sized copies);
  big_temporaries  other results >= 1 MB that are not in-place updates (scatter,
                 dynamic-update-slice) or products: materialized slices, transposes, masks;
  custom_calls   by target (TopK, sort, ...); `sort` instructions are counted too;
  while_loops    loops left in the step, with their trip count when XLA knows it, and
                 whether they run the threefry PRNG;
  speculative_by_source  the speculative step's ops (at the first layer count) by the line
                 of speculative_step / build_tree they come from, and by innermost line
                 (from the HLO's stack frames);
  full_lm_head_reads  kernels that take the target's whole LM head as an operand (verify,
                 and each full-vocabulary draft pass; a hot-vocabulary draft reads a slice);
  draft_pass     bytes one sequential draft pass reads: the draft head and the LM head rows
                 it projects onto (in --draft_dtype_bytes, bf16 by default).

  python benchmarks/step_ops.py                      # 8B widths, f32, tree 6/10/60, batch 1
  python benchmarks/step_ops.py --draft_vocab 32768  # hot-vocabulary draft
  python benchmarks/step_ops.py --draft_vocab 32768 --draft_weight int8
  python benchmarks/step_ops.py --json out.json
  python benchmarks/step_ops.py --by_source 40       # ops per source line (speculative_by_source)

The CPU op count is a proxy for GPU kernels per step (the GPU backend fuses differently);
benchmarks/profile_spec.py counts real kernels on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import platform
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fspad_jax import quant, speculative as spec
from fspad_jax.config import llama3_8b_config
from fspad_jax.draft import abstract_draft, draft_config_from_target
from fspad_jax.generate import DecodeState, GenerateOptions, decode_step
from fspad_jax.hot_vocab import DraftVocab
from fspad_jax.model import KVCache, abstract_model
from fspad_jax.sampling import SamplingParams

FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
            "partition-id", "replica-id", "opt-barrier"}
BIG_COPY_BYTES = 1 << 20
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
                "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2}
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s")  # an unindented header ending in "{"
_INST_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def _shape_bytes(shape_text: str) -> int:
  """Bytes of an HLO result type such as `f32[1,2048,8,128]{3,2,1,0}` (tuples summed)."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape_text):
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def parse_hlo(text: str) -> dict[str, list[dict]]:
  """Optimized HLO text -> {computation name: [instruction dicts]}."""
  comps, current = {}, None
  for line in text.splitlines():
    m = _COMP_RE.match(line)
    if m and line.rstrip().endswith("{"):
      current = m.group(2)
      comps[current] = []
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INST_RE.match(line)
    if m and current is not None:
      comps[current].append({"name": m.group(2), "type": m.group(3), "op": m.group(4),
                             "rest": m.group(5)})
  return comps


def _stack_frames(text: str) -> dict[int, list[tuple[str, str, int]]]:
  """The optimized HLO's stack-frame tables -> {stack_frame_id: [(file, function, line),
  innermost first]} (files by base name)."""
  tables, current = {}, None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
    elif current is not None and re.match(r"^\d+ ", line):
      index, rest = line.split(" ", 1)
      current[int(index)] = rest
    elif not line.strip():
      current = None
  if "StackFrames" not in tables:
    return {}
  files = {k: v.strip('"').rsplit("/", 1)[-1] for k, v in tables["FileNames"].items()}
  funcs = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
  field = lambda text, key: int(re.search(rf"{key}=(\d+)", text).group(1))
  locs = {k: (files[field(v, "file_name_id")], funcs[field(v, "function_name_id")],
              field(v, "line")) for k, v in tables["FileLocations"].items()}
  # parent_frame_id is printed one above the parent's id (0 would be "none").
  parents = {k: (field(v, "file_location_id"), field(v, "parent_frame_id") - 1)
             for k, v in tables["StackFrames"].items()}
  chains = {}
  for frame in parents:
    chain, f = [], frame
    while f in parents and len(chain) < 64:
      loc, f = parents[f]
      chain.append(locs[loc])
    chains[frame] = chain
  return chains


def ops_by_source(text: str, anchor: str = "speculative_step", top: int = 40) -> dict:
  """Kernel ops attributed to source: {"phase": ops by the line of `anchor` (the step
  function) they come from, "line": ops by their innermost project line}."""
  comps = parse_hlo(text)
  chains = _stack_frames(text)
  nested = _nested_computations(comps)
  phase, inner = collections.Counter(), collections.Counter()
  for name, insts in comps.items():
    if name in nested:
      continue
    for inst in insts:
      if inst["op"] in FREE_OPS:
        continue
      frame = re.search(r"stack_frame_id=(\d+)", inst["rest"])
      chain = chains.get(int(frame.group(1)), []) if frame else []
      project = [c for c in chain if c[0] not in ("step_ops.py",)]
      at = [c for c in project if c[1] == anchor]
      phase[f"{at[0][0]}:{at[0][2]}" if at else "?"] += 1
      inner[(f"{project[0][0]}:{project[0][2]} {project[0][1]}" if project else
             f"? {inst['op']}")] += 1
  return {"phase": dict(phase.most_common(top)), "line": dict(inner.most_common(top))}


def _nested_computations(comps: dict) -> set[str]:
  """Computations that are not kernels of their own: fusion bodies, reducers, comparators."""
  nested = set()
  for insts in comps.values():
    for inst in insts:
      if inst["op"] not in ("fusion", "reduce", "reduce-window", "sort", "scatter",
                            "select-and-scatter", "map", "all-reduce", "reduce-scatter",
                            "custom-call"):
        continue
      for key in ("calls", "to_apply", "comparator", "scatter"):
        nested.update(re.findall(rf"{key}=%?([\w.\-]+)", inst["rest"]))
      # A custom call's comparator (TopK's) is named in a {list}, and is no kernel either.
      for group in re.findall(r"called_computations=\{([^}]*)\}", inst["rest"]):
        nested.update(re.findall(r"%?([\w.\-]+)", group))
  return nested


def audit_hlo(text: str) -> dict:
  """Counts of one compiled function's optimized HLO (see the module docstring)."""
  comps = parse_hlo(text)
  nested = _nested_computations(comps)
  ops, copies, temps, custom, sorts, loops = 0, [], [], collections.Counter(), 0, []
  lm_head_reads = 0
  by_op = collections.Counter()
  for name, insts in comps.items():
    if name in nested:
      continue
    for inst in insts:
      op = inst["op"]
      if op in FREE_OPS:
        continue
      ops += 1
      by_op[op] += 1
      operands = inst["rest"].split(")")[0]
      if re.search(r"lm_head\w*value", operands):
        lm_head_reads += 1
      size = _shape_bytes(inst["type"])
      if op == "copy" and size >= BIG_COPY_BYTES:
        copies.append(size)
      elif size >= BIG_COPY_BYTES and not _in_place(inst, comps):
        temps.append(size)
      if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', inst["rest"])
        custom[target.group(1) if target else "?"] += 1
      if op == "sort":
        sorts += 1
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", inst["rest"]).group(1)
        trips = re.search(r'"n":"(\d+)"', inst["rest"])
        body_text = " ".join(i["op"] + " " + i["rest"] for i in comps.get(body, []))
        loops.append({"trip_count": int(trips.group(1)) if trips else None,
                      "threefry": "threefry" in body_text.lower()
                                  or "xor" in _fused_ops(comps, body)})
  return {"ops": ops, "executed_ops": executed_ops(text),
          "big_copies": len(copies), "big_copy_mb": round(sum(copies) / 1e6, 1),
          "big_temporaries": len(temps), "big_temporary_mb": round(sum(temps) / 1e6, 1),
          "custom_calls": dict(custom), "sorts": sorts, "while_loops": loops,
          "full_lm_head_reads": lm_head_reads,
          "ops_by_kind": dict(by_op.most_common(12))}


def executed_ops(text: str) -> int | None:
  """Kernels one call runs: the entry's ops, with each while loop's body and condition
  counted once per trip (`ops` counts them once) and a conditional's branches summed (an
  upper bound). None when a loop's trip count is not known to XLA."""
  comps = parse_hlo(text)
  entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", text, re.M).group(1)
  memo = {}

  def count(name: str) -> int | None:
    if name not in memo:
      total = 0
      for inst in comps.get(name, []):
        op = inst["op"]
        if op in FREE_OPS:
          continue
        total += 1
        if op == "while":
          body = re.search(r"body=%?([\w.\-]+)", inst["rest"]).group(1)
          cond = re.search(r"condition=%?([\w.\-]+)", inst["rest"]).group(1)
          trips = re.search(r'"n":"(\d+)"', inst["rest"])
          inner = [count(body), count(cond)]
          if trips is None or None in inner:
            memo[name] = None
            return None
          total += int(trips.group(1)) * sum(inner)
        elif op in ("conditional", "call"):
          for group in re.findall(r"(?:branch_computations=\{([^}]*)\}|to_apply=%?([\w.\-]+)|"
                                  r"true_computation=%?([\w.\-]+)|"
                                  r"false_computation=%?([\w.\-]+))", inst["rest"]):
            for callee in re.findall(r"[\w.\-]+", " ".join(group)):
              inner = count(callee.lstrip("%"))
              if inner is None:
                memo[name] = None
                return None
              total += inner
      memo[name] = total
    return memo[name]

  return count(entry)


def _in_place(inst: dict, comps: dict) -> bool:
  """Whether a >= 1 MB result is an in-place buffer update (a scatter or dynamic-update-slice,
  fused or not), a loop or a dot (a product, not a copy), rather than a new temporary."""
  if inst["op"] in ("scatter", "dynamic-update-slice", "while", "conditional", "dot",
                    "custom-call", "call"):
    return True
  if inst["op"] == "fusion":
    body = re.search(r"calls=%?([\w.\-]+)", inst["rest"]).group(1)
    ops = {i["op"] for i in comps.get(body, [])}
    return bool(ops & {"scatter", "dynamic-update-slice", "dot"})
  return False


def _fused_ops(comps: dict, name: str) -> set[str]:
  """Opcodes used in a computation and everything it calls."""
  seen, todo, out = set(), [name], set()
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for inst in comps[c]:
      out.add(inst["op"])
      todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", inst["rest"])
  return out


def _abstract_params(module):
  return nnx.split(module)


def vanilla_hlo(cfg, batch: int, cache_len: int) -> str:
  graphdef, params = _abstract_params(abstract_model(cfg))
  options = GenerateOptions(max_new_tokens=64, cache_len=cache_len)
  cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, cache_len))
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  state = DecodeState(i32(), i32(batch, 64), cache, i32(batch),
                      jax.ShapeDtypeStruct((batch,), bool), i32(batch), i32(batch),
                      jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch)))
  fn = jax.jit(lambda p, s: decode_step(nnx.merge(graphdef, p), s, options),
               donate_argnums=1)
  return fn.lower(params, state).compile().as_text()


def abstract_int8_draft(draft_cfg):
  """The abstract draft with quant.quantize_draft's layout: int8 kernels, float32 scales."""
  draft = abstract_draft(draft_cfg)
  for module, name, in_axes in quant.draft_kernels(draft):
    shape = tuple(getattr(module, name).shape)
    scale = tuple(1 if i in in_axes else n for i, n in enumerate(shape))
    setattr(module, name, nnx.Param(jax.ShapeDtypeStruct(shape, jnp.int8)))
    setattr(module, name + quant.SCALE_SUFFIX,
            nnx.Param(jax.ShapeDtypeStruct(scale, jnp.float32)))
  return draft


def spec_hlo(cfg, draft_cfg, batch: int, cache_len: int, depth: int, top_k: int, total: int,
             sampling: SamplingParams, weight_dtype: str = "") -> str:
  tg, tp = _abstract_params(abstract_model(cfg))
  dg, dp = _abstract_params(abstract_int8_draft(draft_cfg) if weight_dtype == "int8"
                            else abstract_draft(draft_cfg))
  options = spec.SpecOptions(max_new_tokens=64, sampling=sampling, cache_len=cache_len,
                             depth=depth, top_k=top_k, total_tokens=total)
  prompt = jax.ShapeDtypeStruct((batch, 16), jnp.int32)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
  state = jax.eval_shape(
      lambda tp, dp, p, n: spec.init_state(nnx.merge(dg, dp), nnx.merge(tg, tp), p, n,
                                           jax.random.key(0), options), tp, dp, prompt, lengths)
  vocab = None
  if draft_cfg.hot_vocab_size:  # the hot LM head rows, sliced at load (fspad_jax.hot_vocab)
    n = draft_cfg.hot_vocab_size
    vocab = DraftVocab(jax.ShapeDtypeStruct((n,), jnp.int32),
                       jax.ShapeDtypeStruct((cfg.hidden_size, n), jnp.dtype(cfg.dtype)))
    if weight_dtype == "int8":
      vocab = DraftVocab(vocab.ids, jax.ShapeDtypeStruct((cfg.hidden_size, n), jnp.int8),
                         jax.ShapeDtypeStruct((1, n), jnp.float32))
  step = spec.make_step_fn(tg, dg, options)
  return step.lower(tp, dp, state, vocab).compile().as_text()


def draft_pass_bytes(cfg, draft_cfg, dtype_bytes: int, weight_dtype: str = "") -> dict:
  """Bytes one draft pass reads: the head's weights and the LM head rows it projects onto
  (int8 kernels: one byte a value plus float32 scales; the rest at dtype_bytes)."""
  if weight_dtype == "int8":
    _, params = _abstract_params(abstract_int8_draft(draft_cfg))
    head = sum(int(np.prod(x.shape)) * (1 if x.dtype == jnp.int8 else
                                        4 if x.dtype == jnp.float32 and x.ndim > 1 else
                                        dtype_bytes) for x in jax.tree.leaves(params))
  else:
    _, params = _abstract_params(abstract_draft(draft_cfg))
    head = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) * dtype_bytes
  rows = draft_cfg.hot_vocab_size or cfg.vocab_size
  lm_head = rows * cfg.hidden_size * (1 if weight_dtype == "int8" else dtype_bytes)
  if weight_dtype == "int8":
    lm_head += rows * 4  # one float32 scale per row
  return {"draft_head_gb": round(head / 1e9, 3), "lm_head_rows": rows,
          "lm_head_gb": round(lm_head / 1e9, 3), "total_gb": round((head + lm_head) / 1e9, 3)}


def fit(counts: dict[int, int]) -> dict:
  """ops = fixed + per_layer * layers through the two measured layer counts."""
  (l1, c1), (l2, c2) = sorted(counts.items())
  per_layer = (c2 - c1) / (l2 - l1)
  return {"fixed": round(c1 - per_layer * l1, 1), "per_layer": round(per_layer, 1)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, nargs=2, default=[2, 4])
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--cache_len", type=int, default=2048)
  ap.add_argument("--tree", type=int, nargs=3, default=[6, 10, 60],
                  metavar=("DEPTH", "TOP_K", "TOTAL"))
  ap.add_argument("--draft_kind", default="fspad")
  ap.add_argument("--draft_vocab", type=int, default=0, help="hot draft vocabulary (0: full)")
  ap.add_argument("--draft_dtype_bytes", type=int, default=2, help="for draft_pass bytes")
  ap.add_argument("--draft_weight", default="", choices=quant.WEIGHT_DTYPES,
                  help="int8: weight-only int8 draft head (and hot LM head)")
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--json", default=None, help="also write the report here")
  ap.add_argument("--by_source", type=int, default=25, metavar="N",
                  help="attribute the speculative step's ops (at the first layer count) to "
                       "its N busiest lines of speculative_step and build_tree (0: off)")
  args = ap.parse_args(argv)

  depth, top_k, total = args.tree
  report = {"machine": platform.platform(), "jax": jax.__version__,
            "backend": jax.default_backend(), "widths": "llama3_8b", "dtype": "float32",
            "batch": args.batch, "cache_len": args.cache_len, "tree": args.tree,
            "draft_kind": args.draft_kind, "draft_vocab": args.draft_vocab,
            "draft_weight": args.draft_weight or "compute dtype",
            "temperature": args.temperature}
  sampling = SamplingParams(temperature=args.temperature)
  vanilla, speculative = {}, {}
  for layers in args.layers:
    cfg = llama3_8b_config("float32")
    cfg = dataclasses.replace(cfg, num_layers=layers)
    draft_cfg = draft_config_from_target(cfg, args.draft_kind)
    if args.draft_vocab:
      draft_cfg = draft_cfg.replace(hot_vocab_size=args.draft_vocab)
    vanilla[layers] = audit_hlo(vanilla_hlo(cfg, args.batch, args.cache_len))
    spec_text = spec_hlo(cfg, draft_cfg, args.batch, args.cache_len, depth, top_k, total,
                         sampling, args.draft_weight)
    speculative[layers] = audit_hlo(spec_text)
    if args.by_source and layers == args.layers[0]:
      report["speculative_by_source"] = {
          "layers": layers,
          "speculative_step": ops_by_source(spec_text, "speculative_step",
                                            args.by_source)["phase"],
          "build_tree": ops_by_source(spec_text, "build_tree", args.by_source)["phase"],
          "innermost": ops_by_source(spec_text, "speculative_step", args.by_source)["line"]}
    print(f"[step_ops] {layers} layers: vanilla {vanilla[layers]['ops']} ops, "
          f"speculative {speculative[layers]['ops']} ops", file=sys.stderr)
  cfg32 = llama3_8b_config("float32")
  draft32 = draft_config_from_target(cfg32, args.draft_kind)
  if args.draft_vocab:
    draft32 = draft32.replace(hot_vocab_size=args.draft_vocab)
  fits = lambda runs: {key: fit({k: v[key] for k, v in runs.items()})
                       for key in ("ops", "executed_ops")
                       if all(v[key] is not None for v in runs.values())}
  report["vanilla"] = {"fit": fit({k: v["ops"] for k, v in vanilla.items()}),
                       "fits": fits(vanilla), "by_layers": vanilla}
  report["speculative"] = {"fit": fit({k: v["ops"] for k, v in speculative.items()}),
                           "fits": fits(speculative), "by_layers": speculative}
  report["draft_pass"] = draft_pass_bytes(cfg32, draft32, args.draft_dtype_bytes,
                                          args.draft_weight)
  text = json.dumps(report, indent=1)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text + "\n")
  return report


if __name__ == "__main__":
  main()
