"""python -m megadual.verify: check parallel layouts against one process before a long run.

    python -m megadual.verify [pretrain_moe.py flags] --layouts "tp2,ep2" "pp2:dualpipe,tp2,ep2" [--iters N]

Each layout trains the flags for N iterations in its processes (torchrun; gloo on CPU, NCCL on
GPUs) and is compared with one process training the same flags: every logged value of every
step, the gradient norm of every step, every parameter's gradient of the first step (after
the reduction, and under DualPipe after the two copies' sum) and every parameter and buffer
after the last step, by global name; the copies of one piece on different ranks (replicas,
DualPipe's mirrored stages) must be equal. A layout PASSES when each difference is within the
tolerance of its class (TOLERANCES below); the exit status is 1 if any FAILS.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megadual.arguments import build_parser as pretrain_parser
from megadual.config_validate import validate_world
from megadual.parallel.topology import Layout
from megadual.training.capture import Capture, capture_run, relative_difference
from megadual.training.distributed import init_distributed
from pretrain_moe import load_config  # flags -> config, the vocabulary from the tokenizer, as training does

ROOT = Path(__file__).resolve().parents[1]
WORST_SHOWN = 5
WORKER = "--worker"


@dataclass(frozen=True)
class Tolerance:
    """Largest relative differences allowed: logged values and grad norms per step, tensors
    (first-step gradients, final parameters and buffers) as ||run - reference|| / ||reference||."""
    name: str
    logged: float
    grad_norm: float
    grads: float
    final: float


# How far each kind of layout moves the arithmetic from one process, measured on CPU in FP32
# (gloo, 3-4 iterations) with
#   python -m megadual.verify $TINY_MOE --moe-router-bias-update-rate 1e-2 --layouts dp2 dp3 ep2 ep4,nodes2 ...
# (TINY_MOE of tests/helpers.py; PP layouts with --num-layers 8 --micro-batch-size 1), and the
# tolerance: about 10x the measurement. A layout of several kinds allows the sum of theirs
# (independent reorderings add up); e.g. PP2 DualPipe x TP2 x EP2 measured 1.2e-05 on final values.
#                 measured:  logged   grad norm  gradients  final    | layouts measured
# exact                      0        3.5e-16    0          0        | PP4 1F1B, DualPipeV, uneven stages (no MTP)
# DP                         1.1e-07  2.2e-07    5.1e-07    2.1e-05  | DP2, DP3, EP2, EP4 (2 nodes), PP2 x DP2
# TP                         7.8e-08  2.0e-08    4.2e-07    2.6e-06  | TP2, TP2 + SP, TP2 with GQA
# DualPipe                   7.8e-08  1.3e-08    7.6e-08    1.7e-06  | PP4 DualPipe; PP with MTP (LayoutSpec)
# "exact" layouts run the one-process sums in the same order, except the gradient norm's float64
# sum, which adds each rank's part; final values differ most because Adam's first steps turn
# tiny differences of near-zero gradients into differences of the update.
TOLERANCES = {
    "exact": Tolerance("exact", logged=0.0, grad_norm=3e-15, grads=0.0, final=0.0),
    "DP": Tolerance("DP", logged=1e-6, grad_norm=2e-6, grads=5e-6, final=2e-4),
    "TP": Tolerance("TP", logged=7e-7, grad_norm=2e-7, grads=4e-6, final=2.5e-5),
    "DualPipe": Tolerance("DualPipe", logged=7e-7, grad_norm=1e-7, grads=7e-7, final=1.5e-5),
}
TOLERANCE_TABLE = "Tolerances (relative; measured on CPU, FP32, see TOLERANCES in megadual/verify.py):\n" + \
    "\n".join(f"  {t.name:<9} logged values {t.logged:.1e}, grad norm {t.grad_norm:.1e}, first-step "
              f"gradients {t.grads:.1e}, final values {t.final:.1e}" for t in TOLERANCES.values()) + \
    "\n  a layout of several kinds (e.g. DP+TP) allows the sum of their tolerances"


def tolerance_for(dp: bool, tp: bool, dualpipe: bool) -> Tolerance:
    kinds = [name for name, used in (("DP", dp), ("TP", tp), ("DualPipe", dualpipe)) if used]
    if not kinds:
        return TOLERANCES["exact"]
    summed = {f.name: sum(getattr(TOLERANCES[k], f.name) for k in kinds)
              for f in dataclasses.fields(Tolerance) if f.name != "name"}
    return Tolerance("+".join(kinds), **summed)


LAYOUT_GRAMMAR = """\
A LAYOUT is comma-separated items:
  tpN             tensor parallelism over N ranks (--tensor-model-parallel-size N)
  sp              sequence parallelism (--sequence-parallel; needs tpN)
  epN             expert parallelism over N ranks (--expert-model-parallel-size N)
  dpN             data parallelism N (default: the least that holds EP, EP / gcd(EP, TP))
  ppN[:SCHEDULE]  pipeline parallelism N, SCHEDULE 1f1b (default), interleaved (with
                  --num-virtual-stages-per-pipeline-rank=V), dualpipe or dualpipev
  nodesK          the processes split into K (virtual) nodes (--moe-ranks-per-node);
                  the one-process run then routes over the nodes one EP group spans
                  (--moe-router-num-groups), so node-limited routing keeps the same rule
  --FLAG=VALUE    any pretrain_moe.py flag, for this layout's run only (e.g.
                  --decoder-first-pipeline-num-layers=0, --no-pipeline-split-backward)
