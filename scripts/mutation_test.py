"""Mutation testing with mutmut (pinned in requirements-test.txt) over the modules whose tests are
fast and single-process; not part of .ci/run (minutes per module). docs/testing.md has the table.

    python scripts/mutation_test.py                 # every module, one after the other
    python scripts/mutation_test.py moe/router.py   # the ones named (paths under megadual/)
    python scripts/mutation_test.py --list

For each module: copy the working tree (as scripts/plant_bugs.py does) to a scratch directory,
write mutmut's setup.cfg there (that module only, its tests), run `mutmut run` and print each
mutant's status, then the module's counts: killed, survived, no tests, timeout. The scratch copy
is kept for a `mutmut show NAME` there when --keep is given.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plant_bugs import REPO, working_tree_files  # noqa: E402

# megadual/<module> -> (its fast single-process tests, a pytest -k filter, the functions mutated).
# The functions are those that compute what the module means (mutmut's names, fnmatch patterns):
# on the loaded 2-core machine these tests ran about one mutant a second with torch on one thread (3 a
# minute without: the timeouts), and the planner's three modules have about 1900 mutants in all.
MODULES = {
    "moe/router.py": (["tests/test_router.py", "tests/test_oracles_math.py"], "not decay and not dropout",
                      ["*x_node_limited_topk__*", "*x_nodes_per_token__*", "*x_balance_loss__*", "*RoutingStats*",
                       "*ǁRouterǁ*"]),
    "training/optimizer.py": (["tests/test_oracles_math.py"], "learning_rate or weight_decay",
                              ["*x_learning_rate__*", "*x_decayed__*"]),
    "fp8/quant.py": (["tests/test_fp8_quant.py", "tests/test_oracles_math.py"], "not oracles_math or e4m3 or pow",
                     ["*x__scales_from_amax__*", "*x_quantize__*", "*dequantize__*", "*row_scales__*"]),
    "data/sampler.py": (["tests/test_data_sampler.py", "tests/test_oracles_math.py"], "not oracles_math or sampler",
                        ["*PretrainingSampler*__len____*", "*PretrainingSampler*__iter____*",
                         "*PretrainingSampler*global_step_samples__*"]),
    "data/gpt_dataset.py": (["tests/test_data_gpt.py"], "",
                            ["*x__num_epochs__*", "*x__full_epoch_samples__*", "*x__document_index__*",
                             "*x__sample_index__*", "*x__shuffle_index__*", "*ǁGPTDatasetǁ*"]),
    "hf/names.py": (["tests/test_oracles_hf.py"], "", ["*"]),
    "model/dropout.py": (["tests/test_dropout.py", "tests/test_oracles_math.py"],
                         "not training_losses and (not oracles_math or dropout)", ["*"]),
    # the planner: the rank memory whole, the shared byte counts (precisions, norms, FP8 copies), the memory
    # model's MLP and its walk over a schedule, the search's candidates and end stages; mutmut leaves out
    # decorated functions (@cache's _layer_parameters and _layer_activations, properties).
    "plan/rank_memory.py": (["tests/test_oracles_rank_memory.py", "tests/test_oracles_planner.py", "tests/test_plan.py"],
                            "", ["*"]),
    "plan/tensor_bytes.py": (["tests/test_oracles_planner.py", "tests/test_layer_memory.py"], "",
                             ["*Precision*", "*x_ceil_div__*", "*x_codec_bytes__*", "*x_per_expert_keeps__*",
                              "*x_norm_bytes__*", "*x_distinct_ranks_per_token__*",
                              "*ǁActivationsǁadd__*", "*ǁActivationsǁ__iadd____*"]),
    "plan/memory_model.py": (["tests/test_oracles_planner.py", "tests/test_layer_memory.py"], "",
                             ["*x_mlp_bytes__*", "*x_peak_moment__*"]),
    "plan/layout_search.py": (["tests/test_oracles_layout_search.py", "tests/test_oracles_planner.py",
                               "tests/test_schedules.py"],
                              "planner or search",
                              ["*x_end_stage_layers__*", "*x_candidates__*"]),
}


def setup_cfg(tests: list[str], select: str) -> str:
    selection = [*tests, *(["-k", select] if select else [])]
    # also_copy: what tests read besides tests/ (V3's args file in examples/; pretrain_moe's load_config)
    return "\n".join(["[mutmut]", "source_paths = megadual", "only_mutate = megadual/{module}",
                      "also_copy =", "    examples", "    pretrain_moe.py",
                      "pytest_add_cli_args_test_selection =", *[f"    {t}" for t in selection],
                      "pytest_add_cli_args =", "    -x", "    -q", "    -p", "    no:cacheprovider",
                      "timeout_multiplier = 4.0", "timeout_constant = 10.0", ""])


def run_module(module: str, keep: bool, only: list[str] | None = None) -> collections.Counter:
    scratch = Path(tempfile.mkdtemp(prefix="mutmut-"))
    for name in working_tree_files(REPO):
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, scratch / name)
    tests, select, functions = MODULES[module]
    functions = only or functions
    (scratch / "setup.cfg").write_text(setup_cfg(tests, select).replace("{module}", module))
    started = time.perf_counter()
    # mutmut's timeout is a limit on CPU seconds: torch's idle threads spinning on a loaded machine used it up
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["mutmut", "run", "--max-children", "1", *functions], cwd=scratch, stdout=subprocess.DEVNULL, env=env,
                   check=False)  # it exits non-zero while mutants survive
    results = subprocess.run(["mutmut", "results", "--all", "true"], cwd=scratch, capture_output=True,
                             text=True, check=True).stdout
    counts = collections.Counter()
    for line in results.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            counts[status] += 1
            if status != "killed":
                print(f"  {status:<10} {name}")
    print(f"{module}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + f"  [{time.perf_counter() - started:.0f} s]" + (f"  (scratch: {scratch})" if keep else ""), flush=True)
    if not keep:
        shutil.rmtree(scratch)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="paths under megadual/ (default: all of MODULES)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep each scratch copy (for `mutmut show`)")
    parser.add_argument("--functions", nargs="+", metavar="PATTERN",
                        help="mutmut names (fnmatch) to run instead of the module's functions, e.g. a part of them "
                             "or the survivors of a run")
    args = parser.parse_args()
    if args.list:
        for module, (tests, select, functions) in MODULES.items():
            print(f"{module}: {' '.join(tests)} -k {select!r}; {' '.join(functions)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"not in MODULES: {', '.join(unknown)}")
    for module in args.modules or MODULES:
        run_module(module, args.keep, args.functions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
