"""The Megatron-style command line, generated from the config dataclasses' fields (config.py).

`parse_args` fills the dataclasses, fills what other flags decide (`resolve_derived`) and
validates (config_validate.py), so a bad run fails at start-up with one message naming the flag,
before any process group, model or data is built. `resolve_device_defaults` settles what depends
on the device. `python -m megadual.arguments` prints README's flag list.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
import types
import typing
from dataclasses import replace

from megadual.config import (
    ATTENTION_VARIANT_FLAGS,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    flag_name,
)
from megadual.config_validate import (
    grouped_gemm_fits,
    validate,
    validate_attention_flags_given,
    validate_flags_needing_others,
    validate_ranges,
    validate_training_kind,
)
from megadual.data.batch_ramp import BatchRamp


def sections() -> list[tuple[dataclasses.Field, type]]:
    """RunConfig's fields with their dataclasses, in flag order."""
    hints = typing.get_type_hints(RunConfig)
    return [(section, hints[section.name]) for section in dataclasses.fields(RunConfig)]


def flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Pretrain a DeepSeek-V3-style MoE transformer.",
                                     allow_abbrev=False, fromfile_prefix_chars="@")
    parser.convert_arg_line_to_args = flag_file_line
    # argparse before Python 3.14 reads `--lr -1e-3` as two flags; values like -1e-3 are numbers
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    groups = {}
    for section, cls in sections():
        hints = typing.get_type_hints(cls)
        for f in flag_fields(cls):
            spec = f.metadata["flag"]
            title = spec["group"] or section.metadata["group"]
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            groups[title].add_argument(flag_name(f.name), *spec["aliases"], dest=f.name, help=_help(f),
                                       **_argparse_kind(f, hints[f.name]))
    return parser


def flag_file_line(line: str) -> list[str]:
    """A line of an @file of flags: `--flag value ...` split on spaces; `#` starts a comment."""
    return line.split("#", 1)[0].split()


def _argparse_kind(f: dataclasses.Field, hint) -> dict:
    """type/action/nargs/choices/default of a flag, from its field's type and default."""
    spec = f.metadata["flag"]
    kind = typing.get_args(hint)[0] if isinstance(hint, types.UnionType) else hint  # X | None -> X
    default = None if spec["unset"] else f.default
    if kind is bool:
        action = "store_true" if f.default is False else argparse.BooleanOptionalAction
        return {"action": action, "default": default}
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return {"nargs": "*", "default": list(default), "choices": spec["choices"],
                **({"type": item} if item is not str else {})}
    return {"type": kind, "default": default, "choices": spec["choices"]}


def _help(f: dataclasses.Field) -> str:
    spec = f.metadata["flag"]
    if spec["unset"]:
        default = spec["unset"].format(default=f.default)
    else:
        default = None if f.default is None or f.default is False or f.default == () else str(f.default)
    notes = "; ".join(note for note in (default and f"default: {default}", spec["range"] and spec["range"].text())
                      if note)
    return f"{spec['help']} ({notes})".strip() if notes else spec["help"]


def parse_args(argv: list[str] | None = None, tokenizer_vocab_size: int | None = None) -> RunConfig:
    """Parse flags into a validated RunConfig (its --bf16 still unset: see resolve_device_defaults).

    `tokenizer_vocab_size` is the unpadded vocabulary of the tokenizer in use (None:
    take `--vocab-size`); the model's embedding is padded as Megatron pads it.
    """
    flags = vars(build_parser().parse_args(argv))
    parsed = RunConfig(**{section.name: _section_as_parsed(cls, flags) for section, cls in sections()})
    config = resolve_derived(parsed, tokenizer_vocab_size)
    validate(config)
    return config


def parse_model_flags(argv: list[str]) -> RunConfig:
    """parse_args for tools that read no data (conversion, parameter counts): --mock-data stands
    in for the data flags unless one is given."""
    given = {"--data-path", "--mock-data"} & set(argv)
    return parse_args(argv if given else ["--mock-data", *argv])


def _section_as_parsed(cls: type, flags: dict):
    """The section's flags as argparse left them; its derived fields at their defaults."""
    return cls(**{f.name: tuple(flags[f.name]) if isinstance(f.default, tuple) else flags[f.name]
                  for f in flag_fields(cls)})


