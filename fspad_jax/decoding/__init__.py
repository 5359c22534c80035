"""The pieces of a decode.py job (fspad_jax/decode_lib.py runs them):

  settings.py  the validated `decode` config section, DecodeError (one line per mistake)
  engine.py    DecodeEngine: loaded target (+ draft), compiled method, static-shape batches
  records.py   JSONL input records and the append-only, fsync'ed output file
  output_guard.py  one job per output (<output>.lock) and its settings (<output>.settings.json)
  timing.py    decode-time accounting (warm calls; speculative against vanilla, interleaved)
"""
