"""`decode.tree=auto`: the draft tree (depth, top-k, node count), or vanilla decoding, that
maximizes expected tokens per second on the present device at the job's batch size.

Pure pieces (tested without timing): `rank_probs`, `expected_accept`, `step_seconds`,
`choose_tree`. Timing (`measure_costs`, cached by `load_or_measure_costs`) and the engine
hook (`choose_for_engine`) sit apart.

Acceptance model (greedy verification). At tree depth d, given that the path so far was
accepted, the target's next token is the draft's rank-r candidate with probability q_d(r),
independently across depths. q_d(1) = top-1 agreement at depth d, q_d(2) + q_d(3) = top-3
minus top-1 agreement (train.py's per-depth agreement, which feeds the draft its own
features and the true tokens: a conditional rate); beyond rank 1 the rank is geometric,
q_d(r) = (1 - a)(1 - rho) rho^(r-2) with rho fitted to the top-3 mass. Depths past the
measured ones repeat the deepest. A node's value is the probability that its whole path is
accepted, the product of q along it. The EAGLE-2 tree is simulated on these values as
fspad_jax.tree builds it (every frontier node proposes its top-K children, the best K of
the K*K become the next frontier, the best `total_tokens` of all nodes are verified), and
the expected accepted length is the sum of the kept nodes' values (linearity: the accepted
length is the number of kept nodes whose path is accepted); expected tau = 1 + that. The
real tree ranks nodes by the draft's confidence in each context, not by these averages, so
measured tau may differ: the summary reports both.

Cost model: a step costs depth * t_draft_pass(top_k) (D-1 tree levels and the commit pass)
+ t_verify(total_tokens + 1) + t_overhead, vanilla a token t_verify(1), all per batch of
`decode.batch_size` rows. t_verify is timed at a few token counts and interpolated linearly;
t_overhead (rerank, commit gathers, bookkeeping) is one full step of a reference tree minus
its modelled parts. A tree is chosen only when its expected tokens/s beats vanilla's by
MIN_GAIN; otherwise the job decodes with vanilla (a speculative method never chosen slower).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from fspad_jax.tree import num_buffer_nodes

DEPTHS = (1, 2, 3, 4, 5, 6)
TOP_KS = (2, 4, 8, 10)
NODES = (4, 8, 16, 32, 64)  # verified draft nodes (candidates)
TIMED_TOKENS = (1, 17, 65)  # verify forwards timed (1: a vanilla step); linear between
TIMED_TOP_KS = (2, 10)  # draft passes timed; linear between
MIN_GAIN = 1.05  # a tree must be expected to beat vanilla's tokens/s by 5%
TIMED_CALLS = 3  # timed runs per function (the fastest is kept)
LOOP_CALLS = 8  # calls chained on device per run
REFERENCE_TREE = (4, 4, 16)  # (depth, top_k, nodes) of the full step that gives t_overhead
COSTS_FILE_ENV = "FSPAD_TREE_COSTS"  # overrides the timing cache file
PIN_NAMES = ("depth", "top_k", "nodes")


# ------------------------------------------------------------------------- acceptance


@dataclasses.dataclass(frozen=True)
class Acceptance:
  """Per-depth agreement of the draft with the target (element d-1: depth d)."""

  top1: tuple[float, ...]
  top3: tuple[float, ...]
  source: str  # where it came from (a metrics.jsonl record)


def acceptance_from_workdir(path: str) -> Acceptance | None:
  """The draft's per-depth agreement from its train.py metrics.jsonl (the last `eval`
  record, else the last `train` record); `path` is the workdir or a checkpoint step inside
  it. None when there is none."""
  path = os.path.abspath(path)
  candidates = [path, os.path.dirname(os.path.dirname(path))]  # workdir, or .../checkpoints/N
  for d in candidates:
    f = os.path.join(d, "metrics.jsonl")
    if not os.path.isfile(f):
      continue
    best = {}
    with open(f) as fh:
      for line in fh:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(rec, dict) and "top1_depth1" in rec:
          best[rec.get("split", "train")] = rec
    rec = best.get("eval") or best.get("train")
    if rec is None:
      continue
    depths = sorted(int(k[len("top1_depth"):]) for k in rec if k.startswith("top1_depth"))
    top1 = tuple(float(rec[f"top1_depth{d}"]) for d in depths)
    top3 = tuple(float(rec.get(f"top3_depth{d}", rec[f"top1_depth{d}"])) for d in depths)
    return Acceptance(top1, top3, f"{f} ({rec.get('split', 'train')} step {rec.get('step')})")
  return None


def rank_probs(acceptance: Acceptance, depth: int, top_k: int) -> np.ndarray:
  """q [depth, top_k]: q[d-1, r-1] = P(target's token is the draft's rank-r candidate at
  depth d | path accepted so far), from the model in the module docstring."""
  q = np.zeros((depth, top_k))
  for d in range(depth):
    i = min(d, len(acceptance.top1) - 1)
    a = float(np.clip(acceptance.top1[i], 0.0, 1.0))
    b = float(np.clip(acceptance.top3[i], a, 1.0))
    q[d, 0] = a
    if a < 1.0 and top_k > 1:
      rho = np.sqrt(max(0.0, 1.0 - (b - a) / (1.0 - a)))
      r = np.arange(top_k - 1)
      q[d, 1:] = (1.0 - a) * (1.0 - rho) * rho ** r
  return q


def expected_accept(q: np.ndarray, depth: int, top_k: int, nodes: int) -> float:
  """Expected accepted draft tokens per step of an EAGLE-2 tree (depth, top_k, nodes)
  whose node values are path products of q [>= depth, >= top_k] (module docstring)."""
  level = q[0, :top_k].copy()  # [K] values of the root's children, best first
  values = [level]
  frontier = level
  for d in range(1, depth):
    children = (frontier[:, None] * q[d, :top_k][None]).reshape(-1)  # [K*K]
    values.append(children)
    frontier = np.sort(children)[::-1][:top_k]
  kept = np.sort(np.concatenate(values))[::-1][:nodes]
  return float(kept.sum())


def expected_tau(acceptance: Acceptance, depth: int, top_k: int, nodes: int) -> float:
  """Expected tokens committed per verify step (accepted + the bonus token)."""
  return 1.0 + expected_accept(rank_probs(acceptance, depth, top_k), depth, top_k, nodes)


# ------------------------------------------------------------------------- costs and choice


def _linear(table: dict[int, float], x: int) -> float:
  """table's value at x: linear between the timed points and beyond the last two."""
  xs = sorted(table)
  ys = [table[v] for v in xs]
  if x > xs[-1] and len(xs) > 1:
    return ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (x - xs[-1])
  return float(np.interp(x, xs, ys))


