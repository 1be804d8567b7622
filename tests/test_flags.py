"""The flags have one source, the config dataclasses: every flag is read, README lists what the parser has."""
import dataclasses
import re
from pathlib import Path

import pytest

from megadual.arguments import build_parser, flag_fields, flags_markdown, parse_args, sections
from megadual.config import Fp8Config, flag_name
from megadual.fp8.linear import fp8_linear
from megadual.training.loop import linear_gemm
from tests.helpers import TINY_MOE

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MODULES = ("megadual/config.py", "megadual/config_validate.py", "megadual/arguments.py")
# Flags whose only reader is in the config modules.
READ_IN_CONFIG = {
    "group_query_attention",  # resolve_derived: whether --num-query-groups counts
    "make_vocab_size_divisible_by",  # padded_vocab_size
    "moe_first_k_dense",  # ModelConfig.is_moe_layer
    "moe_ranks_per_node",  # node_size, which validate_world and build_topology share
    "num_virtual_stages_per_pipeline_rank",  # virtual_stages, which the loop and the planner share
    "num_layers_per_virtual_pipeline_stage",  # virtual_stages
}


def all_flag_fields():
    return [f for _, cls in sections() for f in flag_fields(cls)]


def test_every_field_is_a_flag_or_derived():
    for _, cls in sections():
        for f in dataclasses.fields(cls):
            assert ("flag" in f.metadata) != ("derived" in f.metadata), f"{cls.__name__}.{f.name}"


def test_every_flag_is_read_outside_config():
    paths = [*ROOT.glob("megadual/**/*.py"), ROOT / "pretrain_moe.py"]
    source = "\n".join(p.read_text() for p in paths if p.relative_to(ROOT).as_posix() not in CONFIG_MODULES)
    unread = {f.name for f in all_flag_fields() if not re.search(rf"\.{f.name}\b", source)}
    assert unread == READ_IN_CONFIG


def test_readme_lists_the_parsers_flags():
    readme = (ROOT / "README.md").read_text()
    listed = readme.split("<!-- flags:begin -->\n", 1)[1].split("<!-- flags:end -->", 1)[0]
    assert listed.strip() == flags_markdown(), "regenerate README's list with: python -m megadual.arguments"
    for f in all_flag_fields():  # `--[no-]name` for a negatable flag
        assert re.search(rf"(--|]){re.escape(flag_name(f.name)[2:])}(?=[\s`/])", listed), f.name


def test_parser_has_exactly_the_flag_fields():
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests == {f.name for f in all_flag_fields()}


@pytest.mark.parametrize("recipe", Fp8Config.__dataclass_fields__["fp8_recipe"].metadata["flag"]["choices"])
def test_every_fp8_recipe_selects_its_linear(recipe):
    config = parse_args(TINY_MOE + ["--fp8-format", "e4m3", "--fp8-recipe", recipe])
    assert linear_gemm(config) is fp8_linear
