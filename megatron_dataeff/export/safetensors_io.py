"""safetensors files and sharded model directories, written and read a tensor at a time.

The format (https://huggingface.co/docs/safetensors): an unsigned 64-bit little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the tensors' bytes.  A directory holds
`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards named by `model.safetensors.index.json`.

Written here rather than by `safetensors.torch.save_file`, which builds the whole file in memory, and read
with plain file reads rather than `safe_open`, whose memory map keeps every page read resident: an export or
import then holds one tensor, whatever the model's size.  Files are read back by the safetensors library and
`transformers` (tests/test_export_hf.py, tests/test_import_hf.py).
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import torch

from megatron_dataeff.errors import DataError, PathNotFoundError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}


class ShardWriter:
    """safetensors shards written as tensors arrive, each tensor's bytes straight to disk: a shard's data goes
    to a scratch file, and when the next tensor would take it past `max_shard_bytes` its header and data are
    written as the shard, so memory holds one tensor, whatever the shard size.  `close` names the shards
    model.safetensors (one) or model-0000k-of-0000n.safetensors with model.safetensors.index.json."""

    def __init__(self, out: str, max_shard_bytes: int):
        self.out, self.max_shard_bytes = out, max_shard_bytes
        self.entries: dict[str, dict] = {}  # the current shard's header
        self.size = 0
        self.data = None  # the current shard's scratch data file
        self.files: list[tuple[str, list[str]]] = []  # (written shard, tensor names)
        self.total = 0
        self.numels: dict[str, int] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors form")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self.entries and self.size + nbytes > self.max_shard_bytes:
            self._flush()
        if self.data is None:
            self.data = open(os.path.join(self.out, f"shard-{len(self.files):05d}.data"), "wb")
        self.data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self.entries[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + nbytes]}
        self.size += nbytes
        self.total += nbytes
        self.numels[name] = tensor.numel()

    def _flush(self) -> None:
        """The current shard as a safetensors file: u64 header length, JSON header (padded to 8 bytes), data."""
        if self.data is None:  # no tensor at all: an empty shard
            self.data = open(os.path.join(self.out, f"shard-{len(self.files):05d}.data"), "wb")
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        fname = f"shard-{len(self.files):05d}.partial"
        with open(os.path.join(self.out, fname), "wb") as f, open(self.data.name, "rb") as data:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            shutil.copyfileobj(data, f, 16 * 2**20)
        os.remove(self.data.name)
        self.files.append((fname, list(self.entries)))
        self.entries, self.size, self.data = {}, 0, None

    def close(self) -> list[str]:
        """Write the last shard and name the files; returns their names."""
        self._flush()
        if len(self.files) == 1:
            os.replace(os.path.join(self.out, self.files[0][0]), os.path.join(self.out, SINGLE))
            return [SINGLE]
        names, weight_map = [], {}
        for k, (partial, tensors) in enumerate(self.files, 1):
            fname = f"model-{k:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(os.path.join(self.out, partial), os.path.join(self.out, fname))
            names.append(fname)
            weight_map.update({n: fname for n in tensors})
        with open(os.path.join(self.out, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return names

    def num_parameters(self, tied: bool) -> int:
        """Parameters written (a tied output layer counted once, as HF's num_parameters does)."""
        return sum(n for name, n in self.numels.items() if not (tied and name == "lm_head.weight"))


def write_safetensors(tensors, out: str, max_shard_bytes: int) -> ShardWriter:
    """model.safetensors, or shards + model.safetensors.index.json when larger than max_shard_bytes, from a
    dict or an iterable of (name, tensor) pairs (consumed as it is written)."""
    writer = ShardWriter(out, max_shard_bytes)
    for name, t in (tensors.items() if isinstance(tensors, dict) else tensors):
        writer.add(name, t)
    writer.close()
    return writer


class SafetensorsDirectory:
    """The tensors of a model directory (model.safetensors, or the shards its index names), read one at a time
    with plain file reads: `names` lists them, `get(name)` reads one."""

    def __init__(self, directory: str):
        single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
        if os.path.exists(single):
            files = [SINGLE]
        elif os.path.exists(index):
            files = sorted(set(_weight_map(index).values()))
        else:
            raise PathNotFoundError(f"{directory}: no {SINGLE} or {INDEX} (only safetensors weights are read)")
        self.entries: dict[str, tuple[str, dict, int]] = {}  # name -> (file, header entry, data start)
        for fname in files:
            path = os.path.join(directory, fname)
            if not os.path.isfile(path):
                raise PathNotFoundError(f"{path}: named by {INDEX} but not there")
            length, header = _read_header(path)
            for name, entry in header.items():
                self.entries[name] = (path, entry, 8 + length)
        self.names = set(self.entries)

    def get(self, name: str) -> torch.Tensor:
        path, entry, start = self.entries[name]
        dtype = _FROM_NAME.get(entry["dtype"])
        if dtype is None:
            raise DataError(f"{path}: {name} has dtype {entry['dtype']}, not one read here")
        begin, end = entry["data_offsets"]
        buf = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise DataError(f"{path}: truncated ({name} ends past the end of the file)")
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


_FROM_NAME = {name: dtype for dtype, name in DTYPES.items()}


def _weight_map(index: str) -> dict:
    """The {tensor name: shard file} of a model.safetensors.index.json."""
    with open(index) as f:
        try:
            data = json.load(f)
        except ValueError as exc:  # not JSON, or not UTF-8
            raise DataError(f"{index}: not valid JSON ({exc})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise DataError(f"{index}: no weight_map of tensor names to files")
    return weight_map


def _read_header(path: str) -> tuple[int, dict]:
    """(header length, {name: entry}) of a safetensors file, `__metadata__` left out."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        raw = f.read(length) if length <= size - 8 else b""
    try:
        header = json.loads(raw)
    except ValueError:  # empty, not JSON, or not UTF-8
        header = None
    if not isinstance(header, dict) or not all(isinstance(e, dict) for e in header.values()):
        raise DataError(f"{path}: not a safetensors file (no valid header)")
    header.pop("__metadata__", None)
    return length, header
