"""Minimal, zero-copy safetensors reading and writing with numpy memory maps.

Reading maps each file once and hands out views, so a caller can copy just the slice of a
tensor that one device needs. bf16 is handled through ml_dtypes (numpy has no bfloat16).
No pickle, no code execution: a safetensors file is a JSON header plus raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from fspad_jax.config import ConfigError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ConfigError):
  """A file that is not a complete safetensors file (a user error: one line, no traceback)."""


class SafetensorsFile:
  """One .safetensors file: `names()`, `shape(name)`, and `view(name)` (a read-only memmap)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      raw_len = f.read(8)
      if len(raw_len) != 8:
        raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      (header_len,) = struct.unpack("<Q", raw_len)
      if header_len > os.path.getsize(path) - 8:
        raise SafetensorsError(f"{path}: corrupt safetensors header length {header_len}")
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", {}) or {}
    self._entries = header
    self._data_start = 8 + header_len
    self._mmap = None
    self._check_entries(os.path.getsize(path) - self._data_start)

  def _check_entries(self, data_bytes: int) -> None:
    """Every tensor's byte range lies inside the file and fits its shape and dtype, so a
    truncated file (an interrupted copy or download) is refused here, by name, before any
    tensor is read."""
    for name, entry in self._entries.items():
      try:
        start, end = (int(x) for x in entry["data_offsets"])
        shape = tuple(int(x) for x in entry["shape"])
        code = entry["dtype"]
      except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{self.path}: corrupt safetensors header entry for {name!r}"
                               ) from None
      itemsize = _DTYPES[code].itemsize if code in _DTYPES else None
      if end > data_bytes:
        raise SafetensorsError(
            f"{self.path}: truncated: tensor {name!r} ends at byte {end} of the data, but "
            f"the file holds {data_bytes} (an interrupted copy or download?)")
      if start < 0 or end < start or (
          itemsize is not None and end - start != int(np.prod(shape, dtype=np.int64)) * itemsize):
        raise SafetensorsError(f"{self.path}: tensor {name!r} byte size does not match its "
                               "shape")

  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    code = self._entries[name]["dtype"]
    if code not in _DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
    return _DTYPES[code]

  def view(self, name: str) -> np.ndarray:
    """A read-only view of the tensor's bytes on disk; nothing is read until sliced."""
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    entry = self._entries[name]
    start, end = entry["data_offsets"]
    dtype = self.dtype(name)
    buf = self._mmap[self._data_start + start:self._data_start + end]
    shape = tuple(entry["shape"])
    if buf.size != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise SafetensorsError(f"{self.path}: tensor {name!r} byte size does not match its shape")
    return buf.view(dtype).reshape(shape)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors (numpy, including ml_dtypes.bfloat16) to `path` atomically."""
  header, offset = {}, 0
  arrays = {}
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in _NAMES:
      raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be written")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays[name] = arr
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays.values():
      f.write(arr.tobytes())
  os.replace(tmp, path)


class TensorIndex:
  """All tensors of a model directory: one `model.safetensors`, or shards listed in
  `model.safetensors.index.json`."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f).get("weight_map")
      except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise SafetensorsError(f"{index_path}: not a safetensors index ({e})") from None
      if not isinstance(weight_map, dict):
        raise SafetensorsError(f"{index_path}: no 'weight_map' object")
      for fname in sorted(set(weight_map.values())):
        fpath = os.path.join(model_dir, fname)
        if not os.path.isfile(fpath):
          raise SafetensorsError(f"{index_path} lists shard {fname!r}, which does not exist")
        self._files[fname] = SafetensorsFile(fpath)
      for name, fname in weight_map.items():
        if name not in self._files[fname]._entries:
          raise SafetensorsError(f"{index_path}: tensor {name!r} is not in shard {fname!r}")
        self._where[name] = fname
    elif os.path.isfile(single):
      self._files["model.safetensors"] = SafetensorsFile(single)
      self._where = {n: "model.safetensors" for n in self._files["model.safetensors"].names()}
    else:
      present = sorted(os.listdir(model_dir))
      hint = ""
      if any(p.endswith((".bin", ".pt", ".pth")) for p in present):
        hint = (" It has pickle-based weights, which fspad_jax does not load (unpickling "
                "can execute code); convert them to safetensors first.")
      raise SafetensorsError(
          f"{model_dir!r} has no model.safetensors or model.safetensors.index.json.{hint}")

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def file(self, name: str) -> SafetensorsFile:
    return self._files[self._where[name]]

  def shape(self, name: str) -> tuple[int, ...]:
    return self.file(name).shape(name)

  def view(self, name: str) -> np.ndarray:
    return self.file(name).view(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)
