"""The pretraining run: build everything from a RunConfig, train, evaluate, checkpoint."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from megadual.arguments import resolve_device_defaults
from megadual.config import RunConfig
from megadual.config_validate import node_size, num_microbatches, validate_world, virtual_stages
from megadual.data.batch_ramp import BatchRamp
from megadual.data.builder import build_datasets
from megadual.data.documents import boundaries_of
from megadual.data.sampler import build_loader
from megadual.model.flops import training_flops_per_iteration
from megadual.model.gpt import LM_LOSS, loss_names
from megadual.parallel import collectives
from megadual.parallel.context import BuildContext
from megadual.parallel.linear import linear
from megadual.parallel.recompute import RecomputePlan
from megadual.parallel.tensor import TensorParallel
from megadual.parallel.topology import Layout, Topology
from megadual.parallel.wgrad import add_to_grad
from megadual.pipeline.driver import Pipeline
from megadual.pipeline.schedules import pipeline_layout
from megadual.pipeline.stage_model import StageModel, build_full_model, build_stage_model
from megadual.training.checkpoint import CheckpointManager, TrainState
from megadual.training.checkpoint.load import resumed_schedule
from megadual.training.device_check import watched
from megadual.training.dist_optimizer import DistributedOptimizer, optimizer_state_bytes
from megadual.training.distributed import local_world_size
from megadual.training.lr_schedule import LRSchedule
from megadual.training.memory import MemoryMeasurement, MemoryReport
from megadual.training.metrics import (
    IntervalLog,
    TensorBoard,
    format_iteration,
    format_validation,
)
from megadual.training.optimizer import build_optimizer
from megadual.training.step import StepResult, autocast_context, forward_backward, train_step
from megadual.training.stopping import StopRequests


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class RunResult:
    """What a run did, for callers and tests: every step it trained, every validation loss, and
    the model, optimizer and state it ended with."""
    steps: list[StepResult] = field(default_factory=list)
    validation_losses: list[dict[str, float]] = field(default_factory=list)  # by log name, per evaluation
    model: StageModel | None = None
    optimizer: torch.optim.Optimizer | DistributedOptimizer | None = None
    final_state: TrainState | None = None
    memory: MemoryReport | None = None  # this rank's, measured in the run's first step
    stop_reason: str | None = None  # why it stopped before --train-iters (stopping.py), if it did

    @property
    def losses(self) -> list[float]:
        return [step.lm_loss for step in self.steps]


def build_topology(config: RunConfig) -> Topology:
    """This rank's place in the grid of a layout that validate_world accepted."""
    p = config.parallel
    layout = Layout(dist.get_world_size(), p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                    p.expert_model_parallel_size, node_size(config, local_world_size()))
    return Topology(layout, dist.get_rank(), timedelta(minutes=config.train.distributed_timeout_minutes))


def linear_gemm(config: RunConfig):
    """The linear of every layer: F.linear's, or with --fp8-format the FP8 one of --fp8-recipe."""
    if config.fp8.fp8_format is None:
        return linear
    from megadual.fp8.linear import fp8_linear
    return {"blockwise": fp8_linear}[config.fp8.fp8_recipe]


def tensor_parallel(config: RunConfig, topo: Topology) -> TensorParallel:
    return TensorParallel(topo.group("tp"), config.parallel.sequence_parallel and topo.layout.tp > 1)


def build_context(config: RunConfig, topo: Topology) -> BuildContext:
    hierarchical = config.parallel.moe_token_dispatcher_type == "hierarchical"
    return BuildContext(tensor_parallel(config, topo), topo.group("ep"), topo.layout.nodes_per_ep_group,
                        linear_gemm(config), config.fp8.moe_fp8_dispatch, RecomputePlan.from_flags(config.train),
                        ep_node_groups=topo.ep_node_groups() if hierarchical else None,
                        grouped_gemm=config.parallel.moe_grouped_gemm)