@dataclasses.dataclass(frozen=True)
class Costs:
  """Seconds per call at the job's batch, timed at a few sizes and interpolated linearly."""

  draft_pass: dict[int, float]  # top_k -> one draft pass over top_k frontier nodes
  verify: dict[int, float]  # tokens (1 = a vanilla step) -> one target forward
  overhead: float  # per step, beyond the modelled draft passes and verify

  def verify_seconds(self, tokens: int) -> float:
    return _linear(self.verify, tokens)

  def draft_pass_seconds(self, top_k: int) -> float:
    return _linear(self.draft_pass, top_k)

  def to_json(self) -> dict:
    return {"draft_pass": {str(k): v for k, v in self.draft_pass.items()},
            "verify": {str(k): v for k, v in self.verify.items()}, "overhead": self.overhead}

  @classmethod
  def from_json(cls, d: dict) -> "Costs":
    return cls({int(k): float(v) for k, v in d["draft_pass"].items()},
               {int(k): float(v) for k, v in d["verify"].items()}, float(d["overhead"]))


def step_seconds(costs: Costs, depth: int, top_k: int, nodes: int) -> float:
  """Modelled time of one speculative step (module docstring)."""
  return (depth * costs.draft_pass_seconds(top_k) + costs.verify_seconds(nodes + 1)
          + costs.overhead)


