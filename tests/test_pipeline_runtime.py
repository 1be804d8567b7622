"""The pipeline runtime, stage models and pipeline validation, on one process.

Schedules whose stages all live on one rank (1F1B and DualPipeV with PP=1, where the V
turns locally) run through the runtime without communication and give exactly the
gradients of plain gradient accumulation. Multi-process runs: test_parallel_pp.py.
"""
import pytest
import torch

from megadual.arguments import parse_args
from megadual.config import ConfigError
from megadual.config_validate import validate_pipeline, virtual_stages
from megadual.model.gpt import build_chunk, full_model_stage
from megadual.pipeline.actions import Action, Kind, Layout, match_messages
from megadual.pipeline.driver import forward_only_schedule
from megadual.pipeline.runtime import PipelineRuntime, post_receives_ahead
from megadual.pipeline.schedules import build_schedule, check_schedule, pipeline_layout
from megadual.pipeline.simulate import simulate
from megadual.pipeline.stage_model import build_full_model, build_stage_model, mirror_rank, stage_specs
from megadual.training.step import forward_backward
from tests.helpers import TINY_MOE

SEED = 7
SHAPE = (32, 2, 64)  # [seq, micro-batch, hidden] of TINY_MOE


def tiny(mtp_layers: int = 0):
    """One dense and one MoE layer: a stage each under DualPipeV with PP=1, where an MTP module
    beside the head (on chunk 1) embeds with chunk 0's embedding."""
    return parse_args(TINY_MOE + ["--num-layers", "2", "--mtp-num-layers", str(mtp_layers)]).model


def microbatches(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"tokens": torch.randint(0, 512, (2, 32), generator=generator),
             "labels": torch.randint(0, 512, (2, 32), generator=generator)} for _ in range(count)]


def accumulated(config, batches):
    """Loss and gradients of the one-chunk model under plain gradient accumulation."""
    model = build_full_model(config, SEED)
    model.set_aux_loss_grad_scale(1.0 / len(batches))
    loss = forward_backward(model.chunks[0], batches, torch.device("cpu"), bf16=False)
    return loss, {name: p.grad for name, p in model.named_parameters()}


def assert_same_gradients(model, want_grads):
    """Bit for bit, except the parameters MTP shares with the main model, whose gradients from the
    two uses are summed in another order when the head's W is deferred or the embedding is in
    another chunk (measured: relative 6.5e-8)."""
    shared = ("embedding.weight", "output_layer.weight") if model.config.mtp_num_layers else ()
    for name, p in model.named_parameters():
        if name in shared:
            assert float((p.grad - want_grads[name]).norm() / want_grads[name].norm()) < 1e-6, name
        else:
            assert torch.equal(p.grad, want_grads[name]), name


def one_rank_runtime(config, schedule: str, actions: list[Action], count: int, trace: bool = False,
                     virtual_stages: int = 1):
    layout = pipeline_layout(schedule, 1, count, virtual_stages)
    model = build_stage_model(config, layout, 0, SEED)
    model.set_aux_loss_grad_scale(1.0 / count)
    return model, PipelineRuntime(actions, layout, model.chunks, 0, [0], activation_shape=SHAPE, trace=trace)


@pytest.fixture(scope="module")
def four_microbatches():
    batches = microbatches(4)
    return batches, *accumulated(tiny(mtp_layers=1), batches)


@pytest.mark.parametrize("split", [True, False], ids=["split", "whole"])
@pytest.mark.parametrize("schedule,virtual,overlap", [("1f1b", 1, False), ("dualpipev", 1, False),
                                                      ("1f1b", 1, True), ("interleaved", 2, False),
                                                      ("interleaved", 2, True)],
                         ids=["1f1b", "dualpipev", "1f1b-overlap", "interleaved", "interleaved-overlap"])
