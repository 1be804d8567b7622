"""Reading a checkpoint runs no code from it, whoever wrote it.

DCP stores two kinds of pickle: the folder's `.metadata` (read by FileSystemReader with plain
`pickle.load`) and each non-tensor value of the state dict, a "byte item" in a `.distcp` shard
(read by DefaultLoadPlanner with `torch.load(weights_only=False)`). A pickle can name any
function to call while it is read, so both are read here through allowlists, kept in this one
place:

- `.metadata`: an unpickler that finds only the classes DCP's metadata consists of
  (METADATA_GLOBALS); any other global refuses the file before anything is called;
- byte items: `torch.load(weights_only=True)` (torch's restricted unpickler: tensors and plain
  Python values), and the value must then be a hyper-parameter (BYTE_ITEM_TYPES), which is all
  megadual saves outside tensors (the optimizer's param_groups: floats, bools, None, betas);
- tensor items: DCP already reads them with `torch.load(weights_only=True)`.

Also refused: a `.metadata` that sends DCP to a file outside the checkpoint's folder. Every
refusal is a CheckpointError naming the file. `load` is what every reader of a checkpoint
(--load, --finetune, the converters) calls instead of `torch.distributed.checkpoint.load`.
"""
from __future__ import annotations

import io
import os
import pickle
import re

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megadual.training.checkpoint.layout import CheckpointError

METADATA_FILE = ".metadata"
_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS = frozenset(
    {(f"{_DCP}.metadata", name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")}
    | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
BYTE_ITEM_TYPES = (bool, int, float, str, type(None))  # and tuples or lists of them (Adam's betas)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")
        return super().find_class(module, name)


def read_metadata(folder: str) -> Metadata:
    """The DCP metadata of `folder`, read by the restricted unpickler; CheckpointError naming the
    file when it holds anything else."""
    path = os.path.join(folder, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError:
        raise
    except Exception as e:  # a crafted pickle can raise anything; none of it is run
        raise CheckpointError(f"{path}: refused, not DCP metadata: {_one_line(e)}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: refused, not DCP metadata (a {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or os.path.basename(name) != name \
                or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: refused, it points outside its folder ({name!r})")
    return metadata


def plain_value(value) -> bool:
    """Whether a byte item's value is a hyper-parameter, as megadual saves them."""
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, BYTE_ITEM_TYPES) for v in value)
    return isinstance(value, BYTE_ITEM_TYPES)


class _Reader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read (once) by the restricted unpickler, and errors
    while reading a shard named by that shard."""

    def __init__(self, folder: str):
        super().__init__(folder)
        self._metadata = read_metadata(folder)
        self._reading = METADATA_FILE

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def _slice_file(self, file, sinfo: _StorageInfo):
        self._reading = sinfo.relative_path
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except (OSError, CheckpointError):
            raise
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, self._reading)}: refused: {_one_line(e)}") from None


class _Planner(DefaultLoadPlanner):
    """DCP's load planner with byte items read by torch's restricted unpickler."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = torch.load(value, weights_only=True)
        if not plain_value(loaded):
            raise pickle.UnpicklingError(f"{fqn} holds a {type(loaded).__name__}, not a hyper-parameter")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load(state_dict: dict, folder: str, process_group=None) -> None:
    """`torch.distributed.checkpoint.load(state_dict, checkpoint_id=folder)` reading every pickle
    through the allowlists; a refusal raises its CheckpointError on every rank."""
    reader = _Reader(folder)
    try:
        dcp.load(state_dict, storage_reader=reader, planner=_Planner(), process_group=process_group)
    except CheckpointException as e:
        refused = next((error for error, _ in e.failures.values() if isinstance(error, CheckpointError)), None)
        if refused is None:
            raise
        raise refused from None


def _one_line(error: Exception) -> str:
    """torch's weights-only error in its one informative line; any other error's first line."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = found.group(1) if found else (text.splitlines() or [""])[0]
    return f"{type(error).__name__}: {line}".strip()
