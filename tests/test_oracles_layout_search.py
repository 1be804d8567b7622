"""The planner's search space (layout_search.candidates) against its rules written out: which layouts
4 GPUs in nodes of 2 are offered for a 4-layer MoE model and which are refused, and what each
candidate's flags are. The step-time model is tested in test_plan.py."""
import collections
import itertools

from megadual.plan.layout_search import Hardware, candidates
from tests.test_oracles_rank_memory import config

MLA = ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "8",
       "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8"]
RECOMPUTE = {"none": (None, None, None, None), "selective": ("selective", None, None, None),
             "selective+norm+mla": ("selective", ("layernorm", "mla_up_proj", "core_attn"), None, None),
             "full": ("full", None, "uniform", 1)}


def offered(world, hw, *flags):
    """(TP, PP, schedule, overlap, EP, micro-batch, recompute, distributed) of each candidate, counted."""
    found = collections.Counter()
    for c, recompute, distributed in candidates(config(*flags), world, hw):
        p, t = c.parallel, c.train
        assert p.num_virtual_stages_per_pipeline_rank == (2 if p.pipeline_schedule == "interleaved" else None)
        assert p.moe_ranks_per_node == hw.gpus_per_node
        granularity, modules, method, layers = RECOMPUTE[recompute]
        assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == (granularity, method, layers)
        assert modules is None or tuple(t.recompute_modules or ()) == modules, recompute
        found[(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.pipeline_schedule,
               p.overlap_moe_expert_parallel_comm, p.expert_model_parallel_size, t.micro_batch_size, recompute,
               distributed)] += 1
        assert (p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers) == (None, None)  # 4 layers split evenly over every stage count offered
    return found


def expected(world, gpus, recomputes, layers=4, samples=8, experts=8):
    """TP up to a node, TP x PP dividing the world; PP 1 only plain 1F1B; interleaved (V 2) and DualPipeV
    run 2 PP stages, at most one layer each; EP a power of two up to the experts dividing DP x TP;
    the global batch a multiple of micro-batch x DP, DualPipe(V) at least 2 PP micro-batches of it and
    interleaved a multiple of PP (Megatron's rule)."""
    schedules = [("1f1b", False), ("1f1b", True), ("interleaved", False), ("interleaved", True), ("dualpipe", False),
                 ("dualpipev", False)]
    found = collections.Counter()
    for tp, pp, (schedule, overlap), ep, mb, recompute, distributed in itertools.product(
            (1, 2, 4, 8), (1, 2, 4, 8), schedules, (1, 2, 4, 8), (1, 2), recomputes, (False, True)):
        if tp > gpus or world % (tp * pp) or ep > experts:
            continue
        dp = world // (tp * pp)
        stages = pp * (2 if schedule in ("interleaved", "dualpipev") else 1)
        if (pp == 1 and (schedule, overlap) != ("1f1b", False)) or stages > layers or (dp * tp) % ep:
            continue
        micro = samples // (mb * dp)
        if samples % (mb * dp) or (schedule.startswith("dualpipe") and micro < 2 * pp) or \
                (schedule == "interleaved" and micro % pp):
            continue
        found[(tp, pp, schedule, overlap, ep, mb, recompute, distributed)] += 1
    return found


def test_the_search_offers_every_valid_layout_once_and_nothing_else():
    hw = Hardware(gpus_per_node=2)
    assert offered(4, hw) == expected(4, 2, ("none", "selective", "full"))
    # MLA adds DeepSeek-V3's selective recomputation (its up-projections and norms)
    assert offered(4, hw, *MLA) == expected(4, 2, ("none", "selective", "selective+norm+mla", "full"))
    assert offered(2, Hardware(gpus_per_node=1)) == expected(2, 1, ("none", "selective", "full"))
    # a node of 8: TP 4 and 8 (8 heads), PP up to 8 over 8 layers
    assert offered(8, Hardware(), "--num-layers", "8", "--num-attention-heads", "8") == \
        expected(8, 8, ("none", "selective", "full"), layers=8)


def test_uneven_layers_give_the_end_stages_what_an_even_split_leaves():
    """5 layers: 2 stages take 2 and 3; 4 stages (PP 2 interleaved or DualPipeV, PP 4 1F1B) a middle
    ceil(5 / 4) = 2 each, the ends the 1 left over: 0 and 1."""
    for c, _, _ in candidates(config("--num-layers", "5"), 4, Hardware(gpus_per_node=2)):
        p = c.parallel
        stages = p.pipeline_model_parallel_size * (2 if p.pipeline_schedule in ("interleaved", "dualpipev") else 1)
        first_last = {1: (None, None), 2: (2, 3), 4: (0, 1)}[stages]
        assert (p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers) == first_last, p