def test_one_rank_schedule_equals_gradient_accumulation(four_microbatches, schedule, virtual, overlap, split):
    """(Interleaved on one rank: its two chunks hand over locally; paired 1F1B pairs one chunk with itself.)"""
    config, (batches, want_loss, want_grads) = tiny(mtp_layers=1), four_microbatches
    actions = build_schedule(schedule, 1, 4, split, virtual, overlap)[0]
    assert any(a.kind == Kind.FB for a in actions) == (schedule == "dualpipev" or overlap)
    assert any(a.kind == Kind.BI for a in actions) == split
    model, runtime = one_rank_runtime(config, schedule, actions, 4, virtual_stages=virtual)
    losses = runtime.run(batches)
    assert losses.keys() == want_loss.keys() == {"lm loss", "mtp_1 loss"}
    assert all(torch.equal(losses[name], want_loss[name]) for name in want_loss)
    assert_same_gradients(model, want_grads)


def test_input_backward_leaves_weight_gradients_to_w():
    config, batches = tiny(), microbatches(1)
    forward, backward = Action(Kind.F, 0, 0), Action(Kind.BI, 0, 0)
    model, runtime = one_rank_runtime(config, "1f1b", [forward, backward], 1)
    with pytest.raises(RuntimeError, match="deferred weight gradients"):
        runtime.run(batches)
    waiting = {name for name, p in model.named_parameters() if p.grad is None}
    assert any("experts" in n for n in waiting) and any("attention" in n for n in waiting)
    model, runtime = one_rank_runtime(config, "1f1b", [forward, backward, Action(Kind.W, 0, 0)], 1)
    runtime.run(batches)
    assert_same_gradients(model, accumulated(config, batches)[1])


def test_only_forwards_of_split_backwards_defer():
    """Micro-batch 0's backward is a full B: its forward builds plain linears, so all its
    weight gradients exist after the B, and the W left over holds micro-batch 1's only."""
    config, batches = tiny(), microbatches(2)
    actions = [Action(Kind.F, 0, 0), Action(Kind.F, 0, 1), Action(Kind.B, 0, 0), Action(Kind.BI, 0, 1)]
    model, runtime = one_rank_runtime(config, "1f1b", actions, 2)
    with pytest.raises(RuntimeError, match="deferred weight gradients"):
        runtime.run(batches)
    _, first_grads = accumulated(config, batches[:1])
    linears = [n for n, _ in model.named_parameters() if "experts" in n or "attention" in n]
    assert linears
    params = dict(model.named_parameters())
    for name in linears:  # the mean over 2 micro-batches: half of micro-batch 0's gradient so far
        assert torch.allclose(params[name].grad, first_grads[name] / 2, rtol=1e-5, atol=1e-7), name
    runtime.stores[0].pop()
    _, want_grads = accumulated(config, batches)
    for name, p in params.items():
        assert torch.allclose(p.grad, want_grads[name], rtol=1e-5, atol=1e-7), name


def test_trace_times_every_compute_action():
    actions = build_schedule("dualpipev", 1, 4)[0]
    _, runtime = one_rank_runtime(tiny(), "dualpipev", actions, 4, trace=True)
    runtime.run(microbatches(4))
    assert [label for label, _, _ in runtime.trace.events] == [str(a) for a in actions]
    assert 0 < runtime.trace.compute_seconds() <= runtime.trace.span()


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_stage_models_hold_the_full_model_under_its_names(schedule, pp):
    config = parse_args(TINY_MOE + ["--num-layers", "8"]).model
    full = build_chunk(config, full_model_stage(config), SEED).state_dict()
    layout = pipeline_layout(schedule, pp, 2 * pp)
    copies = {name: 0 for name in full}
    for rank in range(pp):
        model = build_stage_model(config, layout, rank, SEED)
        for name, value in model.state_dict().items():
            assert torch.equal(value, full[name]), name
            copies[name] += 1
        mirrored = {record.name for record in model.param_table if record.mirror}
        mirror_chunk = [record.name for chunk in model.chunks[1:] for record in chunk.param_table()]
        assert mirrored == (set(mirror_chunk) if schedule == "dualpipe" else set())
        assert mirror_rank(layout, rank) == (pp - 1 - rank if schedule == "dualpipe" else None)
    assert set(copies.values()) == {2 if schedule == "dualpipe" else 1}


