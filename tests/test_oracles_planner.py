"""The planner's parameter count (rank_memory.predict, what `python -m megadual.plan` prints) equals
the parameters of the model each rank really builds, for MLA, TP, SP, EP, PP, MTP, FP8 and BF16
configurations. Each rank's model is built in this one process under a fake process group of the
layout's size (collectives are no-ops; the groups and this rank's shards are the real ones)."""
import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megadual.arguments import parse_args, resolve_device_defaults
from megadual.plan.rank_memory import predict
from megadual.training.loop import build_model, build_topology
from tests.helpers import TINY_MOE

MLA = ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "8",
       "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8"]
CASES = {
    "MLA-no-q-lora": (1, MLA[:1] + MLA[3:]),
    "MLA-TP2-SP-MTP": (2, MLA + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--mtp-num-layers", "1"]),
    "GQA-TP2xEP2-FP8": (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                            "--group-query-attention", "--num-query-groups", "2", "--fp8-format", "e4m3"]),
    "MLA-PP2-1f1b-MTP-BF16": (2, MLA + ["--pipeline-model-parallel-size", "2", "--mtp-num-layers", "1", "--bf16"]),
    "PP2-dualpipe-EP2-MTP-BF16-distopt": (4, MLA + ["--pipeline-model-parallel-size", "2", "--pipeline-schedule",
                                                     "dualpipe", "--expert-model-parallel-size", "2",
                                                     "--mtp-num-layers", "1", "--bf16",
                                                     "--use-distributed-optimizer"]),
}


def built_parameters(config, world: int, rank: int) -> int:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        model = build_model(config, build_topology(config), torch.device("cpu"))
        return sum(p.numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES)
def test_planner_counts_every_parameter_each_rank_builds(case):
    world, flags = CASES[case]
    config = resolve_device_defaults(parse_args(TINY_MOE + ["--num-layers", "4", "--global-batch-size", "16",
                                                            *flags]), "cpu")
    weight_bytes = 2 if config.train.bf16 and config.optim.use_distributed_optimizer else 4
    predicted = predict(config, world, activations=False)
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    for rank in range(0, world, world // pp):  # the first rank of each pipeline stage: TP rank 0, EP rank 0
        assert predicted[rank // (world // pp)].parameters == built_parameters(config, world, rank) * weight_bytes, \
            (case, rank)
    assert tp * pp <= world
