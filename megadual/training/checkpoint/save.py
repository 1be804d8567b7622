"""Writing checkpoints into --save so that none is ever lost or half-written.

A save writes the DCP shards into .saving_iter_N/, then the run's metadata, then the manifest
of checksums; renames the folder to iter_N/ (moving an existing folder of that name out of the
way first); and only then replaces the tracker. Nothing is ever written into a published
folder, so a kill at any moment leaves the tracker on a complete checkpoint (or, killed while
replacing the folder the tracker names, on a missing one, and the loader takes the newest
folder that verifies).

With --async-save the state is copied to memory at once and DCP writes it in the background
(torch.distributed.checkpoint.async_save); the rest of the steps follow in this saver's own
thread, so the tracker moves only once the data is complete. The next save, and the end of
the run, wait for it. --keep-last-n-checkpoints removes older folders only after the new one
verified.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from megadual.config import RunConfig
from megadual.pipeline.stage_model import StageModel
from megadual.training.checkpoint.coordination import Coordination
from megadual.training.checkpoint.integrity import (
    checkpoint_key,
    checksums,
    files_written_by,
    verify,
    write_manifest,
)
from megadual.training.checkpoint.layout import (
    META,
    CheckpointError,
    TrainState,
    fsync_dir,
    iteration_dir,
    iteration_folders,
    move_out,
    read_tracker,
    remove_checkpoint,
    remove_leftovers,
    staging_dir,
    write_atomically,
    write_tracker,
)
from megadual.training.checkpoint.storage_limits import in_words


class SaveFailed(CheckpointError):
    """A save that did not complete; the previous checkpoint and the tracker are untouched."""


class Saver:
    def __init__(self, config: RunConfig, coord: Coordination, log, run_id: str):
        """`run_id`: the run each META file names as its writer (ownership.py)."""
        t = config.train
        self.run_id = run_id
        self.root, self.keep, self.config, self.coord, self.log = t.save, t.keep_last_n_checkpoints, config, coord, log
        self._background = ThreadPoolExecutor(1, thread_name_prefix="megadual-save") if t.async_save else None
        # DCP's background writer gets a group of its own: its collectives run while this thread agrees
        # over coord's that the save started.
        self._writer_group = dist.new_group(backend="gloo") if t.async_save else coord.group
        self._pending: Future | None = None
        self.key = coord.everywhere(lambda: checkpoint_key(t.checkpoint_key_file))  # None: unsigned

    def save(self, model: StageModel, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
        """Write `state`'s checkpoint. Returns once it is published, or under --async-save once it is
        copied to memory (`wait` waits for the rest). SaveFailed when the save fails."""
        self.wait()
        started, iteration = time.perf_counter(), state.iteration
        staging = staging_dir(self.root, iteration)
        meta = {"train_state": dataclasses.asdict(state), "config": dataclasses.asdict(self.config),
                "world_size": dist.get_world_size(), "run_id": self.run_id}
        self.log(f" saving checkpoint at iteration {iteration:7d} to {self.root}")
        try:
            leftovers = self.coord.on_rank0(lambda: self._prepare(staging))
            if leftovers:
                self.log(f" removed what an interrupted save left in {self.root}: {', '.join(leftovers)}")
            import torch.distributed.checkpoint as dcp

            from megadual.training.checkpoint.state import checkpoint_state

            state_dict = checkpoint_state(model, optimizer)
            group = self._writer_group
            if self._background is None:
                self.coord.everywhere(lambda: dcp.save(state_dict, checkpoint_id=staging, process_group=group))
            else:
                upload = self.coord.everywhere(
                    lambda: dcp.async_save(state_dict, checkpoint_id=staging, process_group=group))
                self._pending = self._background.submit(self._complete, iteration, staging, meta, started,
                                                        lambda: self.coord.everywhere(upload.result))
                return
        except CheckpointError as e:
            raise self._failed(iteration, staging, e) from e
        self._complete(iteration, staging, meta, started)

    def wait(self) -> None:
        """Until the background save, if any, is published; SaveFailed when it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._background is not None:
                self._background.shutdown()

    def _prepare(self, staging: str) -> list[str]:
        leftovers = remove_leftovers(self.root)
        os.makedirs(staging)
        return leftovers

    def _complete(self, iteration: int, staging: str, meta: dict, started: float, written=None) -> None:
        """After the shards (or once `written()` says they are): the metadata, checksums, the rename and
        the tracker; then retention."""
        try:
            if written is not None:
                written()
            self.coord.on_rank0(lambda: write_atomically(os.path.join(staging, META), json.dumps(meta, indent=1)))
            rank, size, signed = self.coord.rank, self.coord.size, self.key is not None
            mine = self.coord.everywhere(lambda: checksums(staging, files_written_by(staging, rank, size), signed))
            files = {name: entry for each in self.coord.gather(mine) for name, entry in each.items()}
            self.coord.on_rank0(lambda: self._publish(staging, iteration, files))
        except CheckpointError as e:
            raise self._failed(iteration, staging, e) from e
        self.log(f"  successfully saved checkpoint from iteration {iteration:7d} to {self.root} "
                 f"[{time.perf_counter() - started:.2f} s]")
        if self.keep:
            self._retain(iteration)

    def _publish(self, staging: str, iteration: int, files: dict[str, dict]) -> None:
        write_manifest(staging, files, self.key)
        fsync_dir(staging)
        final = iteration_dir(self.root, iteration)
        replaced = move_out(final) if os.path.exists(final) else None
        os.rename(staging, final)
        fsync_dir(self.root)
        write_tracker(self.root, iteration)
        if replaced is not None:
            shutil.rmtree(replaced)

    def _failed(self, iteration: int, staging: str, error: CheckpointError) -> SaveFailed:
        """Remove the partial folder; the error to raise, saying what is kept."""
        problem = in_words(str(error), staging, self.root)
        if self.coord.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            previous = read_tracker(self.root)
        except (OSError, CheckpointError):
            previous = None
        kept = f"the previous checkpoint (iteration {previous}) is kept" if previous is not None else \
            "no earlier checkpoint exists"
        return SaveFailed(f"saving checkpoint at iteration {iteration} to {self.root} failed: {problem}; {kept}")

    def _retain(self, iteration: int) -> None:
        """--keep-last-n-checkpoints: remove the folders before the newest N, once the new one verified."""
        folder = iteration_dir(self.root, iteration)
        problem = verify(folder, self.coord, self.key)
        if problem is not None:
            self.log(f" keeping the older checkpoints: the new {folder} does not verify ({problem})")
            return

        def remove_older() -> list[int]:
            older = [i for i in iteration_folders(self.root) if i < iteration][self.keep - 1:]
            for i in older:
                remove_checkpoint(iteration_dir(self.root, i))
            return older
        try:
            removed = self.coord.on_rank0(remove_older)
        except CheckpointError as e:
            self.log(f" removing older checkpoints from {self.root} failed: {e}")
            return
        if removed:
            self.log(f" removed checkpoints of iterations {', '.join(map(str, removed))} "
                     f"(--keep-last-n-checkpoints {self.keep})")
