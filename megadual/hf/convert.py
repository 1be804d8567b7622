"""The two conversions, in one process without a process group.

export_checkpoint: a megadual checkpoint (the tracked iteration of --save's folder) -> a Hugging
Face folder: config.json, sharded model-*.safetensors and their index. It reads the checkpoint one
output shard at a time, so it needs memory for one shard (--max-shard-size-gb), not the model.
The vocabulary padding (--make-vocab-size-divisible-by) is not in a checkpoint (nor in the HF
folder): the embedding and head keep the tokenizer's rows.

import_checkpoint: a Hugging Face `DeepseekV3ForCausalLM` folder -> CKPT_DIR/iter_0000000/ and its
tracker, in the layout training writes (model tensors by global name, whole; no optimizer), which
`pretrain_moe.py --load CKPT_DIR --finetune` loads under any parallel layout. Each tensor is read
from the safetensors when DCP writes it, so at most two tensors are in memory. The architecture
flags come from config.json; the other flags given to the conversion (sequence length,
--make-vocab-size-divisible-by, TP, balancing, ...) shape the saved config as they would a run.
Both are written to CKPT_DIR/hf_model.args, one flag per line, for the training command
(`pretrain_moe.py @CKPT_DIR/hf_model.args ...`; flags after it override it).
Loading pads the vocabulary rows again, with zeros, for the run's TP.

Both refuse, unless `force`, a model Hugging Face would run differently (config_map), and unless
`overwrite`, an output folder that holds anything: a tool never writes over work it did not do.
Checkpoints are read as training reads them (safe_pickle: no code runs from them) and, given a
key, only when signed with it; imported ones are signed with the key given.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from megadual.arguments import parse_model_flags
from megadual.config import ConfigError, ModelConfig, RunConfig, model_config_differences
from megadual.fp8.quant import WEIGHT_BLOCK
from megadual.hf.config_map import UnsupportedModel, architecture_flags, behaviour_differences, hf_config
from megadual.hf.names import from_hf_rows, hf_name, mtp_copies, mtp_copy_of, our_name, to_hf_rows
from megadual.hf.safetensors_io import HFWeights, write_sharded
from megadual.model.size import meta_model
from megadual.training.checkpoint import META, TrainState, safe_pickle
from megadual.training.checkpoint.layout import CheckpointError
from megadual.training.checkpoint.offline import publish_checkpoint, tracked_checkpoint, what_is_in

VOCAB_ROWS = ("embedding.weight", "output_layer.weight")
FLAGS_FILE = "hf_model.args"


def model_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor of the one-process model by global name, as a checkpoint holds it: the
    embedding and head with the real vocabulary's rows (training saves no padding; a checkpoint
    predating that has no unpadded size and holds its padded rows)."""
    shapes = {name: tensor.shape for name, tensor in meta_model(config).state_dict().items()}
    return {name: torch.Size([config.real_vocab_size, *shape[1:]]) if name in VOCAB_ROWS else shape
            for name, shape in shapes.items()}


def _check_behaviour(m: ModelConfig, force: bool, warn: Callable[[str], None]) -> None:
    differences = behaviour_differences(m)
    if differences and not force:
        raise UnsupportedModel("Hugging Face would compute this model differently (--force converts anyway):\n  "
                               + "\n  ".join(differences))
    for difference in differences:
        warn(f"warning: {difference}")


@contextmanager
def _without_process_group():
    """DCP in one process, without its warning that this is one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield


def read_tensors(path: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The model tensors named in `shapes`, whole, from the checkpoint folder `path` (DCP reads
    only those)."""
    state = {name: torch.empty(shape) for name, shape in shapes.items()}
    with _without_process_group():
        safe_pickle.load({"model": state}, path)
    return state


def check_destination(folder: str, flag: str, overwrite: bool) -> None:
    """Refuse to write into `folder` when it holds anything, unless `overwrite`."""
    found = what_is_in(folder)
    if found is not None and not overwrite:
        raise CheckpointError(f"{flag}: {folder} {found}; give an empty or new folder (--overwrite to write "
                              f"there anyway)")