def build_model(config: RunConfig, topo: Topology, device: torch.device) -> StageModel:
    """The whole model, or under PP the stage chunks this pipeline rank holds."""
    ctx, seed = build_context(config, topo), config.train.seed
    if topo.layout.pp == 1:
        model = build_full_model(config.model, seed, ctx)
    else:
        layout = pipeline_layout(config.parallel.pipeline_schedule, topo.layout.pp,
                                 num_microbatches(config, topo.layout.dp),
                                 virtual_stages(config.parallel, config.model.num_layers))
        model = build_stage_model(config.model, layout, topo.pp_rank, seed, ctx,
                                  first_stage_layers=config.parallel.decoder_first_pipeline_num_layers,
                                  last_stage_layers=config.parallel.decoder_last_pipeline_num_layers)
    return model.to(device)


def build_model_optimizer(config: RunConfig, model: StageModel,
                          topo: Topology) -> torch.optim.Optimizer | DistributedOptimizer:
    """The plain AdamW, or with --use-distributed-optimizer the sharded one, which under --bf16
    also turns the model's weights into BF16 (its FP32 masters taken first)."""
    o = config.optim
    if not o.use_distributed_optimizer:
        return build_optimizer(list(model.named_parameters()), o)
    dtype = torch.bfloat16 if config.train.bf16 else torch.float32
    return DistributedOptimizer(model.param_table, topo, o, dtype, o.ddp_bucket_size)


def build_pipeline(config: RunConfig, topo: Topology, model: StageModel, device: torch.device,
                   optimizer: torch.optim.Optimizer | DistributedOptimizer) -> Pipeline:
    m, p, tp = config.model, config.parallel, tensor_parallel(config, topo)
    seq = m.seq_length // tp.size if tp.sequence_parallel else m.seq_length
    n_micro = num_microbatches(config, topo.layout.dp)
    return Pipeline(model, p.pipeline_schedule, p.pipeline_split_backward, n_micro, topo.pp_rank,
                    topo.group("pp"), topo.members["pp"],
                    activation_shape=(seq, config.train.micro_batch_size, m.hidden_size), device=device,
                    autocast=lambda: autocast_context(device, config.train.bf16),
                    accumulate_grad=optimizer.accumulate_grad if isinstance(optimizer, DistributedOptimizer)
                    else add_to_grad, virtual_stages=virtual_stages(p, m.num_layers),
                    overlap=p.overlap_moe_expert_parallel_comm)


def samples_needed(config: RunConfig) -> tuple[int, int, int]:
    """Samples of the train, valid and test splits the run reads: the train split's from the start,
    so a resumed run (whatever its --seq-length) finds its position in the same index."""
    t = config.train
    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 0
    train = t.train_samples if t.train_samples is not None else t.train_iters * t.global_batch_size
    return train, evals * t.eval_iters * t.global_batch_size, t.eval_iters * t.global_batch_size


def next_batches(loader, count: int) -> list[dict]:
    return [next(loader) for _ in range(count)]


@torch.no_grad()
def evaluate(model: StageModel, loader, count: int, iters: int, topo: Topology, device, bf16: bool,
             pipeline: Pipeline | None = None, mtp: bool = False) -> dict[str, float]:
    """The mean validation losses by log name: the lm loss, and with `mtp` each MTP depth's."""
    if pipeline is not None:
        mean_losses = pipeline.evaluate
    else:
        mean_losses = lambda batches: forward_backward(model.chunks[0], batches, device, bf16, backward=False)
    names = loss_names(model.config) if mtp else [LM_LOSS]
    with watched(f"evaluation on rank {topo.rank}"):
        return _mean_validation_losses(model, loader, count, iters, topo, device, mean_losses, names, mtp)


def _mean_validation_losses(model: StageModel, loader, count: int, iters: int, topo: Topology, device,
                            mean_losses, names: list[str], mtp: bool) -> dict[str, float]:
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    with model.evaluating(mtp):  # no dropout
        for _ in range(iters):
            losses = mean_losses(next_batches(loader, count))
            totals += torch.stack([losses[name] for name in names]).double() * count
    for router, _ in model.routers():
        router.take_stats()  # evaluation must not move the expert biases
    if topo.group("dp") is not None:
        collectives.all_reduce(totals, topo.group("dp"))
    return dict(zip(names, (totals / (count * iters * topo.layout.dp)).tolist()))  # the one host transfer


