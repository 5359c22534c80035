"""Batch decoding job: JSONL prompts in, JSONL completions out; rerun to resume.

  python decode.py --config=configs/tiny.py --config.target.path=DIR \
    --input=prompts.jsonl --output=out.jsonl [--strict] [--seed=0]
  python decode.py --config=configs/tiny.py --config.target.path=DIR \
    --config.decode.method=fspad --config.draft.path=WORKDIR \
    --input=prompts.jsonl --output=out.jsonl --compare_vanilla

Any config key can be overridden, e.g. --config.decode.max_new_tokens=256. Methods:
vanilla, and eagle / fspad (tree speculative decoding with the draft at draft.path: a
train.py workdir, one step's checkpoint or an EAGLE-layout directory; tree settings
decode.tree_depth, decode.tree_top_k, decode.total_tokens). --compare_vanilla also decodes
every batch with vanilla decoding on the same loaded target and reports the speedup as the
ratio of tokens/s over warm calls only (both methods decode each batch
decode.timing_repeats times, interleaved, and the median counts); greedy runs check that
the outputs are identical. It ends with a short summary; the full one is
<output>.summary.json. Exit status 1 with one line on a user error, including a job whose
every record was skipped; Ctrl-C exits 130 with one line (what was written; a rerun
resumes). One job at a time owns an output (<output>.lock), and a rerun with other settings
than those in <output>.settings.json is refused unless --allow_changed_settings (README:
"When things go wrong"). The logic lives in fspad_jax/decode_lib.py (run_decode).
"""

from fspad_jax import cli, console

console.quiet_imports()  # before transformers is imported

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_INPUT = flags.DEFINE_string("input", None, "Input JSONL: id + prompt|messages|turns|input_ids.")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL (appended; ids in it are skipped).")
_STRICT = flags.DEFINE_bool("strict", False, "Abort on the first malformed input line.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (overrides decode.seed).")
_COMPARE = flags.DEFINE_bool(
    "compare_vanilla", False, "Also decode with vanilla decoding: report the speedup (warm "
    "calls only) and, for greedy, check that the outputs are identical.")
_ALLOW_CHANGED = flags.DEFINE_bool(
    "allow_changed_settings", False, "Add to an existing --output although its records were "
    "decoded with other settings (see <output>.settings.json); the file then mixes them.")


def main(argv):
  del argv  # cli.run refuses positional arguments
  console.setup_logging()
  from fspad_jax import decode_lib  # imports JAX: after the flags are checked
  from fspad_jax.decoding.settings import pin_overridden_tree_keys
  try:
    # decode.tree=auto: tree sizes given on this command line pin the search.
    pin_overridden_tree_keys(_CONFIG.value, config_flags.get_override_values(flags.FLAGS["config"]))
    summary = decode_lib.run_decode(_CONFIG.value, _INPUT.value, _OUTPUT.value,
                                    strict=_STRICT.value, seed=_SEED.value,
                                    compare_vanilla=_COMPARE.value,
                                    allow_changed_settings=_ALLOW_CHANGED.value)
  except decode_lib.USER_ERRORS as e:
    cli.fail("decode.py", console.one_line(e))
  print(decode_lib.format_summary(summary))


if __name__ == "__main__":
  cli.run(main, "decode.py", required=("config", "input", "output"))
