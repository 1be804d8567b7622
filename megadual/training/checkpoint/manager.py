"""A run's checkpoints from start-up to the last save: the one object the training loop talks to.

    with CheckpointManager(config, log) as checkpoints:   # --save locked and writable, --load resolved
        if checkpoints.already_trained(train_iters): ...  # nothing to do, nothing written
        state = checkpoints.restore(model, optimizer)      # the loaded state, or a fresh one
        ... after every step: checkpoints.after_step(state, step.skipped)
        checkpoints.finish(state)                          # the last save, published on return

`finish` is also what "save now and stop" calls (a signal, a time limit): it saves the current
iteration unless that is saved already, waits for any background save, and returns.

No checkpoint is written from a step that was skipped (loss or gradient norm not finite): a
save that falls due then waits for the next step that updates the weights, so the tracker
never names weights that diverged. A failed save stops the run, or with
--save-failures-continue is logged and training goes on.
"""
from __future__ import annotations

from typing import Self

import torch

from megadual.config import RunConfig
from megadual.pipeline.stage_model import StageModel
from megadual.training.checkpoint.coordination import Coordination
from megadual.training.checkpoint.layout import CheckpointError, TrainState, last_published
from megadual.training.checkpoint.load import Checkpoint, find_checkpoint, restore
from megadual.training.checkpoint.lock import SaveLock
from megadual.training.checkpoint.ownership import claim_save
from megadual.training.checkpoint.save import SaveFailed, Saver


class CheckpointManager:
    def __init__(self, config: RunConfig, log):
        """Every rank, at the same point of start-up: lock --save, check it can be written, and find
        (and verify) the checkpoint --load names. `log` prints on rank 0."""
        self.config, self.coord = config, Coordination.new()
        self.log = log if self.coord.rank == 0 else (lambda line: None)
        self._lock: SaveLock | None = None
        self._saver: Saver | None = None
        self._model = self._optimizer = None
        self._saved_iteration, self._postponed, self._last_step_skipped = 0, False, False
        save = config.train.save
        try:
            if save:
                took_over = self.coord.on_rank0(self._take_lock)
                if took_over:
                    self.log(f" {took_over}")
            self.found: Checkpoint | None = find_checkpoint(config, self.coord, self.log)
            if save:
                found = self.found
                run_id = self.coord.on_rank0(lambda: claim_save(config, found and found.path, found and found.meta,
                                                                self.log))
                self._saver = Saver(config, self.coord, self.log, run_id)
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> str | None:
        self._lock = SaveLock.acquire(self.config.train.save)
        return self._lock.took_over

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def already_trained(self, train_iters: int) -> TrainState | None:
        """The loaded state when it is at or past `train_iters` (logged: the run has nothing to do)."""
        if self.found is None or self.config.train.finetune or self.found.train_state.iteration < train_iters:
            return None
        self.log(f" nothing to train: --train-iters {train_iters} is at or below the iteration of "
                 f"{self.found.path} ({self.found.train_state.iteration}); no checkpoint written")
        return self.found.train_state

    def restore(self, model: StageModel, optimizer: torch.optim.Optimizer) -> TrainState:
        """Load the checkpoint found into `model` and `optimizer` (which later saves write); the state
        to train on from: the checkpoint's, or iteration 0."""
        self._model, self._optimizer = model, optimizer
        state = TrainState()
        if self.found is not None:
            state = restore(self.found, model, optimizer, self.config, self.coord)
            self.log(f" successfully loaded checkpoint from {self.found.path} at iteration {state.iteration}")
        self._saved_iteration = state.iteration
        return state

    def after_step(self, state: TrainState, skipped: bool) -> None:
        """Save when --save-interval says so, unless this step was skipped: then after the next good one."""
        interval = self.config.train.save_interval
        self._last_step_skipped = skipped
        if self._saver is None or not (self._postponed or (interval and state.iteration % interval == 0)):
            return
        if skipped:
            if not self._postponed:
                self.log(f" not saving at iteration {state.iteration}: its step was skipped (loss or gradient "
                         f"not finite); saving after the next step that updates the weights")
            self._postponed = True
            return
        self._postponed = False
        self.save(state)

    def save(self, state: TrainState) -> None:
        """Save `state` now (under --async-save: start saving it)."""
        self._collect_background_save()
        try:
            self._saver.save(self._model, self._optimizer, state)
            self._saved_iteration = state.iteration
        except SaveFailed as e:
            self._failed(e)

    def finish(self, state: TrainState) -> bool:
        """Save `state` unless it is saved already or its step was skipped, and wait until every save of
        this run is published. Whether `state`'s iteration is in --save now; CheckpointError when its
        save failed (under --save-failures-continue: the run must not look complete)."""
        if self._saver is None:
            return False
        if state.iteration != self._saved_iteration:
            if self._last_step_skipped:
                self.log(f" no checkpoint at iteration {state.iteration}: its step was skipped (loss or gradient "
                         f"not finite)")
            else:
                self.save(state)
        self._collect_background_save()
        if state.iteration != self._saved_iteration and not self._last_step_skipped:
            raise CheckpointError(f"the run trained to iteration {state.iteration} but its last save failed; "
                                  f"{last_published(self.config.train.save)}")
        return state.iteration == self._saved_iteration

    def close(self) -> None:
        """Wait for a background save still running, and release --save's lock."""
        try:
            if self._saver is not None:
                try:
                    self._saver.close()
                except SaveFailed as e:
                    self.log(f" {e}")
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _collect_background_save(self) -> None:
        try:
            self._saver.wait()
        except SaveFailed as e:
            self._saved_iteration = -1  # the background save was of the iteration recorded as saved
            self._failed(e)

    def _failed(self, error: SaveFailed) -> None:
        if not self.config.train.save_failures_continue:
            raise CheckpointError(f"{error}. The run stops (--save-failures-continue would keep training)") \
                from error
        self.log(f" {error}; training continues (--save-failures-continue)")