def phase_line(config: RunConfig, state: TrainState) -> str:
    """What this run (a phase of a recipe) trains with, logged once at its start."""
    t, o, m = config.train, config.optim, config.model
    length = f"--train-samples {t.train_samples}" if t.train_samples is not None else f"--train-iters {t.train_iters}"
    return (f" > phase from iteration {state.iteration}, consumed samples {state.consumed_samples}: {length} | "
            f"seq length: {m.seq_length} | rope scaling factor: {m.rope_scaling_factor} | lr: {o.lr:.6E} | "
            f"min lr: {o.min_lr:.6E} | lr decay style: {o.lr_decay_style} | "
            f"moe router bias update rate: {o.moe_router_bias_update_rate} | "
            f"mtp loss scaling factor: {m.mtp_loss_scaling_factor} |")


def resumed_length(config: RunConfig, checkpoint) -> RunConfig:
    """With --train-samples, --train-iters counted from the checkpoint's position: a phase may change
    the batch size, so the iterations left follow from the samples left."""
    t = config.train
    if t.train_samples is None or checkpoint is None or t.finetune:
        return config
    state, ramp = checkpoint.train_state, BatchRamp.from_flags(t.global_batch_size, t.rampup_batch_size)
    left = ramp.iterations(t.train_samples, state.consumed_samples)
    return replace(config, train=replace(t, train_iters=state.iteration + left))


def pretrain(config: RunConfig, device: torch.device, log=print, grad_hook=None) -> RunResult:
    """Train as `config` says. `grad_hook(model, gradients)`, if given, is called every step after
    the gradients' reduction, before clipping: `gradients()` gives each of the rank's parameters'
    reduced gradient by global name (every rank must call it; tests compare them across layouts).
    A stop request (stopping.py) ends the run early, after the iteration all ranks agree on, with a
    checkpoint when --save is set."""
    config = resolve_device_defaults(config, device.type)
    validate_world(config, dist.get_world_size(), local_world_size())
    t = config.train
    with StopRequests(t.exit_signal if t.exit_signal_handler else None, t.exit_duration_in_mins, device) as stop:
        topo = build_topology(config)
        with CheckpointManager(config, log) as checkpoints:  # --save locked, --load found, before anything is built
            config = resumed_length(config, checkpoints.found)
            t = config.train
            done = checkpoints.already_trained(t.train_iters)
            if done is not None:
                return RunResult(final_state=done)
            config = replace(config, optim=resumed_schedule(checkpoints.found, config, log))
            return train(config, topo, device, log, grad_hook, checkpoints, stop)