def test_layers_must_split_evenly_over_the_stages():
    parse_args(TINY_MOE + ["--num-layers", "6", "--pipeline-model-parallel-size", "2"])
    flags = r"--num-layers \(6\).* 4 pipeline stages.*--pipeline-model-parallel-size 2"
    with pytest.raises(ConfigError, match=flags + " under --pipeline-schedule dualpipev"):
        parse_args(TINY_MOE + ["--num-layers", "6", "--pipeline-model-parallel-size", "2",
                               "--pipeline-schedule", "dualpipev"])


INTERLEAVED = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "interleaved"]


@pytest.mark.parametrize("flags,message", [
    (["--num-layers", "6", "--num-virtual-stages-per-pipeline-rank", "2"],
     r"--num-layers \(6\) must split evenly over the 4 pipeline stages .*--pipeline-schedule interleaved with 2 "
     r"virtual stages per rank \(--num-virtual-stages-per-pipeline-rank\)"),
    (["--num-layers", "6", "--num-layers-per-virtual-pipeline-stage", "2"],
     r"--num-layers \(6\) must be divisible by --pipeline-model-parallel-size \(2\) x "
     r"--num-layers-per-virtual-pipeline-stage \(2\)"),
    (["--num-layers", "8"], "exactly one of --num-virtual-stages-per-pipeline-rank and "
                            "--num-layers-per-virtual-pipeline-stage"),
    (["--num-layers", "8", "--num-virtual-stages-per-pipeline-rank", "1"], "at least 2 virtual stages"),
    (["--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "4"], "at least 2 virtual stages"),
])
def test_interleaved_flags_are_checked_naming_them(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY_MOE + INTERLEAVED + flags)


def test_interleaved_and_overlap_flags_need_their_schedule():
    p = parse_args(TINY_MOE + INTERLEAVED + ["--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "2",
                                             "--overlap-moe-expert-parallel-comm", "--no-delay-wgrad-compute"])
    assert virtual_stages(p.parallel, 8) == 2 and not p.parallel.pipeline_split_backward
    for flag in ("--num-virtual-stages-per-pipeline-rank", "--num-layers-per-virtual-pipeline-stage"):
        with pytest.raises(ConfigError, match=flag + " needs --pipeline-schedule interleaved"):
            parse_args(TINY_MOE + ["--num-layers", "8", "--pipeline-model-parallel-size", "2", flag, "2"])
    with pytest.raises(ConfigError, match="--overlap-moe-expert-parallel-comm .* --pipeline-model-parallel-size > 1"):
        parse_args(TINY_MOE + ["--overlap-moe-expert-parallel-comm"])
    flags = TINY_MOE + INTERLEAVED + ["--num-layers", "8", "--num-virtual-stages-per-pipeline-rank", "2"]
    validate_pipeline(parse_args(flags), dp=2)  # 2 micro-batches
    with pytest.raises(ConfigError, match=r"--num-microbatches .* multiple of --pipeline-model-parallel-size \(2\)"):
        validate_pipeline(parse_args(flags + ["--global-batch-size", "6"]), dp=1)  # 3 micro-batches


def test_training_builds_its_pipeline_with_the_schedule_flags(monkeypatch):
    """The training loop hands the virtual stages and the overlap flag to its Pipeline (whose
    schedules the tests above and the layout checker's runs check)."""
    from types import SimpleNamespace

    from megadual.training import loop
    config = parse_args(TINY_MOE + INTERLEAVED + ["--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "2",
                                                  "--overlap-moe-expert-parallel-comm"])
    topo = SimpleNamespace(group=lambda name: None, layout=SimpleNamespace(tp=1, dp=1, pp=2), pp_rank=0,
                           members={"pp": [0, 1]})
    monkeypatch.setattr(loop, "Pipeline", lambda *args, **kwargs: kwargs)
    built = loop.build_pipeline(config, topo, None, torch.device("cpu"), None)
    assert (built["virtual_stages"], built["overlap"]) == (2, True)


def test_first_and_last_stage_layer_counts_override_the_even_split():
    assert [s.last_layer - s.first_layer for s in stage_specs(7, 4, first=1)] == [1, 2, 2, 2]
    assert [(s.first_layer, s.last_layer) for s in stage_specs(8, 4, first=2, last=0)] == \
        [(0, 2), (2, 5), (5, 8), (8, 8)]
    parse_args(TINY_MOE + ["--num-layers", "6", "--pipeline-model-parallel-size", "2", "--pipeline-schedule",
                           "dualpipev", "--decoder-first-pipeline-num-layers", "0"])
    with pytest.raises(ConfigError, match=r"--num-layers \(6\) minus --decoder-first/last-pipeline-num-layers "
                                          r"must split evenly over the 3 pipeline stages"):
        parse_args(TINY_MOE + ["--num-layers", "6", "--pipeline-model-parallel-size", "4",
                               "--decoder-first-pipeline-num-layers", "2"])


def test_schedule_needs_enough_microbatches():
    args = TINY_MOE + ["--num-layers", "4", "--pipeline-model-parallel-size", "4",
                       "--pipeline-schedule", "dualpipe"]
    validate_pipeline(parse_args(args + ["--micro-batch-size", "1"]), dp=1)  # 8 micro-batches
    flags = r"--num-microbatches .* must be >= 2 \* --pipeline-model-parallel-size"
    with pytest.raises(ConfigError, match=flags):
        validate_pipeline(parse_args(args), dp=1)  # 4 micro-batches


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_forward_only_schedule_pipelines_every_stage(schedule, pp):
    count = 2 * pp + 2
    path = pipeline_layout(schedule, pp, count).paths[0]
    schedules = forward_only_schedule(Layout((path,), (range(count),)), pp)
    match_messages(schedules)
    for rank, actions in enumerate(schedules):
        forwards = sorted((a.chunk, a.mb) for a in actions if a.kind == Kind.F)
        assert forwards == sorted((chunk, mb) for r, chunk in path if r == rank for mb in range(count))
    # at most one tick per micro-batch and stage, each as long as the stages of a rank
    assert simulate(schedules).makespan <= len(path) // pp * (count + len(path) - 1)


@pytest.mark.parametrize("schedule,pp,m", [("1f1b", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 2, 8),
                                           ("dualpipev", 4, 10)])
def test_receives_posted_ahead_stay_valid_and_move_one_compute(schedule, pp, m):
    schedules = build_schedule(schedule, pp, m)
    moved = [post_receives_ahead(actions, 1) for actions in schedules]
    check_schedule(moved, pipeline_layout(schedule, pp, m))  # matched in order, received before use

    def computes_before(actions):
        count, where = 0, {}
        for a in actions:
            if a.is_comm:
                where[a] = count
            else:
                count += 1
        return where

    for before, after in zip(schedules, moved):
        assert [a for a in after if not a.is_comm] == [a for a in before if not a.is_comm]
        old, new = computes_before(before), computes_before(after)
        for action, position in old.items():
            want = position if action.is_send else max(0, position - 1)
            assert new[action] == want, action
    assert any(a != b for before, after in zip(schedules, moved) for a, b in zip(before, after))


def test_receives_ahead_need_a_backend_with_per_op_handles():
    layout = pipeline_layout("1f1b", 1, 1)
    model = build_stage_model(tiny(), layout, 0, SEED)
    with pytest.raises(ValueError, match="recv_lookahead"):
        PipelineRuntime([], layout, model.chunks, 0, [0], activation_shape=SHAPE, recv_lookahead=1)
