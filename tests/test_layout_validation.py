"""Parallel layouts that cannot work are rejected before any process group, naming the flag at fault."""
import pytest

from megadual.arguments import parse_args
from megadual.config import ConfigError
from megadual.config_validate import validate_parallel, validate_world
from megadual.parallel.topology import Layout
from tests.helpers import TINY_MOE


def layout_error(world: int, tp: int = 1, pp: int = 1, ep: int = 1, ranks_per_node: int = 0, *extra: str) -> str:
    config = parse_args(TINY_MOE + list(extra) + ["--tensor-model-parallel-size", str(tp),
                                                  "--pipeline-model-parallel-size", str(pp),
                                                  "--expert-model-parallel-size", str(ep)])
    with pytest.raises(ConfigError) as err:
        validate_world(config, world, ranks_per_node or world)
    return str(err.value)


@pytest.mark.parametrize("world, tp, pp, ep, per_node, extra, flag", [
    (6, 4, 1, 1, 0, [], "--tensor-model-parallel-size"),  # world not divisible
    (4, 1, 1, 3, 0, [], "--expert-model-parallel-size"),  # EP does not divide DP x TP
    (6, 1, 1, 1, 4, [], "--moe-ranks-per-node"),  # world not divisible by the node size
    (12, 1, 1, 6, 4, [], "--expert-model-parallel-size"),  # EP slices cut across nodes
    (8, 8, 1, 1, 0, [], "--num-attention-heads"),
    (8, 8, 1, 1, 0, ["--multi-latent-attention"], "--num-attention-heads"),  # MLA's heads split over TP too
    (2, 2, 1, 1, 0, ["--ffn-hidden-size", "171"], "--ffn-hidden-size"),
    (2, 2, 1, 1, 0, ["--moe-shared-expert-intermediate-size", "33"], "--moe-shared-expert-intermediate-size"),
    (2, 2, 1, 1, 0, ["--seq-length", "33"], "--seq-length"),
    (4, 1, 1, 4, 0, ["--num-experts", "6", "--moe-router-topk", "2"], "--num-experts"),
    (4, 1, 1, 4, 2, ["--moe-router-max-nodes", "4", "--moe-router-topk", "4"], "--moe-router-max-nodes"),
    (4, 1, 1, 4, 1, ["--moe-router-max-nodes", "3", "--moe-router-topk", "2"], "--moe-router-max-nodes"),
    (8, 1, 1, 1, 0, [], "--global-batch-size"),  # 8 samples over DP 8 x micro-batch 2
    (4, 1, 4, 1, 0, ["--num-layers", "4", "--pipeline-schedule", "dualpipe"], "--num-microbatches"),
    (2, 1, 2, 1, 0, ["--num-layers", "4", "--pipeline-schedule", "dualpipe", "--micro-batch-size", "1",
                     "--global-batch-size", "5"], "--num-microbatches"),  # odd under dualpipe
])
def test_bad_layout_names_flag(world, tp, pp, ep, per_node, extra, flag):
    assert flag in layout_error(world, tp, pp, ep, per_node, *extra)


def test_moe_ranks_per_node_overrides_the_launchers():
    config = parse_args(TINY_MOE + ["--expert-model-parallel-size", "4", "--moe-router-max-nodes", "2",
                                    "--moe-ranks-per-node", "2"])
    validate_world(config, world_size=4, ranks_per_node=4)  # two nodes of two ranks: M=2 fits
    with pytest.raises(ConfigError, match="--moe-router-max-nodes"):
        validate_world(parse_args(TINY_MOE + ["--expert-model-parallel-size", "4", "--moe-router-max-nodes", "2"]),
                       world_size=4, ranks_per_node=4)  # one node


def test_good_layouts_pass():
    validate_world(parse_args(TINY_MOE + ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4"]),
                   world_size=4, ranks_per_node=4)
    validate_world(parse_args(TINY_MOE + ["--num-layers", "4", "--pipeline-model-parallel-size", "4",
                                          "--pipeline-schedule", "dualpipe", "--micro-batch-size", "1"]),
                   world_size=4, ranks_per_node=4)


def test_topology_layout_uses_the_same_rule():
    with pytest.raises(ConfigError, match="world size 6 is not divisible by --tensor-model-parallel-size"):
        Layout(6, tp=4).validate()


def test_default_node_limit_fits_fewer_nodes():
    config = parse_args(TINY_MOE)  # M defaults to 4; with 2 nodes that is simply no limit
    validate_parallel(config, tp=1, ep=4, nodes_in_ep_group=2)


def test_vocab_is_padded_to_a_multiple_of_tp():
    assert parse_args(TINY_MOE + ["--vocab-size", "500", "--tensor-model-parallel-size", "4"]).model.vocab_size \
        % (128 * 4) == 0
