"""Sample-based schedules, the batch-size ramp, WSD, and phases through checkpoints (issue 21).

The formulas are written out here from Megatron's definitions (REFERENCE.md), not taken from
megadual's modules; the runs compare a ramped run with fixed-batch runs chained through
checkpoints, a resumed ramp with an unstopped one, and check what a new phase may change.
"""
import itertools
import math
import re

import pytest

from megadual.arguments import parse_args
from megadual.config import ConfigError
from megadual.data.batch_ramp import BatchRamp
from megadual.training.checkpoint import CheckpointError
from megadual.training.loop import pretrain
from megadual.training.lr_schedule import LRSchedule
from tests.helpers import TINY_MOE, single_process_group
from tests.megatron_lr import megatron_lr

BASE = ["--mock-data", "--vocab-size", "64"]


@pytest.mark.parametrize("wsd_style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_wsd_matches_megatrons_formula_in_samples(wsd_style):
    flags = BASE + ["--train-samples", "4000", "--global-batch-size", "8", "--micro-batch-size", "8", "--lr", "2e-3",
                    "--min-lr", "1e-4", "--lr-decay-style", "WSD", "--lr-wsd-decay-style", wsd_style,
                    "--lr-warmup-samples", "400", "--lr-decay-samples", "3600", "--lr-wsd-decay-samples", "1000"]
    c = parse_args(flags)
    schedule = LRSchedule.from_flags(c.optim, c.train)
    for consumed in range(400, 4000, 8):  # after the warm-up (whose first step megadual does not run at 0)
        want = megatron_lr(consumed, 2e-3, 1e-4, 400, 3600, "WSD", wsd_style, 1000)
        assert schedule.lr(consumed // 8, consumed, 8) == pytest.approx(want, rel=1e-12, abs=1e-15)
    stable, annealing = schedule.lr(0, 2600, 8), schedule.lr(0, 2608, 8)
    assert stable == 2e-3 and annealing < 2e-3


@pytest.mark.parametrize("style", ["cosine", "WSD"])
def test_sample_schedule_with_a_fixed_batch_is_the_iteration_schedule(style):
    common = ["--global-batch-size", "8", "--micro-batch-size", "8", "--lr-decay-style", style,
              "--lr-wsd-decay-style", "minus_sqrt"]
    wsd = style == "WSD"
    by_iters = parse_args(BASE + common + ["--train-iters", "50", "--lr-warmup-iters", "5", "--lr-decay-iters", "40"]
                          + (["--lr-wsd-decay-iters", "20"] if wsd else []))
    by_samples = parse_args(BASE + common + ["--train-samples", "400", "--lr-warmup-samples", "40",
                                             "--lr-decay-samples", "320"]
                            + (["--lr-wsd-decay-samples", "160"] if wsd else []))
    assert by_samples.train.train_iters == 50
    a, b = (LRSchedule.from_flags(c.optim, c.train) for c in (by_iters, by_samples))
    assert [a.lr(i, 8 * i, 8) for i in range(50)] == pytest.approx([b.lr(i, 8 * i, 8) for i in range(50)], rel=1e-12)
    # warm-up: the update at iteration i takes LR lr * (i + 1) / warm-up
    assert a.lr(0, 0, 8) == pytest.approx(3e-4 / 5) and a.lr(4, 32, 8) == pytest.approx(3e-4)


def test_ramp_follows_megatrons_rule():
    start, increment, samples, final = 24, 8, 1000, 64
    per_increment = samples / ((final - start) / increment)
    ramp = BatchRamp.from_flags(final, (start, increment, samples))
    for consumed in range(0, 1500, 7):
        want = final if consumed > samples else min(start + increment * math.floor(consumed / per_increment), final)
        assert ramp.batch_size(consumed) == want
    c = parse_args(BASE + ["--global-batch-size", "64", "--micro-batch-size", "8", "--train-samples", "3000",
                           "--rampup-batch-size", "24", "8", "1000"])
    consumed = iterations = 0
    while consumed + ramp.batch_size(consumed) <= 3000:
        consumed, iterations = consumed + ramp.batch_size(consumed), iterations + 1
    assert c.train.train_iters == iterations


@pytest.mark.parametrize("flags, named", [
    (["--train-iters", "5", "--train-samples", "80"], "--train-iters and --train-samples"),
    (["--train-samples", "80", "--lr-warmup-iters", "2"], "--lr-warmup-iters"),
    (["--train-iters", "5", "--lr-decay-samples", "40"], "--lr-decay-samples"),
    (["--train-iters", "5", "--rampup-batch-size", "4", "2", "8"], "--rampup-batch-size needs"),
    (["--train-samples", "80", "--rampup-batch-size", "3", "2", "8"], "multiple of INCREMENT"),
    (["--train-samples", "80", "--rampup-batch-size", "4", "2"], "three numbers"),
    (["--train-samples", "80", "--lr-decay-style", "WSD"], "--lr-wsd-decay-samples"),
    (["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"], "at most one"),
])
def test_mixed_or_bad_schedule_flags_are_refused(flags, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_args(BASE + ["--global-batch-size", "8", "--micro-batch-size", "2"] + flags)


def test_ramp_breaking_dualpipe_is_refused_at_start_up():
    from megadual.config_validate import validate_world
    flags = BASE + ["--num-layers", "4", "--train-samples", "200", "--global-batch-size", "16",
                    "--micro-batch-size", "2", "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipe"]
    validate_world(parse_args(flags + ["--rampup-batch-size", "8", "4", "24"]), 2, 2)
    for ramp, why in ((["4", "4", "24"], ">= 2 * --pipeline-model-parallel-size"), (["10", "2", "24"], "even")):
        with pytest.raises(ConfigError, match=re.escape(why)) as err:
            validate_world(parse_args(flags + ["--rampup-batch-size", *ramp]), 2, 2)
        assert "--rampup-batch-size" in str(err.value)


# One-process runs of the tiny MoE; constant LR so that iteration- and sample-based runs agree.
RUN = TINY_MOE + ["--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--log-interval", "1",
                  "--num-layers", "2", "--seq-length", "16"]
RAMP = ["--global-batch-size", "8", "--rampup-batch-size", "4", "2", "8", "--train-samples", "26"]
# batches 4, 6, 8, 8: 2 increments of 4 samples each, then the full batch


def run(args, log=None):
    lines = [] if log is None else log
    with single_process_group() as device:
        result = pretrain(parse_args(RUN + args), device, log=lines.append)
    return result, lines


def batches_logged(lines):
    return [int(m.group(1)) for line in lines for m in [re.search(r"global batch size:\s+(\d+)", line)] if m]


def weights(result):
    return {name: p.detach().clone() for name, p in result.model.named_parameters()}


@pytest.fixture(scope="module")
def ramped():
    return run(RAMP)


def test_ramped_run_equals_fixed_batches_chained_through_checkpoints(ramped, tmp_path):
    result, lines = ramped
    assert batches_logged(lines) == [4, 6, 8, 8]
    assert result.final_state.consumed_samples == 26 and result.final_state.iteration == 4
    losses, save = [], ["--save", str(tmp_path), "--load", str(tmp_path)]
    for batch, iters in ((4, 1), (6, 2), (8, 4)):
        chained, _ = run(["--global-batch-size", str(batch), "--train-iters", str(iters)] + save)
        losses += chained.losses
    assert losses == result.losses  # bit for bit: the same samples in the same order, the same updates
    assert chained.final_state.consumed_samples == 26
    mine, theirs = weights(result), weights(chained)
    assert all((mine[name] == theirs[name]).all() for name in mine)


def test_resume_in_the_middle_of_the_ramp_is_exact(ramped, tmp_path):
    result, _ = ramped
    first, _ = run(RAMP + ["--save", str(tmp_path), "--exit-interval", "1"])
    assert first.final_state.consumed_samples == 4  # the next batch would be 6
    resumed, lines = run(RAMP + ["--load", str(tmp_path)])
    assert batches_logged(lines) == [6, 8, 8]
    assert first.losses + resumed.losses == result.losses
    mine, theirs = weights(result), weights(resumed)
    assert all((mine[name] == theirs[name]).all() for name in mine)


def lrs_logged(lines):
    return [float(m.group(1)) for line in lines for m in [re.search(r"learning rate: (\S+) \|", line)] if m]


def test_a_new_phase_takes_the_schedule_as_megatron_decides(tmp_path):
    run(["--train-iters", "1", "--save", str(tmp_path), "--moe-router-bias-update-rate", "1e-3"])
    load = ["--train-iters", "2", "--load", str(tmp_path)]
    with pytest.raises(CheckpointError) as err:
        run(load + ["--lr", "5e-4"])
    message = str(err.value)
    assert "--lr: checkpoint has 0.001, this run has 0.0005" in message
    assert "--override-opt-param-scheduler" in message and "--use-checkpoint-opt-param-scheduler" in message
    assert "--seq-length" in message  # the one list of what a resume may change, printed with the refusal
    _, overridden = run(load + ["--lr", "5e-4", "--override-opt-param-scheduler", "--mtp-loss-scaling-factor", "0.3",
                                "--moe-router-bias-update-rate", "0"])
    assert lrs_logged(overridden) == [5e-4]
    assert any("moe router bias update rate: 0.0 | mtp loss scaling factor: 0.3" in line for line in overridden)
    _, kept = run(load + ["--lr", "5e-4", "--use-checkpoint-opt-param-scheduler"])
    assert lrs_logged(kept) == [1e-3]


def test_context_extension_loads_at_another_length(tmp_path):
    mla = ["--multi-latent-attention", "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
           "--v-head-dim", "16"]
    run(mla + ["--train-iters", "2", "--seq-length", "16", "--save", str(tmp_path / "a")])
    yarn = ["--rope-scaling-factor", "4", "--original-max-position-embeddings", "16", "--mscale", "1",
            "--mscale-all-dim", "1"]
    longer, lines = run(mla + yarn + ["--train-iters", "3", "--seq-length", "32", "--load", str(tmp_path / "a"),
                                      "--save", str(tmp_path / "a")])
    assert longer.final_state.consumed_samples == 3 * 8 and len(longer.losses) == 1
    assert "seq length: 32 | rope scaling factor: 4.0" in " ".join(lines)
    tuned, _ = run(mla + yarn + ["--train-iters", "1", "--seq-length", "24", "--load", str(tmp_path / "a"),
                                 "--finetune"])
    assert tuned.final_state.iteration == 1
    with pytest.raises(CheckpointError, match="--kv-lora-rank"):
        run(mla[:1] + ["--kv-lora-rank", "8"] + mla[3:] + ["--train-iters", "4", "--load", str(tmp_path / "a")])


def test_hf_export_writes_the_yarn_it_trained_with_and_import_keeps_it():
    from megadual.arguments import parse_model_flags
    from megadual.hf.config_map import architecture_flags, hf_config
    yarn = ["--rope-scaling-factor", "40", "--original-max-position-embeddings", "16", "--beta-fast", "32",
            "--beta-slow", "1", "--mscale", "1", "--mscale-all-dim", "1"]
    m = parse_model_flags(["--vocab-size", "64", "--multi-latent-attention", "--seq-length", "64"] + yarn).model
    hf = hf_config(m, 64)
    assert hf["rope_scaling"] == {"type": "yarn", "rope_type": "yarn", "factor": 40.0,
                                  "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "mscale": 1.0, "mscale_all_dim": 1.0}
    flags = architecture_flags({**hf, "rope_parameters": None}, 0)  # DeepSeek's key alone
    back = parse_model_flags(flags + ["--seq-length", "64"]).model
    names = ("rope_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim")
    assert [getattr(back, name) for name in names] == [40.0, 16, 32.0, 1.0, 1.0, 1.0]
    assert hf_config(parse_model_flags(["--vocab-size", "64", "--multi-latent-attention"]).model, 64)["rope_scaling"] \
        is None



def test_ramped_data_order_is_the_unstopped_order_on_every_dp_rank():
    """Each step reads the next `batch` samples, DP rank r micro-batch by micro-batch; a loader built
    at a checkpoint's consumed samples continues with the samples an unstopped run reads."""
    from megadual.data.sampler import PretrainingSampler
    ramp, mbs, dp, total = BatchRamp.from_flags(16, (4, 4, 24)), 2, 2, 200

    def steps(consumed, count):
        readers = [iter(PretrainingSampler(total, consumed, mbs, rank, dp)) for rank in range(dp)]
        read = []
        for _ in range(count):
            batch = ramp.batch_size(consumed)
            ids = [i for _ in range(batch // (mbs * dp)) for reader in readers for i in next(reader)]
            read.append(sorted(ids))
            consumed += batch
        return read, consumed

    straight, _ = steps(0, 8)
    assert straight[0] == list(range(4)) and straight[2] == list(range(8, 16))  # batches 4, 4, 8, ...
    first, consumed = steps(0, 3)
    rest, _ = steps(consumed, 5)
    assert first + rest == straight
    assert list(itertools.chain.from_iterable(straight)) == list(range(sum(len(step) for step in straight)))