@dataclasses.dataclass(frozen=True)
class Choice:
  """The chosen tree (None: vanilla) and the model's figures, per batch of rows."""

  tree: tuple[int, int, int] | None  # (depth, top_k, nodes)
  expected_tau: float | None
  step_s: float | None
  vanilla_step_s: float
  expected_speedup: float  # expected tokens/s over vanilla's (1.0 for vanilla)
  best_tree: tuple[int, int, int] | None  # the best tree even when vanilla was chosen
  best_tree_speedup: float | None

  @property
  def vanilla(self) -> bool:
    return self.tree is None

  def to_json(self) -> dict:
    return {"choice": "vanilla" if self.vanilla else dict(zip(PIN_NAMES, self.tree)),
            "expected_tau": None if self.expected_tau is None else round(self.expected_tau, 4),
            "step_ms": None if self.step_s is None else round(self.step_s * 1e3, 4),
            "vanilla_step_ms": round(self.vanilla_step_s * 1e3, 4),
            "expected_speedup": round(self.expected_speedup, 4),
            "best_tree": None if self.best_tree is None else dict(zip(PIN_NAMES, self.best_tree)),
            "best_tree_expected_speedup": (None if self.best_tree_speedup is None
                                           else round(self.best_tree_speedup, 4))}


def candidates(pins: dict[str, int] | None = None, depths=DEPTHS, top_ks=TOP_KS, nodes=NODES
               ) -> list[tuple[int, int, int]]:
  """(depth, top_k, nodes) of the grid, restricted by pinned values; node counts a tree of
  that depth and top-k cannot draft are dropped."""
  pins = pins or {}
  grid = []
  for d in ([pins["depth"]] if "depth" in pins else depths):
    for k in ([pins["top_k"]] if "top_k" in pins else top_ks):
      for n in ([pins["nodes"]] if "nodes" in pins else nodes):
        if n <= num_buffer_nodes(k, d):
          grid.append((d, k, n))
  return grid


def choose_tree(acceptance: Acceptance, costs: Costs, grid: list[tuple[int, int, int]],
                min_gain: float | None = None) -> Choice:
  """The grid's tree with the highest expected tau / step time, or vanilla when none beats
  vanilla's 1 / t_verify(1) by `min_gain` (default MIN_GAIN)."""
  min_gain = MIN_GAIN if min_gain is None else min_gain
  vanilla_s = costs.verify_seconds(1)
  best = None
  for d, k, n in grid:
    tau = expected_tau(acceptance, d, k, n)
    t = step_seconds(costs, d, k, n)
    speedup = tau / t * vanilla_s
    if best is None or speedup > best[0]:
      best = (speedup, (d, k, n), tau, t)
  if best is None or best[0] < min_gain:
    return Choice(None, None, None, vanilla_s, 1.0, best and best[1], best and best[0])
  speedup, tree, tau, t = best
  return Choice(tree, tau, t, vanilla_s, speedup, tree, speedup)


# ------------------------------------------------------------------------- timing


def costs_file() -> str:
  return os.environ.get(COSTS_FILE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "fspad_jax", "tree_costs.json")


def costs_key(fields: dict) -> str:
  """A stable key for the timing cache from the device and shape fields."""
  blob = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _device_time(body, params, carry, loop: int = LOOP_CALLS, rounds: int = TIMED_CALLS):
  """(seconds per call of carry = body(params, carry), final carry): `loop` calls chained
  inside one jitted on-device loop (no per-call dispatch, as in the decode loop; params
  are arguments, never baked-in constants), the fastest of `rounds` timed runs after one
  compiling run."""
  import jax
  run = jax.jit(lambda p, c: jax.lax.fori_loop(0, loop, lambda i, c: body(p, c), c),
                donate_argnums=1)
  carry = jax.block_until_ready(run(params, carry))
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    carry = jax.block_until_ready(run(params, carry))
    best = min(best, time.perf_counter() - t0)
  return best / loop, carry