The layout runs in TP x DP x PP processes. Examples: "dp3"  "tp2,sp,ep2,dp2"  "ep4,nodes2"
  "pp2:dualpipe,tp2,ep2"  "pp4:dualpipev,--decoder-last-pipeline-num-layers=2"
"""

_ITEM = re.compile(r"(tp|ep|dp|nodes)(\d+)$|sp$|pp(\d+)(?::(1f1b|interleaved|dualpipe|dualpipev))?$")


@dataclass(frozen=True)
class LayoutSpec:
    text: str
    tp: int = 1
    ep: int = 1
    dp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    sequence_parallel: bool = False
    nodes: int = 1
    raw_flags: tuple[str, ...] = ()
    reference_flags: tuple[str, ...] = ()  # what the one-process run adds
    mtp: bool = False  # the model has multi-token prediction (--mtp-num-layers)

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def flags(self) -> list[str]:
        """The pretrain flags that make this layout (added after the common flags)."""
        flags = ["--tensor-model-parallel-size", str(self.tp), "--expert-model-parallel-size", str(self.ep),
                 "--pipeline-model-parallel-size", str(self.pp), "--pipeline-schedule", self.schedule,
                 "--moe-ranks-per-node", str(self.world // self.nodes)]
        return flags + (["--sequence-parallel"] if self.sequence_parallel else []) + list(self.raw_flags)

    @property
    def tolerance(self) -> Tolerance:
        # With MTP the embedding and the output head take gradients in two places of a micro-batch
        # (the first stage's and MTP's; the lm head's and MTP's), which a pipeline adds in another
        # order than one process: the reordering of DualPipe's copies (PP4 DualPipeV with MTP
        # measured gradients 4.1e-08, grad norm 5.1e-10, final values 5.7e-07).
        reordered = self.schedule == "dualpipe" or self.mtp
        return tolerance_for(dp=self.dp > 1, tp=self.tp > 1, dualpipe=self.pp > 1 and reordered)


def _items(text: str) -> dict:
    found: dict = {"raw_flags": ()}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item.startswith("--"):
            found["raw_flags"] += (item,)
            continue
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(f"layout {text!r}: {item!r} is not tpN, sp, epN, dpN, ppN[:SCHEDULE], nodesK "
                             f"or --FLAG=VALUE (python -m megadual.verify --help)")
        kind, size, pp, schedule = match.groups()
        if kind:
            found[kind] = int(size)
        elif pp:
            found.update(pp=int(pp), schedule=schedule or "1f1b")
        else:
            found["sequence_parallel"] = True
    return found


def parse_layout(text: str, common_flags: list[str]) -> LayoutSpec:
    """The layout `text` of a run of `common_flags` (whose MoE flags decide the reference's routing)."""
    found = _items(text)
    tp, ep = found.get("tp", 1), found.get("ep", 1)
    found.setdefault("dp", ep // math.gcd(ep, tp))
    spec = LayoutSpec(text, **found)
    if spec.sequence_parallel and spec.tp == 1:
        raise ValueError(f"layout {text!r}: sp needs tpN (sequence parallelism splits the sequence over TP ranks)")
    if spec.world % spec.nodes:
        raise ValueError(f"layout {text!r}: {spec.world} processes do not split into {spec.nodes} nodes")
    flags, _ = pretrain_parser().parse_known_args(common_flags)
    spec = dataclasses.replace(spec, mtp=bool(flags.mtp_num_layers))
    ep_nodes = Layout(spec.world, spec.tp, spec.pp, spec.ep, spec.world // spec.nodes).nodes_per_ep_group
    if flags.num_experts and not flags.moe_router_num_groups and ep_nodes > 1:
        spec = dataclasses.replace(spec, reference_flags=("--moe-router-num-groups", str(ep_nodes)))
    return spec


@dataclass
class Check:
    """One kind of comparison: the largest relative difference, where, and the limit."""
    what: str
    limit: float
    differences: dict[str, float] = field(default_factory=dict)  # by name (value and step, or tensor)

    @property
    def worst(self) -> list[tuple[str, float]]:
        return sorted(self.differences.items(), key=lambda item: -item[1])[:WORST_SHOWN]

    @property
    def largest(self) -> float:
        return max(self.differences.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return self.largest <= self.limit

    def format(self) -> str:
        shown = ", ".join(f"{name} {diff:.1e}" for name, diff in self.worst if diff > 0) or "all equal"
        verdict = "ok" if self.passed else "FAIL"
        return f"  {self.what:<22} max {self.largest:.1e}  tolerance {self.limit:.1e}  {verdict:<4}  {shown}"


@dataclass
class Report:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def format(self, title: str) -> str:
        return "\n".join([title, *(c.format() for c in self.checks), "PASS" if self.passed else "FAIL"])


def _series(run: dict[str, list[float]], reference: dict[str, list[float]]) -> dict[str, float]:
    """Per value name and step; a missing or extra value counts as an infinite difference."""
    differences = {}
    for name in reference.keys() | run.keys():
        mine, theirs = run.get(name, []), reference.get(name, [])
        if len(mine) != len(theirs):
            differences[f"{name} (count)"] = math.inf
        differences.update({f"{name} step {i + 1}": relative_difference(a, b)
                            for i, (a, b) in enumerate(zip(mine, theirs))})
    return differences


def _tensors(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    differences = {name: math.inf for name in run.keys() ^ reference.keys()}
    differences.update({name: relative_difference(run[name], reference[name]) if run[name].shape ==
                        reference[name].shape else math.inf for name in run.keys() & reference.keys()})
    return differences


def compare(run: Capture, reference: Capture, tolerance: Tolerance) -> Report:
    return Report([
        Check("logged values", tolerance.logged, _series(run.logged, reference.logged)),
        Check("grad norm", tolerance.grad_norm, _series({"grad norm": run.grad_norms},
                                                        {"grad norm": reference.grad_norms})),
        Check("first-step gradients", tolerance.grads, _tensors(run.first_grads, reference.first_grads)),
        Check("final values", tolerance.final, _tensors(run.final, reference.final)),
        Check("copies across ranks", 0.0, run.replica_spread),
    ])


def on_gpus(world: int, arg_lists: list[list[str]]) -> bool:
    """Whether runs of up to `world` processes run on GPUs: a GPU each, or one shared where every run
    asks for a backend that allows it (--distributed-backend cuda:gloo); if not, every run stays on
    the CPU, so one process and many compute on the same kind of device."""
    shared = all((load_config(args).train.distributed_backend or "").startswith("cuda:") for args in arg_lists)
    return torch.cuda.device_count() >= (1 if shared else world)


def launch(world: int, arg_lists: list[list[str]], gpus: bool) -> list[Capture]:
    """Train each flag list in turn in the same `world` processes (torchrun); rank 0's captures."""
    with tempfile.TemporaryDirectory(prefix="megadual-verify-") as folder:
        Path(folder, "runs.json").write_text(json.dumps(arg_lists))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.setdefault("OMP_NUM_THREADS", "1")  # the same threads for every run: same GEMM summation order
        if not gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   "-m", "megadual.verify", WORKER, folder]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            errors = sorted(Path(folder).glob("error_rank*.txt"))
            why = errors[0].read_text() if errors else done.stderr[-4000:]
            raise RuntimeError(f"{world} processes training {len(arg_lists)} configurations failed: {why}")
        return torch.load(Path(folder, "captures.pt"), weights_only=False)


def launch_all(runs: dict[str, tuple[int, list[str]]]) -> dict[str, Capture]:
    """Every (world, flags) run by key, with one launch per world size."""
    by_world: dict[int, list[str]] = {}
    for key, (world, _) in runs.items():
        by_world.setdefault(world, []).append(key)
    gpus = on_gpus(max(by_world), [args for _, args in runs.values()])
    captures = {}
    for world, keys in sorted(by_world.items()):
        captures.update(zip(keys, launch(world, [runs[k][1] for k in keys], gpus)))
    return captures


@dataclass
class Outcome:
    spec: LayoutSpec
    run: Capture
    reference: Capture
    report: Report


def check(cases: dict[str, tuple[list[str], str]]) -> dict[str, Outcome]:
    """Each named case (flags, layout) against one process training its flags; one launch per
    world size, and a one-process run shared by the cases that need the same."""
    specs = {name: parse_layout(layout, flags) for name, (flags, layout) in cases.items()}
    runs = {name: (spec.world, cases[name][0] + spec.flags) for name, spec in specs.items()}
    reference_args = {name: cases[name][0] + list(spec.reference_flags) for name, spec in specs.items()}
    reference_of = {name: "reference " + json.dumps(args) for name, args in reference_args.items()}
    runs.update({reference_of[name]: (1, args) for name, args in reference_args.items()})
    for world, args in runs.values():  # a wrong flag or layout fails here, before any launch
        validate_world(load_config(args), world, world)
    captures = launch_all(runs)
    return {name: Outcome(spec, captures[name], captures[reference_of[name]],
                          compare(captures[name], captures[reference_of[name]], spec.tolerance))
            for name, spec in specs.items()}


def run_worker(folder: str) -> None:
    """Inside torchrun: train every flag list of folder/runs.json, rank 0 saves the captures."""
    arg_lists = json.loads(Path(folder, "runs.json").read_text())
    device = init_distributed(backend=load_config(arg_lists[0]).train.distributed_backend)
    try:
        captures = [capture_run(load_config(args), device) for args in arg_lists]
        if dist.get_rank() == 0:
            torch.save(captures, Path(folder, "captures.pt"))
    except Exception as error:
        Path(folder, f"error_rank{dist.get_rank()}.txt").write_text(f"{type(error).__name__}: {error}")
        raise
    finally:
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megadual.verify", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [pretrain_moe.py flags] --layouts LAYOUT [LAYOUT ...] [--iters N]",
        description=__doc__.split("\n\n", 2)[2], epilog=LAYOUT_GRAMMAR + "\n" + TOLERANCE_TABLE)
    parser.add_argument("--layouts", nargs="+", required=True, metavar="LAYOUT")
    parser.add_argument("--iters", type=int, default=4, help="iterations per run (sets --train-iters; default 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:  # `launch` starting the processes of one world size
        run_worker(argv[1])
        return 0
    args, flags = build_parser().parse_known_args(argv)
    flags = flags + ["--train-iters", str(args.iters), "--no-bf16"]
    try:
        outcomes = check({layout: (flags, layout) for layout in args.layouts})
    except ValueError as error:
        print(f"megadual.verify: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a launch failed: its processes' errors
        print(f"megadual.verify: error: {error}", file=sys.stderr)
        return 1
    backend = load_config(flags).train.distributed_backend
    on_cuda = on_gpus(max(o.spec.world for o in outcomes.values()), [flags])
    device = f"cuda/{backend or 'nccl'}" if on_cuda else f"cpu/{backend or 'gloo'}"
    for layout, outcome in outcomes.items():
        print(outcome.report.format(f"{layout}: {outcome.spec.world} processes vs one, {args.iters} iterations, "
                                    f"{device}, tolerance class {outcome.spec.tolerance.name}"))
    return 0 if all(o.report.passed for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
