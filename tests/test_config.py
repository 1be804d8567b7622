"""Bad flags are rejected at start-up with a message naming the flag."""
import pytest

from megadual.config import ConfigError, parse_args
from tests.helpers import TINY_MOE


def error_for(*extra: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_args(TINY_MOE + list(extra))
    return str(err.value)


@pytest.mark.parametrize("extra, flag", [
    (["--hidden-size", "66"], "--hidden-size"),
    (["--moe-router-topk", "9"], "--moe-router-topk"),
    (["--global-batch-size", "7"], "--global-batch-size"),
    (["--data-path", "x"], "--data-path"),
    (["--min-lr", "1"], "--min-lr"),
    (["--moe-first-k-dense", "9"], "--moe-first-k-dense"),
    (["--num-experts", "6", "--moe-router-num-groups", "4"], "--moe-router-num-groups"),
    (["--moe-router-num-groups", "4", "--moe-router-max-nodes", "2", "--moe-router-topk", "3"],
     "--moe-router-max-nodes"),
    (["--group-query-attention", "--num-query-groups", "3"], "--num-query-groups"),
    (["--save-interval", "5"], "--save-interval"),
    (["--moe-fp8-dispatch"], "--moe-fp8-dispatch"),
    (["--lr-warmup-iters", "500", "--train-iters", "10"], "--lr-warmup-iters"),
])
def test_invalid_combination_names_flag(extra, flag):
    assert flag in error_for(*extra)


def test_null_tokenizer_needs_vocab_size():
    args = [a for a in TINY_MOE]
    i = args.index("--vocab-size")
    del args[i:i + 2]
    with pytest.raises(ConfigError, match="--vocab-size"):
        parse_args(args)


def test_megatron_group_topk_maps_to_max_nodes_and_vocab_is_padded():
    c = parse_args(TINY_MOE + ["--moe-router-group-topk", "2", "--make-vocab-size-divisible-by", "100"])
    assert c.model.moe_router_max_nodes == 2
    assert c.model.vocab_size == 600 and c.data.vocab_size == 512


def test_unknown_choice_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        parse_args(TINY_MOE + ["--moe-router-score-function", "relu"])
