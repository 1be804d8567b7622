"""Parallel layouts that cannot work are rejected at start-up, naming the flag at fault."""
import pytest

from megadual.config import ConfigError, parse_args, validate_parallel
from megadual.parallel.topology import Layout
from tests.helpers import TINY_MOE


def layout_error(world: int, tp: int = 1, pp: int = 1, ep: int = 1, ranks_per_node: int = 0, *extra: str) -> str:
    config = parse_args(TINY_MOE + list(extra))
    layout = Layout(world, tp, pp, ep, ranks_per_node)
    with pytest.raises(ConfigError) as err:
        layout.validate()
        validate_parallel(config, layout.tp, layout.ep, layout.nodes_per_ep_group)
    return str(err.value)


@pytest.mark.parametrize("world, tp, pp, ep, per_node, extra, flag", [
    (6, 4, 1, 1, 0, [], "--tensor-model-parallel-size"),  # world not divisible
    (4, 1, 1, 3, 0, [], "--expert-model-parallel-size"),  # EP does not divide DP x TP
    (8, 8, 1, 1, 0, [], "--num-attention-heads"),
    (2, 2, 1, 1, 0, ["--ffn-hidden-size", "171"], "--ffn-hidden-size"),
    (2, 2, 1, 1, 0, ["--moe-shared-expert-intermediate-size", "33"], "--moe-shared-expert-intermediate-size"),
    (2, 2, 1, 1, 0, ["--seq-length", "33"], "--seq-length"),
    (4, 1, 1, 4, 0, ["--num-experts", "6", "--moe-router-topk", "2"], "--num-experts"),
    (4, 1, 1, 4, 2, ["--moe-router-max-nodes", "4", "--moe-router-topk", "4"], "--moe-router-max-nodes"),
    (4, 1, 1, 4, 1, ["--moe-router-max-nodes", "3", "--moe-router-topk", "2"], "--moe-router-max-nodes"),
])
def test_bad_layout_names_flag(world, tp, pp, ep, per_node, extra, flag):
    assert flag in layout_error(world, tp, pp, ep, per_node, *extra)


def test_default_node_limit_fits_fewer_nodes():
    config = parse_args(TINY_MOE)  # M defaults to 4; with 2 nodes that is simply no limit
    validate_parallel(config, tp=1, ep=4, nodes_in_ep_group=2)


def test_vocab_is_padded_to_a_multiple_of_tp():
    assert parse_args(TINY_MOE + ["--vocab-size", "500", "--tensor-model-parallel-size", "4"]).model.vocab_size \
        % (128 * 4) == 0
