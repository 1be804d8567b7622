"""Hugging Face's sharded safetensors layout: model-0000i-of-0000n.safetensors and
model.safetensors.index.json (`weight_map`: tensor name -> file), or one model.safetensors.

DeepSeek released V3 with FP8 weights: an E4M3 `X.weight` and an FP32 `X.weight_scale_inv`, one
scale per block of config.json's `quantization_config.weight_block_size` (128 x 128), the weight
being E4M3 x scale. `HFWeights` reads such a weight dequantized."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megadual.fp8.quant import E4M3, WEIGHT_BLOCK, Fp8Tensor
from megadual.hf.config_map import UnsupportedModel

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name in sorted(sizes):
        nbytes = sizes[name]
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_sharded(sizes: dict[str, int], read: Callable[[list[str]], dict[str, torch.Tensor]], out_dir: str,
                  max_shard_bytes: int) -> list[str]:
    """Write the tensors named in `sizes` (their bytes) in shards of at most `max_shard_bytes` (a
    bigger tensor gets a shard of its own) with the index, each shard's tensors from one call of
    `read(names)`; returns the shard file names."""
    os.makedirs(out_dir, exist_ok=True)
    shards = _shards(sizes, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, names in zip(files, shards):
        tensors = read(names)
        save_file({n: tensors[n].contiguous() for n in names}, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(sizes.values())
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


@contextmanager
def _opened(path: str) -> Iterator:
    """safe_open(path), a damaged file refused in one line naming it."""
    try:
        with safe_open(path, "pt") as f:
            yield f
    except SafetensorError as e:
        raise UnsupportedModel(f"{path}: not a readable safetensors file ({e})") from None


class HFWeights:
    """The tensors of a Hugging Face model folder, read one at a time; an FP8 weight with its scales
    is read as one FP32 tensor, and the scales are not listed."""

    def __init__(self, folder: str, block: tuple[int, int] = WEIGHT_BLOCK):
        index = os.path.join(folder, INDEX)
        if os.path.exists(index):
            self._file_of = {n: os.path.join(folder, file) for n, file in _weight_map(index).items()}
        elif os.path.exists(os.path.join(folder, SINGLE)):
            with _opened(os.path.join(folder, SINGLE)) as f:
                self._file_of = dict.fromkeys(f.keys(), os.path.join(folder, SINGLE))
        else:
            raise FileNotFoundError(f"{folder} has neither {INDEX} nor {SINGLE}")
        self._block = block
        self._scaled = {n.removesuffix(SCALE_SUFFIX) for n in self._file_of if n.endswith(SCALE_SUFFIX)}

    def names(self) -> Iterable[str]:
        return [name for name in self._file_of if not name.endswith(SCALE_SUFFIX)]

    def get(self, name: str) -> torch.Tensor:
        tensor = self._read(name)
        if name not in self._scaled:
            return tensor
        scale = self._read(name + SCALE_SUFFIX)
        blocks = [-(-size // block) for size, block in zip(tensor.shape, self._block)]
        if tensor.dtype != E4M3 or tensor.dim() != 2 or list(scale.shape) != blocks:
            raise UnsupportedModel(f"{name}: {tensor.dtype} {list(tensor.shape)} with {SCALE_SUFFIX} "
                                   f"{list(scale.shape)}; expected E4M3 with {blocks} scales of "
                                   f"{list(self._block)} blocks")
        return Fp8Tensor(tensor, scale.float(), self._block).dequantize()

    def _read(self, name: str) -> torch.Tensor:
        with _opened(self._file_of[name]) as f:
            tensor = f.get_tensor(name)
        if tensor.is_floating_point() and not torch.isfinite(tensor.float()).all():
            raise UnsupportedModel(f"{name} in {self._file_of[name]} holds NaN or Inf values")
        return tensor

    def shape(self, name: str) -> torch.Size:
        with _opened(self._file_of[name]) as f:
            return torch.Size(f.get_slice(name).get_shape())


def _weight_map(index: str) -> dict[str, str]:
    """The index's tensor name -> file name, refused in one line naming it when it is not one."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedModel(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and os.path.basename(v) == v
                                                   for v in weight_map.values()):
        raise UnsupportedModel(f"{index}: its weight_map should map tensor names to file names in its folder")
    return weight_map
