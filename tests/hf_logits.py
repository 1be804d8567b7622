"""Full-vocabulary logits of megadual models under any layout, and of a transformers model, for the
Hugging Face conversion tests (tests/test_hf_checkpoint.py)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megadual.arguments import parse_args
from megadual.config import RunConfig
from megadual.config_validate import validate_world
from megadual.pipeline.stage_model import StageModel
from megadual.training.checkpoint.offline import tracked_checkpoint
from megadual.training.checkpoint.state import checkpoint_state, restore_state
from megadual.training.distributed import local_world_size
from megadual.training.loop import build_model, build_topology

LAYOUTS = {"TP2xEP2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
           "PP2": ["--pipeline-model-parallel-size", "2"]}


@torch.no_grad()
def stage_logits(model: StageModel, tokens: torch.Tensor, topo) -> torch.Tensor | None:
    """Logits [batch, seq, padded vocab] of `tokens` [batch, seq] on the last pipeline stage's ranks
    (None elsewhere); the stages pass hidden states with plain sends (1F1B layout)."""
    chunk = model.chunks[0]
    pp_ranks, pp = topo.members["pp"], topo.pp_rank
    b, s = tokens.shape
    if chunk.stage.has_embedding:
        hidden = chunk.embed(tokens)
    else:
        hidden = torch.empty(s, b, model.config.hidden_size)
        dist.recv(hidden, pp_ranks[pp - 1])
    for layer in chunk.layers.values():
        hidden = layer(hidden)
    if not chunk.stage.has_head:
        dist.send(hidden, pp_ranks[pp + 1])
        return None
    logits = chunk.output_layer(chunk.final_norm(hidden))
    if topo.layout.tp > 1:
        parts = [torch.empty_like(logits) for _ in range(topo.layout.tp)]
        dist.all_gather(parts, logits.contiguous(), group=topo.group("tp"))
        logits = torch.cat(parts, -1)
    return logits.transpose(0, 1)


def run_config(flags: list[str]) -> RunConfig:
    return parse_args(flags + ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--finetune"])


def loaded_logits(flags: list[str], ckpt: str, tokens: torch.Tensor) -> torch.Tensor | None:
    """Build the layout of `flags` in the running world, load `ckpt` (--finetune), return its logits."""
    config = run_config(flags + ["--load", ckpt])
    validate_world(config, dist.get_world_size(), local_world_size())
    topo = build_topology(config)
    model = build_model(config, topo, torch.device("cpu")).eval()
    folder, _ = tracked_checkpoint(ckpt)
    optimizer = torch.optim.AdamW(model.parameters())
    state = checkpoint_state(model, optimizer, with_optimizer=False)
    dcp.load(state, checkpoint_id=folder)
    restore_state(model, optimizer, state)
    return stage_logits(model, tokens, topo)


def layout_worker(rank: int, world: int, port: int, flags: list[str], ckpt: str, tokens: torch.Tensor,
                  out: str) -> None:
    """One rank of a spawned world: the logits under every layout of LAYOUTS, saved by a last-stage rank."""
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, layout in LAYOUTS.items():
            logits = loaded_logits(flags + layout, ckpt, tokens)
            if logits is not None and rank == world - 1:
                torch.save(logits, os.path.join(out, f"{name}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())

