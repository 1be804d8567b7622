"""Planted bugs in pipeline schedules, their runtime and the simulator (scripts/mutations.py gathers every area)."""
from mutation import Mutation

MUTATIONS = [
    Mutation(
        "dualpipe-mirror-grads-not-summed", "megadual/pipeline/driver.py",
        "lambda flat: flat + self.from_mirror(flat))",
        "lambda flat: flat + 0 * self.from_mirror(flat))",
        ("tests/test_parallel_pp.py::test_pipeline_matches_one_process[PP4-dualpipe]",),
        "DualPipe's two copies of a stage keep their own gradients instead of their sum"),
    Mutation("mtp-shared-embedding-grad-lost-under-dualpipe", "megadual/pipeline/stage_model.py",
        "mtp_embed=embedder.embed if embedder else None)",
        "mtp_embed=(lambda tokens: embedder.embed(tokens).detach()) if embedder else None)",
        ("tests/test_parallel_mtp.py::test_mtp_matches_one_process[D1-PP2-dualpipexEP2xDP2]",),
        "under DualPipe the MTP's gradient never reaches the embedding it shares with the other copy's first stage"),
    Mutation("mtp-tied-embedding-grad-not-summed", "megadual/pipeline/driver.py",
        "grad += self._exchange(grad, self.embedding_twin)",
        "self._exchange(grad, self.embedding_twin)",
        ("tests/test_parallel_mtp.py::test_mtp_matches_one_process[D2-PP2-1f1bxTP2-SP]",),
        "under 1F1B the last stage's tied embedding (MTP's) and the first stage's keep their own gradients"),
    Mutation(
        "paired-compute-ignores-links", "megadual/pipeline/simulate.py",
        "return max(compute, forward.comm_f + backward.comm_b)",
        "return compute",
        ("tests/test_simulate.py::test_communication_is_exposed_alone_and_hidden_in_a_paired_chunk",),
        "the simulator's paired F&B never waits for links slower than its compute"),
    Mutation(
        "interleaved-chunks-round-robin", "megadual/pipeline/schedules.py",
        "        return (k // pp_size) % chunks\n",
        "        return k % chunks\n",
        ("tests/test_schedules.py::test_interleaved_follows_megatrons_order_and_runs[plain-split-4-2-8]",),
        "interleaved 1F1B moves every forward to the next chunk instead of groups of PP micro-batches"),
    Mutation(
        "overlap-pairs-a-micro-batch-with-itself", "megadual/pipeline/schedules.py",
        "warmup = min(warmup + int(overlap), total)",
        "warmup = min(warmup, total)",
        ("tests/test_schedules.py::test_overlapped_1f1b_pairs_each_steady_forward_with_an_earlier_backward[2-4]",
         "tests/test_schedules.py::test_interleaved_follows_megatrons_order_and_runs[overlap-split-2-2-2]"),
        "--overlap-moe-expert-parallel-comm warms up no extra forward: a last stage pairs one micro-batch's "
        "forward with its own backward"),
    Mutation(
        "check-allows-self-pair", "megadual/pipeline/schedules.py",
        "if action.backward_of not in forwards or action.backward_of == action.forward_of:",
        "if action.backward_of not in forwards:",
        ("tests/test_schedules.py::test_check_refuses_a_pair_of_one_micro_batchs_forward_and_backward",),
        "the schedule check accepts a paired F&B of one micro-batch's forward and its own backward"),
    Mutation(
        "hops-share-no-link", "megadual/pipeline/hops.py",
        "self.link_free = max(self.clock - lead, self.link_free) + seconds",
        "self.link_free = self.clock - lead + seconds",
        ("tests/test_simulate.py::test_a_paired_chunk_at_hop_level_shows_the_hops_that_outlast_their_step",),
        "the hop-level simulator lets a rank's hops travel at once instead of queueing on its link"),
    Mutation(
        "pairs-timed-at-chunk-level", "megadual/pipeline/simulate.py",
        "if forward.hops_f is None or backward.hops_b is None:",
        "if True:",
        ("tests/test_simulate.py::test_the_simulator_times_a_pair_hop_by_hop_where_the_pieces_are_given",),
        "the simulator times a paired F&B by its chunk totals though its hops are given"),
    Mutation(
        "paired-forward-without-autocast", "megadual/pipeline/runtime.py",
        "lambda: self.backward(action.b_chunk, action.b_mb, split=False), self.autocast,",
        "lambda: self.backward(action.b_chunk, action.b_mb, split=False), nullcontext,",
        ("tests/test_oracles_bf16.py::test_every_gemm_of_paired_chunks_and_recomputed_regions_runs_in_bf16",
         "tests/test_dist_optimizer.py::test_bf16_layouts_agree_with_one_process_and_dualpipe_with_1f1b"),
        "the forward of a paired F&B chunk runs without autocast under --bf16"),
    # issue 22 (s3-bench)
    Mutation(
        "hops-forward-ignores-its-own-hops", "megadual/pipeline/hops.py",
        "rank.piece(forward.compute[step], forward.lag_of(step - 1) if step else 0.0, forward_ready,",
        "rank.piece(forward.compute[step], forward.lag_of(step - 1) if step else 0.0, 0.0,",
        ("tests/test_simulate.py::test_a_paired_chunk_at_hop_level_shows_the_hops_that_outlast_their_step",),
        "the hop-level simulator never lets a pair's forward wait for its own all-to-all hops"),
    Mutation(
        "hop-lead-ignored", "megadual/pipeline/hops.py",
        "self.link_free = max(self.clock - lead, self.link_free) + seconds",
        "self.link_free = max(self.clock, self.link_free) + seconds",
        ("tests/test_simulate.py::test_a_hop_launched_before_its_piece_ends_overlaps_the_rest_of_the_piece",),
        "the hop-level simulator launches each hop at the end of its piece, hiding nothing behind the shared expert"),
    Mutation(
        "hop-lag-ignored", "megadual/pipeline/hops.py",
        "        waits = [(min(lag, seconds), ready)]\n",
        "        waits = [(0.0, ready)]\n",
        ("tests/test_simulate.py::test_a_hop_launched_before_its_piece_ends_overlaps_the_rest_of_the_piece",),
        "the hop-level simulator waits for a hop before any of the next piece, though a backward computes "
        "other branches first"),
    # issue 22 (sim* within 5%)
    Mutation(
        "hop-drain-ignored", "megadual/pipeline/hops.py",
        "self.clock = max(self.clock, self.link_free if until is None else until)",
        "self.clock = max(self.clock, 0.0 if until is None else until)",
        ("tests/test_simulate.py::test_a_piece_that_exchanges_token_counts_waits_for_its_link_to_drain",),
        "the hop-level simulator lets a dispatch's token counts pass the hops queued on the link"),
]