def train(config: RunConfig, topo: Topology, device: torch.device, log, grad_hook,
          checkpoints: CheckpointManager, stop: StopRequests) -> RunResult:
    """Build the data, model and optimizer, restore the checkpoint found, and run the iterations."""
    t, o = config.train, config.optim
    n_micro = num_microbatches(config, topo.layout.dp)
    d, rank0 = config.data, dist.get_rank() == 0
    train_ds, valid_ds, _ = build_datasets(list(d.data_path), d.split, config.model.seq_length, t.seed,
                                           samples_needed(config), d.mock_data, d.vocab_size,
                                           warn=log if rank0 else lambda message: None)
    torch.manual_seed(t.seed)
    model = build_model(config, topo, device)
    optimizer = build_model_optimizer(config, model, topo)
    # After the optimizer: the pipeline passes activations in the model's (possibly BF16) dtype.
    pipeline = build_pipeline(config, topo, model, device, optimizer) if topo.layout.pp > 1 else None
    if isinstance(optimizer, DistributedOptimizer) and rank0:
        log(f" > distributed optimizer: {len(optimizer.buckets)} buckets, optimizer state on rank 0: "
            f"{optimizer_state_bytes(optimizer)} bytes")
    state = checkpoints.restore(model, optimizer)
    documents = boundaries_of(d)  # every stage's attention needs them, so every rank reads the tokens
    # other pipeline ranks take only the sample ids
    reads = pipeline is None or pipeline.reads_data or documents is not None
    loader = lambda ds, consumed: build_loader(ds, consumed, t.micro_batch_size, topo.dp_rank, topo.layout.dp,
                                               reads, documents)
    train_loader = loader(train_ds, state.consumed_samples)
    valid_loader = loader(valid_ds, 0) if valid_ds is not None and t.eval_interval else None
    writer = TensorBoard(t.tensorboard_dir) if rank0 else TensorBoard(None)
    result, interval, consecutive_bad = RunResult(), IntervalLog(), 0
    is_moe = config.model.num_experts > 0
    memory = MemoryMeasurement(model, optimizer, device)
    ramp, schedule = BatchRamp.from_flags(t.global_batch_size, t.rampup_batch_size), LRSchedule.from_flags(o, t)
    if rank0:
        log(phase_line(config, state))
    while state.iteration < t.train_iters:
        batch = ramp.batch_size(state.consumed_samples)
        lr = schedule.lr(state.iteration, state.consumed_samples, batch)
        start = time.perf_counter()
        step_micro = batch // (t.micro_batch_size * topo.layout.dp)
        model.set_aux_loss_grad_scale(1.0 / step_micro)
        batches = next_batches(train_loader, step_micro)
        with memory.first_step(state.iteration, log):  # then every rank logs its memory report
            step = train_step(model, optimizer, batches, topo, lr, o.clip_grad, o.moe_router_bias_update_rate,
                              device, t.bf16, grad_hook, pipeline)
        interval.add(step, time.perf_counter() - start)
        state.iteration += 1
        state.consumed_samples += batch
        result.steps.append(step)
        consecutive_bad = consecutive_bad + 1 if step.skipped else 0
        state.skipped_iterations += int(step.skipped)
        if consecutive_bad >= t.max_consecutive_skipped_iters:
            raise NonFiniteLossError(
                f"loss or gradient was not finite for {consecutive_bad} iterations in a row (last: lm loss "
                f"{step.lm_loss}, grad norm {step.grad_norm}) at iteration {state.iteration}; stopping. "
                f"Lower --lr or raise --max-consecutive-skipped-iters.")
        if state.iteration % t.log_interval == 0 and rank0:
            with watched(f"log line on rank {topo.rank}") as watch:
                totals = interval.totals()  # the interval's one host transfer
            if watch is not None:  # counted with the step that logs
                step.host_syncs = (step.host_syncs or 0) + len(watch.syncs)
            log(format_iteration(state.iteration, t.train_iters, state.consumed_samples, lr,
                                 batch, batch * config.model.seq_length, totals, is_moe,
                                 training_flops_per_iteration(config.model, batch) / dist.get_world_size()
                                 if t.log_throughput else None))
            if not step.skipped:
                writer.scalars(state.iteration, {**totals.last, "learning rate": lr})
            interval.reset()
        if valid_loader is not None and state.iteration % t.eval_interval == 0:
            losses = evaluate(model, valid_loader, n_micro, t.eval_iters, topo, device, t.bf16, pipeline,
                              mtp=t.mtp_eval_loss)
            result.validation_losses.append(losses)
            if rank0:
                log(format_validation(state.iteration, losses))
                writer.scalars(state.iteration, {f"validation {name}": v for name, v in losses.items()})
        checkpoints.after_step(state, step.skipped)
        result.stop_reason = stop.agreed_reason()
        if result.stop_reason or (t.exit_interval and state.iteration % t.exit_interval == 0):
            break
    saved = checkpoints.finish(state)  # the last save, and any background save, published
    if result.stop_reason and rank0:
        log(f" exiting program at iteration {state.iteration}: {result.stop_reason}; "
            + (f"checkpoint saved in {t.save}" if saved else "nothing saved" + ("" if t.save else " (no --save)")))
    result.model, result.optimizer, result.final_state, result.memory = model, optimizer, state, memory.report
    return result
