"""Every numeric flag declares its valid values beside its field; start-up refuses a value outside
them, and each rule between flags, with one message naming the flag; -h shows the same range."""
import dataclasses
import types
import typing

import pytest

from megadual.arguments import build_parser, flag_fields, parse_args, sections
from megadual.config import ConfigError
from tests.helpers import TINY_MOE


def numeric_flags() -> list[tuple[str, dataclasses.Field]]:
    found = []
    for _, cls in sections():
        hints = typing.get_type_hints(cls)
        for f in flag_fields(cls):
            hint = hints[f.name]
            kind = typing.get_args(hint)[0] if isinstance(hint, types.UnionType) else hint
            if kind in (int, float):
                found.append((kind, f))
    return found


def outside(kind: type, bounds) -> str:
    """A value just outside `bounds`, written from the bound's definition, not from its message."""
    value = bounds.high if bounds.high is not None else bounds.low - (0 if bounds.low_open else 1)
    return str(kind(value))


RANGE_CASES = [pytest.param(f.name, outside(kind, f.metadata["flag"]["range"]), id=f.name)
               for kind, f in numeric_flags()]


def test_every_numeric_flag_declares_its_range():
    missing = [f.name for _, f in numeric_flags() if f.metadata["flag"]["range"] is None]
    assert not missing and len(RANGE_CASES) > 60


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("name, value", RANGE_CASES)
def test_a_value_outside_its_range_is_refused_naming_the_flag(name, value):
    with pytest.raises(ConfigError) as err:
        parse_args(TINY_MOE + [flag(name), value])
    assert str(err.value).startswith(f"{flag(name)} must be "), str(err.value)
    assert str(err.value).endswith(f"got {value}")


def test_help_shows_the_range_the_check_uses():
    actions = {a.dest: a.help for a in build_parser()._actions}
    assert actions["global_batch_size"].endswith("(default: 8; positive)")
    assert actions["hidden_dropout"].endswith("(default: 0.0; in [0, 1))")
    assert actions["moe_aux_loss_coeff"].endswith(">= 0)")
    assert actions["rope_scaling_factor"].endswith(">= 1)")


# The probes a new user tried (issue 21): each refused at start-up with one message naming the flag.
RULES = {
    "global batch 0": (["--global-batch-size", "0"], "--global-batch-size must be positive, got 0"),
    "global batch < 0": (["--global-batch-size", "-8"], "--global-batch-size must be positive, got -8"),
    "moe ffn 0": (["--moe-ffn-hidden-size", "0"], "--moe-ffn-hidden-size must be positive, got 0"),
    "shared expert < 0": (["--moe-shared-expert-intermediate-size", "-32"],
                          "--moe-shared-expert-intermediate-size must be >= 0, got -32"),
    "query groups 0": (["--group-query-attention", "--num-query-groups", "0"],
                       "--num-query-groups must be positive, got 0"),
    "norm epsilon": (["--norm-epsilon", "-1e-6"], "--norm-epsilon must be positive, got -1e-06"),
    "warm-up": (["--lr-warmup-iters", "-1"], "--lr-warmup-iters must be >= 0, got -1"),
    "bias rate": (["--moe-router-bias-update-rate", "-0.001"], "--moe-router-bias-update-rate must be >= 0"),
    "aux loss": (["--moe-aux-loss-coeff", "-0.01"], "--moe-aux-loss-coeff must be >= 0, got -0.01"),
    "exit interval": (["--exit-interval", "-1"], "--exit-interval must be >= 0, got -1"),
    "skipped iters": (["--max-consecutive-skipped-iters", "0"], "--max-consecutive-skipped-iters must be positive"),
    "no training share": (["--split", "0,50,50"], "--split 0,50,50 gives the training split no share"),
    "empty recompute modules": (["--recompute-granularity", "selective", "--recompute-modules"],
                                "--recompute-modules needs at least one module"),
    "fp8 recipe alone": (["--fp8-recipe", "blockwise"], "--fp8-recipe needs --fp8-format"),
    "exit signal alone": (["--exit-signal", "SIGUSR1"], "--exit-signal needs --exit-signal-handler"),
    "tokenizer model with NullTokenizer": (["--tokenizer-model", "tok.json"],
                                           "--tokenizer-model is read by HuggingFaceTokenizer only"),
    "beta-fast vs slow": (["--multi-latent-attention", "--rope-scaling-factor", "4", "--beta-fast", "1",
                           "--beta-slow", "2"], "--beta-fast (1.0) must exceed --beta-slow (2.0)"),
    "mtp depth": (["--mtp-num-layers", "32"], "--mtp-num-layers (32) must be below --seq-length (32)"),
}


@pytest.mark.parametrize("extra, message", RULES.values(), ids=RULES.keys())
def test_each_rule_is_refused_with_one_line_naming_the_flag(extra, message):
    with pytest.raises(ConfigError) as err:
        parse_args(TINY_MOE + extra)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_vocab_size_below_the_tokenizers_is_refused():
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "tok.json"]
    with pytest.raises(ConfigError, match=r"^--vocab-size \(512\) is below the vocabulary of --tokenizer-model "
                                          r"\(600 ids\)"):
        parse_args(TINY_MOE + hf, tokenizer_vocab_size=600)
    assert parse_args(TINY_MOE + hf, tokenizer_vocab_size=500).data.vocab_size == 500


def test_flags_given_at_their_defaults_are_kept():
    c = parse_args(TINY_MOE + ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--exit-signal-handler",
                               "--exit-signal", "SIGUSR1"])
    assert (c.fp8.fp8_recipe, c.train.exit_signal) == ("blockwise", "SIGUSR1")
    c = parse_args(TINY_MOE)
    assert (c.fp8.fp8_recipe, c.train.exit_signal) == ("blockwise", "SIGTERM")