def read_checkpoint(root: str, key: bytes | None = None) -> tuple[dict, ModelConfig, dict[str, torch.Tensor]]:
    """(the saved run's config as a dict, its ModelConfig, every model tensor whole) of the tracked
    iteration under `root`."""
    path, meta = tracked_checkpoint(root, key)
    run = meta["config"]
    model = ModelConfig(**run["model"])
    return run, model, read_tensors(path, model_shapes(model))


def export_checkpoint(root: str, out_dir: str, force: bool = False, max_shard_bytes: int = 5 << 30,
                      warn: Callable[[str], None] = print, overwrite: bool = False,
                      key: bytes | None = None) -> list[str]:
    """Write the HF folder of the checkpoint under `root`, reading one shard's tensors at a time;
    returns the shard file names."""
    check_destination(out_dir, "--to-hf", overwrite)
    path, meta = tracked_checkpoint(root, key)
    run = meta["config"]
    m, vocab = ModelConfig(**run["model"]), run["data"]["vocab_size"]
    config = hf_config(m, vocab)
    _check_behaviour(m, force, warn)
    shapes = model_shapes(m)
    copies = mtp_copies(m.num_layers, m.mtp_num_layers)
    source = {hf_name(name, m.num_layers): name for name in shapes} | copies

    def exported_shape(hf: str) -> torch.Size:
        shape = shapes[source[hf]]
        return torch.Size([vocab, *shape[1:]]) if source[hf] in VOCAB_ROWS else shape

    def read_shard(names: list[str]) -> dict[str, torch.Tensor]:
        ours = read_tensors(path, {source[n]: shapes[source[n]] for n in names})
        tensors = {n: to_hf_rows(source[n], ours[source[n]], m)[:exported_shape(n)[0]] for n in names}
        # An MTP copy may share a shard with its source: safetensors wants its own storage.
        return {n: t.clone() if n in copies else t for n, t in tensors.items()}

    sizes = {n: exported_shape(n).numel() * 4 for n in source}  # FP32, as read_tensors reads
    files = write_sharded(sizes, read_shard, out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return files


def _mtp_layers(names, num_layers: int) -> int:
    indices = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    return len({i for i in indices if i >= num_layers})


def agreeing_config(architecture: list[str], flags: list[str]) -> RunConfig:
    """The run config of `flags` with the architecture flags; ConfigError listing every
    architecture flag of `flags` that disagrees with config.json."""
    config = parse_model_flags(flags + architecture)
    differences = model_config_differences(dataclasses.asdict(config.model),
                                           parse_model_flags(architecture + flags).model)
    if differences:
        raise ConfigError("flags disagree with the Hugging Face config.json (the 'checkpoint' side):\n  "
                          + "\n  ".join(differences))
    return config


def _tensor_in(weights: HFWeights, name: str, ours: str, m: ModelConfig, interleaved: bool,
               shape: torch.Size) -> torch.Tensor:
    tensor = from_hf_rows(ours, weights.get(name).float(), m, interleaved)
    if ours in VOCAB_ROWS and tensor.shape[0] < shape[0]:  # pad the vocabulary as the run does
        tensor = torch.cat([tensor, tensor.new_zeros(shape[0] - tensor.shape[0], *tensor.shape[1:])])
    return tensor


def _check_shape(weights: HFWeights, name: str, ours: str, shape: torch.Size) -> None:
    theirs = weights.shape(name)
    fits = theirs[1:] == shape[1:] and theirs[0] <= shape[0] if ours in VOCAB_ROWS else theirs == shape
    if not fits:
        raise UnsupportedModel(f"{name}: shape {list(theirs)}, megadual's {ours} is {list(shape)}")


def read_hf(hf_dir: str, flags: list[str], force: bool = False, warn: Callable[[str], None] = print
            ) -> tuple[RunConfig, list[str], Callable[[str], torch.Tensor]]:
    """(run config, architecture flags, a function reading one of our tensors by global name) of a
    Hugging Face folder, whose names, shapes and MTP copies are checked here."""
    hf = _read_config(os.path.join(hf_dir, "config.json"))
    try:
        block = tuple(hf.get("quantization_config", {}).get("weight_block_size", WEIGHT_BLOCK))
        weights = HFWeights(hf_dir, block)
        num_layers = hf["num_hidden_layers"]
        architecture = architecture_flags(hf, _mtp_layers(weights.names(), num_layers))
    except UnsupportedModel:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UnsupportedModel(f"{hf_dir}/config.json: {type(e).__name__}: {e} (not a DeepSeek-V3 config)") from None
    config = agreeing_config(architecture, flags)
    m = config.model
    _check_behaviour(m, force, warn)
    shapes, source, copies = model_shapes(m), {}, {}
    for name in weights.names():
        try:
            ours = our_name(name, num_layers)
        except KeyError as unknown:
            raise UnsupportedModel(f"{hf_dir}: {unknown.args[0]}") from None
        if ours is None:
            copies[name] = mtp_copy_of(name)
        else:
            _check_shape(weights, name, ours, shapes[ours])
            source[ours] = name
    missing = sorted(set(shapes) - set(source))
    if missing:
        raise UnsupportedModel(f"{hf_dir} lacks tensors megadual needs: {', '.join(missing[:8])}"
                               + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    for name, ours in copies.items():
        if not torch.equal(weights.get(name), weights.get(source[ours])):
            raise UnsupportedModel(f"{name} differs from the main model's; megadual's MTP shares {ours}")
    interleaved = hf.get("rope_interleave", True)
    return config, architecture, lambda ours: _tensor_in(weights, source[ours], ours, m, interleaved, shapes[ours])


class _ReadingPlanner(DefaultSavePlanner):
    """DCP's planner for a state dict of meta tensors: each tensor is read when DCP writes it."""

    def __init__(self, read: Callable[[str], torch.Tensor]):
        super().__init__()
        self._read = read

    def resolve_data(self, write_item):
        return self._read(write_item.index.fqn.removeprefix("model."))


def _read_config(path: str) -> dict:
    try:
        with open(path) as f:
            found = json.load(f)
    except ValueError as e:
        raise UnsupportedModel(f"{path}: not JSON ({e})") from None
    if not isinstance(found, dict):
        raise UnsupportedModel(f"{path}: should hold a JSON object, holds a {type(found).__name__}")
    return found


def import_checkpoint(hf_dir: str, root: str, flags: list[str], force: bool = False,
                      warn: Callable[[str], None] = print, overwrite: bool = False, key: bytes | None = None) -> str:
    """Write `root`/iter_0000000 from the HF folder; returns that folder."""
    check_destination(root, "--from-hf", overwrite)
    config, architecture, read = read_hf(hf_dir, flags, force, warn)
    meta = {"train_state": dataclasses.asdict(TrainState()), "config": dataclasses.asdict(config), "world_size": 1,
            "weights_only": True}
    placeholders = {name: torch.empty(shape, device="meta") for name, shape in model_shapes(config.model).items()}

    def write(folder: str) -> None:
        with _without_process_group(), _reasons_from_dcp():
            # One file per tensor: DCP's writer keeps every tensor of a file until the file is done.
            dcp.save({"model": placeholders}, storage_writer=dcp.FileSystemWriter(folder, single_file_per_rank=False),
                     planner=_ReadingPlanner(read))
        with open(os.path.join(folder, META), "w") as f:
            json.dump(meta, f, indent=1)

    os.makedirs(root, exist_ok=True)
    published = publish_checkpoint(root, 0, write, key)
    with open(os.path.join(root, FLAGS_FILE), "w") as f:
        f.write("\n".join(_flag_lines(flags + architecture)) + "\n")
    return published


@contextmanager
def _reasons_from_dcp():
    """A tensor refused while DCP writes it (NaN, a damaged file) raised as itself, not inside DCP's
    CheckpointException of every rank's traceback."""
    try:
        yield
    except CheckpointException as e:
        reason = next((error for error, _ in e.failures.values() if isinstance(error, UnsupportedModel)), None)
        if reason is None:
            raise
        raise reason from None


def _flag_lines(flags: list[str]) -> list[str]:
    """Each flag with its values on one line (an @file on its own)."""
    lines = []
    for item in flags:
        if item.startswith(("--", "@")) or not lines:
            lines.append(item)
        else:
            lines[-1] += f" {item}"
    return lines
