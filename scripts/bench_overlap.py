"""The paired F&B chunk with and without overlapping the expert all-to-alls, under EP over gloo.

    python scripts/bench_overlap.py [--ep 2] [--hidden 512] [--seq 256] [--micro-batch 4] [--iters 10]

Each of `--ep` processes (one thread each) holds a full MoE model with its share of
the experts. One pair = the forward of micro-batch A and the backward of micro-batch
B (whose forward ran before, untimed). "sequential" runs A's forward, then B's
backward; "overlapped" runs B's backward and resumes A's forward at each all-to-all
B launches (megadual/pipeline/overlap.py). The two alternate within one run; the
median of each is printed with their ratio, and the results agree exactly.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadual.config import ModelConfig
from megadual.model.gpt import build_chunk, full_model_stage
from megadual.parallel.comm import BackwardOverlap
from megadual.parallel.context import BuildContext
from megadual.pipeline.overlap import overlapped_forward_backward
from megadual.training.distributed import free_port


def model_config(args) -> ModelConfig:
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=2 * args.hidden,
                       num_attention_heads=8, num_query_groups=8, seq_length=args.seq, vocab_size=1024,
                       num_experts=4 * args.ep, moe_ffn_hidden_size=args.hidden, moe_router_topk=4,
                       moe_shared_expert_intermediate_size=args.hidden, moe_first_k_dense=1)


def one_pair(model, overlap: BackwardOverlap, batch_a, batch_b, overlapped: bool) -> tuple[float, torch.Tensor]:
    loss_b = model(*batch_b).loss
    dist.barrier()
    start = time.perf_counter()
    if overlapped:
        loss_a = overlapped_forward_backward(model.forward_steps(*batch_a), loss_b.backward, nullcontext,
                                             overlap).loss
    else:
        loss_a = model(*batch_a).loss
        loss_b.backward()
    dist.barrier()
    elapsed = time.perf_counter() - start
    loss_a.backward()  # release A's graph, untimed
    model.zero_grad(set_to_none=True)
    return elapsed, loss_a.detach()


def worker(rank: int, args, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.ep)
    config = model_config(args)
    model = build_chunk(config, full_model_stage(config), seed=1, ctx=BuildContext(ep_group=dist.group.WORLD))
    overlap = BackwardOverlap()
    model.attach_schedule(None, overlap)
    g = torch.Generator().manual_seed(rank)
    batches = [tuple(torch.randint(0, 1024, (args.micro_batch, args.seq), generator=g) for _ in range(2))
               for _ in range(2)]
    times = {False: [], True: []}
    for i in range(args.warmup + args.iters):
        for overlapped in (i % 2 == 0, i % 2 == 1):
            elapsed, loss = one_pair(model, overlap, *batches, overlapped)
            if i >= args.warmup:
                times[overlapped].append(elapsed)
            if overlapped:
                same = torch.equal(loss, one_pair(model, overlap, *batches, False)[1])
    if rank == 0:
        queue.put((statistics.median(times[False]), statistics.median(times[True]), same))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(args, free_port(), queue), nprocs=args.ep, start_method="spawn")
    sequential, overlapped, same = queue.get()
    print(f"EP{args.ep} hidden {args.hidden} seq {args.seq} micro-batch {args.micro_batch} "
          f"layers {args.layers}: one F&B pair")
    print(f"  sequential  {sequential * 1e3:8.1f} ms")
    print(f"  overlapped  {overlapped * 1e3:8.1f} ms   sequential/overlapped = {sequential / overlapped:.2f}x"
          f"   same loss: {same}")


if __name__ == "__main__":
    main()