def measure_costs(generator, batch: int, prefix: int, cache_len: int,
                  top_ks=TIMED_TOP_KS, tokens=TIMED_TOKENS, reference=REFERENCE_TREE) -> Costs:
  """Times (on-device loops, _device_time), at [batch] rows with `prefix` committed tokens
  in a `cache_len`-slot cache: the target forward over each of
  `tokens` tokens (1 = a vanilla step), one draft pass (layer, LM head, top-k) over each of
  `top_ks` frontier nodes, and one full speculative step of the `reference` tree (for the
  overhead): 6 compilations with the defaults (a minute or two on a loaded 2-core CPU at
  tiny shapes, the full step's the longest; cached afterwards).
  generator: a fspad_jax.speculative.SpeculativeGenerator."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from fspad_jax import speculative as spec
  from fspad_jax.model import KVCache

  tg, tp = generator.target_graphdef, generator.target_params
  dg, dp = generator.draft_graphdef, generator.draft_params
  vocab = generator.vocab
  lengths = np.full((batch,), prefix, np.int32)  # a constant (donated buffers never alias it)

  def make_verify(n):
    def f(params, carry):
      cache, tok = carry
      target = nnx.merge(tg, params[0])
      positions = lengths[:, None] + jnp.arange(n)[None]  # [batch, n]
      mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (batch, n, n))
      logits, _, cache = target(tok, positions, cache, block_mask=mask)
      tok = jnp.argmax(logits, -1).astype(jnp.int32)  # [batch, n]
      return cache, tok
    return f

  cfg = nnx.merge(tg, tp).cfg
  cache = KVCache.create(cfg, batch, cache_len).replace(lengths=jnp.asarray(lengths))
  verify = {}
  for n in sorted({1, *tokens}):  # [1, ...]
    tokens_in = jnp.zeros((batch, n), jnp.int32)  # [batch, n]
    t, (cache, _) = _device_time(make_verify(n), (tp, dp), (cache, tokens_in))
    verify[n] = t

  dcfg = nnx.merge(dg, dp).cfg
  draft_cache = KVCache.create(dcfg.layer_config, batch, cache_len + 64).replace(
      lengths=jnp.asarray(lengths))
  draft_pass = {}
  for k in sorted(set(top_ks)):
    def f(params, carry, k=k):
      dcache, feats, tok = carry
      target, draft = nnx.merge(tg, params[0]), nnx.merge(dg, params[1])
      positions = jnp.broadcast_to(lengths[:, None], (batch, k))
      out = draft(feats, target.embed(tok), positions, dcache,
                  block_mask=jnp.broadcast_to(jnp.eye(k, dtype=bool), (batch, k, k)))
      child, logp = spec.draft_candidates(target, out.predict, k, params[2])  # [batch, K, K]
      best = jnp.argmax(logp.reshape(batch, -1), -1)  # stands in for the frontier top-k
      tok = jnp.take_along_axis(child.reshape(batch, -1), best[:, None], 1).repeat(k, 1)
      feats = out.regress.astype(feats.dtype)
      return out.cache.replace(lengths=lengths), feats, tok
    feats = jnp.zeros((batch, k, dcfg.hidden_size), dcfg.dtype)
    t, (draft_cache, _, _) = _device_time(f, (tp, dp, vocab), (draft_cache, feats,
                                              jnp.zeros((batch, k), jnp.int32)))
    draft_pass[k] = t
  del cache, draft_cache

  # One full step of the reference tree (state donated, chained): the unmodelled remainder.
  # The step's cost does not depend on the values, so the state is zeros of init_state's
  # shapes (no prefill compiled); done rows are computed like the others.
  d, k, n = reference
  options = spec.SpecOptions(max_new_tokens=8 * (d + 1), depth=d, top_k=k, total_tokens=n,
                             cache_len=cache_len)
  shapes = jax.eval_shape(lambda tp, dp: spec.init_state(
      nnx.merge(dg, dp), nnx.merge(tg, tp), jnp.zeros((batch, prefix), jnp.int32),
      jnp.asarray(lengths), jax.random.key(0), options, vocab), tp, dp)
  is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  state = jax.tree.map(lambda x: jax.random.key(0) if is_key(x) else jnp.zeros(x.shape, x.dtype),
                       shapes)
  state = state._replace(target_cache=state.target_cache.replace(lengths=jnp.asarray(lengths)),
                         draft_cache=state.draft_cache.replace(lengths=jnp.asarray(lengths)))
  t_step, _ = _device_time(lambda params, st: spec.speculative_step(
      nnx.merge(dg, params[1]), nnx.merge(tg, params[0]), st, options, params[2]),
      (tp, dp, vocab), state)
  partial = Costs(draft_pass, verify, 0.0)
  return Costs(draft_pass, verify, max(t_step - step_seconds(partial, d, k, n), 0.0))


def load_or_measure_costs(key_fields: dict, measure, log=None) -> tuple[Costs, dict]:
  """Costs for `key_fields` from the cache file, else `measure()` (then cached). Returns
  (costs, info: {source: 'cache' | 'measured', file, key, timing_s})."""
  path, key = costs_file(), costs_key(key_fields)
  table = {}
  if os.path.isfile(path):
    try:
      with open(path) as f:
        table = json.load(f)
    except (OSError, json.JSONDecodeError):
      table = {}  # a broken cache is re-timed and rewritten
  if isinstance(table, dict) and isinstance(table.get(key), dict):
    try:
      return Costs.from_json(table[key]["costs"]), {"source": "cache", "file": path,
                                                    "key": key, "timing_s": 0.0}
    except (KeyError, TypeError, ValueError):
      pass
  if log:
    log("decode.tree=auto: timing the draft pass and the verify forward on this device "
        f"(cached in {path})")
  t0 = time.perf_counter()
  costs = measure()
  elapsed = time.perf_counter() - t0
  table = table if isinstance(table, dict) else {}
  table[key] = {"fields": key_fields, "costs": costs.to_json(), "timing_s": round(elapsed, 3),
                "time": time.time()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(table, f, indent=1)
  os.replace(tmp, path)
  return costs, {"source": "measured", "file": path, "key": key, "timing_s": round(elapsed, 3)}


# ------------------------------------------------------------------------- engine hook


def timing_shape(settings) -> tuple[int, int]:
  """(prefix, cache_len) timed: the smallest prompt bucket, and a cache that holds it, the
  new tokens and the largest candidate tree (as DecodeEngine.batch_shape derives it)."""
  from fspad_jax.decoding.engine import CACHE_ROUND, round_up
  prefix = settings.min_prompt_bucket
  if settings.cache_len:
    return min(prefix, settings.cache_len - settings.max_new_tokens), settings.cache_len
  reserve = max(NODES) + 1 + max(DEPTHS) + 1
  return prefix, round_up(prefix + settings.max_new_tokens + reserve, CACHE_ROUND)


def choose_for_engine(engine, generator, log=None) -> tuple[object, dict]:
  """(settings with the chosen tree, the summary's `tree_auto` dict) for a speculative
  DecodeEngine whose settings say decode.tree=auto. Acceptance: the draft's train.py
  metrics at draft.path; costs: cached per device and shape, else timed here."""
  import dataclasses as dc

  import jax
  from flax import nnx

  from fspad_jax.decoding.settings import DecodeError, config_value

  s = engine.settings
  path = config_value(engine.config, "draft.path", "")
  acceptance = acceptance_from_workdir(path)
  if acceptance is None:
    raise DecodeError(f"config key decode.tree='auto' needs the draft's per-depth agreement: "
                      f"draft.path={path!r} has no train.py metrics.jsonl with top1_depth* "
                      f"(set decode.tree='' and the tree sizes instead)")
  pins = dict(s.tree_pins)
  grid = candidates(pins)
  if not grid:
    raise DecodeError(f"config key decode.tree: no tree of the search grid fits the pins "
                      f"{pins} (nodes must be at most top_k + (depth-1) * top_k^2)")
  prefix, cache_len = timing_shape(s)
  outside = lambda timed, wanted: sorted(set(timed) | {v for v in wanted
                                                     if not min(timed) <= v <= max(timed)})
  top_ks = outside(TIMED_TOP_KS, {k for _, k, _ in grid})  # pins beyond the timed range
  tokens = outside(TIMED_TOKENS, {n + 1 for _, _, n in grid})
  device = jax.devices()[0]
  fields = {"device_kind": device.device_kind, "backend": jax.default_backend(),
            "devices": jax.device_count(), "mesh": dict(engine.mesh.shape),
            "target": dc.asdict(engine.cfg),
            "draft": dc.asdict(nnx.merge(generator.draft_graphdef,
                                         generator.draft_params).cfg),
            "draft_info": {k: v for k, v in (engine.draft_info or {}).items() if k != "path"},
            "batch": s.batch_size, "prefix": prefix, "cache_len": cache_len,
            "top_ks": top_ks, "tokens": tokens, "reference": REFERENCE_TREE,
            "calls": (TIMED_CALLS, LOOP_CALLS), "jax": jax.__version__}
  costs, info = load_or_measure_costs(
      fields, lambda: measure_costs(generator, s.batch_size, prefix, cache_len, top_ks, tokens),
      log)
  choice = choose_tree(acceptance, costs, grid)
  fixed = (s.tree_depth, s.tree_top_k, s.total_tokens)
  report = {**choice.to_json(), "acceptance_source": acceptance.source,
            "acceptance_top1": [round(a, 4) for a in acceptance.top1],
            "acceptance_top3": [round(a, 4) for a in acceptance.top3],
            "pins": pins, "min_gain": MIN_GAIN, "timing": {**info, "batch": s.batch_size,
                                                           "prefix": prefix,
                                                           "cache_len": cache_len},
            "costs_ms": {"draft_pass": {k: round(v * 1e3, 4)
                                        for k, v in costs.draft_pass.items()},
                         "verify": {k: round(v * 1e3, 4) for k, v in costs.verify.items()},
                         "overhead": round(costs.overhead * 1e3, 4)}}
  if fixed[2] <= num_buffer_nodes(fixed[1], fixed[0]):
    tau = expected_tau(acceptance, *fixed)
    report["configured_tree"] = {
        **dict(zip(PIN_NAMES, fixed)), "expected_tau": round(tau, 4),
        "expected_speedup": round(tau / step_seconds(costs, *fixed) * choice.vanilla_step_s,
                                  4)}
  if choice.vanilla:
    return s, report
  d, k, n = choice.tree
  return dc.replace(s, tree_depth=d, tree_top_k=k, total_tokens=n), report


def format_choice(report: dict, measured_tau: float | None) -> str:
  """One line for decode_lib.format_summary."""
  if report["choice"] == "vanilla":
    best = report["best_tree"]
    why = (f"the best tree, {best['depth']}/{best['top_k']}/{best['nodes']}, expected "
           f"{report['best_tree_expected_speedup']:.2f}x" if best else "no tree fits")
    return (f"tree auto: vanilla decoding ({why}, below the {report['min_gain']:.2f}x a "
            f"tree must promise; timings {report['timing']['source']})")
  c = report["choice"]
  measured = "-" if measured_tau is None else f"{measured_tau:.2f}"
  return (f"tree auto: depth {c['depth']} top-k {c['top_k']} nodes {c['nodes']}: expected "
          f"tau {report['expected_tau']:.2f} (measured {measured}), expected speedup "
          f"{report['expected_speedup']:.2f}x; timings {report['timing']['source']}")