def resolve_derived(parsed: RunConfig, tokenizer_vocab_size: int | None = None) -> RunConfig:
    """Fill the values other flags decide, on a config as parsed (None: the flag was left out):
    the dense FFN size, the query groups (one per head without --group-query-attention),
    --moe-router-max-nodes and whether it was given, the MLA and YaRN flags left out (those given
    must be read), and the vocabulary (the tokenizer's, and the model's padded one)."""
    validate_ranges(parsed)
    validate_flags_needing_others(parsed)
    parsed = _left_out_at_default(parsed)
    m, p, d = parsed.model, parsed.parallel, parsed.data
    data = replace(d, vocab_size=_vocabulary(d, tokenizer_vocab_size))
    ffn = -(-m.hidden_size * 8 // 3 // 8) * 8 if m.ffn_hidden_size is None else m.ffn_hidden_size
    gqa = p.group_query_attention and m.num_query_groups is not None
    given = m.moe_router_max_nodes is not None
    validate_attention_flags_given(m)
    left_out = {name: getattr(ModelConfig, name) for name in ATTENTION_VARIANT_FLAGS if getattr(m, name) is None}
    model = replace(m, ffn_hidden_size=ffn, num_query_groups=m.num_query_groups if gqa else m.num_attention_heads,
                    moe_router_max_nodes=m.moe_router_max_nodes if given else ModelConfig.moe_router_max_nodes,
                    vocab_size=padded_vocab_size(data, p.tensor_model_parallel_size),
                    unpadded_vocab_size=data.vocab_size, **left_out)
    return replace(parsed, model=model, parallel=replace(p, moe_router_max_nodes_given=given), data=data,
                   train=_resolve_train_iters(parsed.train))


def _resolve_train_iters(t: TrainConfig) -> TrainConfig:
    """--train-iters left out: 100, or with --train-samples the iterations that consume them."""
    if t.train_iters is not None:
        validate_training_kind(t)
        return t
    if t.train_samples is None:
        return replace(t, train_iters=TrainConfig.train_iters)
    validate_training_kind(t)
    return replace(t, train_iters=BatchRamp.from_flags(t.global_batch_size, t.rampup_batch_size)
                   .iterations(t.train_samples))


def _left_out_at_default(parsed: RunConfig) -> RunConfig:
    """The flags of sections other than the model's that parse as None when left out
    (`unset="{default}"`: given, they are checked against other flags) at their defaults."""
    filled = {}
    for section, cls in sections():
        if cls is ModelConfig:
            continue
        values = getattr(parsed, section.name)
        left_out = {f.name: f.default for f in flag_fields(cls)
                    if f.metadata["flag"]["unset"] == "{default}" and getattr(values, f.name) is None}
        filled[section.name] = replace(values, **left_out)
    return replace(parsed, **filled)


def _vocabulary(d: DataConfig, tokenizer_vocab_size: int | None) -> int:
    """The unpadded vocabulary: the tokenizer's (a --vocab-size given must hold it), else --vocab-size."""
    if tokenizer_vocab_size is not None and d.vocab_size is not None and d.tokenizer_type != "NullTokenizer":
        if d.vocab_size < tokenizer_vocab_size:
            raise ConfigError(f"--vocab-size ({d.vocab_size}) is below the vocabulary of --tokenizer-model "
                              f"({tokenizer_vocab_size} ids): token ids would fall outside the embedding")
    vocab_size = tokenizer_vocab_size or d.vocab_size
    if vocab_size is None:
        raise ConfigError("--vocab-size is required with --tokenizer-type NullTokenizer")
    return vocab_size


def padded_vocab_size(data: DataConfig, tp: int) -> int:
    """The embedding's rows: the vocabulary padded to a multiple of --make-vocab-size-divisible-by x TP."""
    multiple = data.make_vocab_size_divisible_by * tp
    if multiple < 1:
        raise ConfigError("--make-vocab-size-divisible-by and --tensor-model-parallel-size must be positive")
    return -(-data.vocab_size // multiple) * multiple


def resolve_device_defaults(config: RunConfig, device_type: str) -> RunConfig:
    """Settle the defaults that depend on the device: --bf16 left out is on with CUDA, off
    elsewhere; --moe-grouped-gemm left out is on with CUDA in bf16 where the sizes fit it (CUDA's
    grouped kernels are bf16's; on CPU the per-expert loop measured as fast: docs/benchmarks.md). What was given stays; a resolved
    config comes back unchanged."""
    t, p, m, cuda = config.train, config.parallel, config.model, device_type == "cuda"
    bf16 = cuda if t.bf16 is None else t.bf16
    grouped = cuda and bf16 and grouped_gemm_fits(m) if p.moe_grouped_gemm is None else p.moe_grouped_gemm
    return replace(config, train=replace(t, bf16=bf16), parallel=replace(p, moe_grouped_gemm=grouped))


def flags_markdown() -> str:
    """README's flag list: one item per argparse group, its flags in the parser's order."""
    items = []
    for group in build_parser()._action_groups[2:]:  # after argparse's own positionals and options
        names = " ".join(_markdown_flag(action) for action in group._group_actions)
        items.append(textwrap.fill(f"- {group.title}: `{names}`", width=90, subsequent_indent="  ",
                                   break_on_hyphens=False))
    return "\n".join(items)


def _markdown_flag(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        names = "--[no-]" + action.option_strings[0].removeprefix("--")
    else:
        names = "/".join(action.option_strings)
    return names + (" {" + ",".join(action.choices) + "}" if action.choices else "")


if __name__ == "__main__":
    print(flags_markdown())
