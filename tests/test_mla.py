"""Multi-head latent attention in one process: against DeepSeek's formulation written out in
float64, causality, RoPE on the decoupled channels only, YaRN against its formula, every linear
through the layer's GEMM, and the Hugging Face RoPE row order."""
import math

import pytest
import torch

from megadual.config import ModelConfig
from megadual.model.gpt import build_chunk, full_model_stage
from megadual.model.mla import MultiLatentAttention, half_split_to_interleaved, interleaved_to_half_split
from megadual.model.yarn import yarn_frequencies
from megadual.parallel.linear import linear
from megadual.parallel.params import ParamTable
from megadual.parallel.rng import initialize_parameters
from megadual.parallel.tensor import NO_TP
from tests.helpers import device_under_test

pytestmark = pytest.mark.usefixtures("on_device_under_test")  # made on CUDA under scripts/gpu_check.sh


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device_under_test()).manual_seed(seed)

HEADS, NOPE, ROPE, V, KV_RANK = 4, 8, 6, 10, 12
# YaRN as in DeepSeek-V2-Lite's config, with unequal mscales so that RoPE's magnitude is not 1
CFG = ModelConfig(hidden_size=32, num_attention_heads=HEADS, multi_latent_attention=True, q_lora_rank=20,
                  kv_lora_rank=KV_RANK, qk_head_dim=NOPE, qk_pos_emb_head_dim=ROPE, v_head_dim=V,
                  rope_scaling_factor=40.0, original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=0.707,
                  init_method_std=0.2)
NO_Q_LORA = ModelConfig(**{**CFG.__dict__, "q_lora_rank": 0})


def mla(config: ModelConfig, seed: int = 0, gemm=linear) -> MultiLatentAttention:
    module = MultiLatentAttention(config, NO_TP, gemm)
    initialize_parameters(ParamTable.build(module), seed)
    with torch.no_grad():  # norms away from 1, so a norm left out shows
        for name, p in module.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=seeded(len(name)))
    return module


def deepseek_reference(module: MultiLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's MLA in float64 from the weights in Hugging Face's layout: RoPE as complex
    rotations of interleaved channel pairs, full K and V materialized per head, an explicit mask."""
    c, x = module.config, x.double()
    w = {name: p.detach().double() for name, p in module.named_parameters()}

    def rms(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + c.norm_epsilon) * weight

    def hf_rope_rows(weight, per_head, rope_at):  # our half-split RoPE rows -> interleaved pairs
        rows = weight.view(-1, per_head, weight.shape[-1])
        rope = half_split_to_interleaved(rows[:, rope_at:rope_at + ROPE])
        return torch.cat([rows[:, :rope_at], rope, rows[:, rope_at + ROPE:]], 1).flatten(0, 1)

    s, b, _ = x.shape
    if c.q_lora_rank:
        q = rms(x @ w["q_down.weight"].T, w["q_norm.weight"]) @ hf_rope_rows(w["q_up.weight"], NOPE + ROPE, NOPE).T
    else:
        q = x @ hf_rope_rows(w["q.weight"], NOPE + ROPE, NOPE).T
    q = q.view(s, b, HEADS, NOPE + ROPE)
    kv_a = x @ hf_rope_rows(w["kv_down.weight"], KV_RANK + ROPE, KV_RANK).T
    kv = (rms(kv_a[..., :KV_RANK], w["kv_norm.weight"]) @ w["kv_up.weight"].T).view(s, b, HEADS, NOPE + V)

    def mscale(m):
        return 0.1 * m * math.log(c.rope_scaling_factor) + 1
    frequencies = yarn_frequencies(ROPE, c.rotary_base, c.rope_scaling_factor, c.original_max_position_embeddings,
                                   c.beta_fast, c.beta_slow)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * frequencies
    turn = torch.polar(torch.full_like(angles, mscale(c.mscale) / mscale(c.mscale_all_dim)), angles)

    def rope(t):  # [s, b, ..., ROPE], pairs (2i, 2i + 1)
        pairs = torch.view_as_complex(t.reshape(*t.shape[:-1], ROPE // 2, 2).contiguous())
        return torch.view_as_real(pairs * turn.view(s, 1, *[1] * (t.dim() - 3), ROPE // 2)).flatten(-2)

    q_rope, k_rope = rope(q[..., NOPE:]), rope(kv_a[..., KV_RANK:])
    scale = mscale(c.mscale_all_dim) ** 2 / math.sqrt(NOPE + ROPE)
    future = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    heads = []
    for h in range(HEADS):
        q_h = torch.cat([q[:, :, h, :NOPE], q_rope[:, :, h]], -1)
        k_h = torch.cat([kv[:, :, h, :NOPE], k_rope], -1)  # the same k_R for every head
        scores = torch.einsum("tbd,ubd->btu", q_h, k_h) * scale
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        heads.append(torch.einsum("btu,ubd->tbd", probs, kv[:, :, h, NOPE:]))
    return torch.cat(heads, -1) @ w["proj.weight"].T


@pytest.mark.parametrize("config", [CFG, NO_Q_LORA], ids=["q-lora", "no-q-lora"])
def test_equals_deepseeks_formulation_in_float64(config):
    module = mla(config).double()
    x = torch.randn(10, 2, 32, dtype=torch.float64, generator=seeded(1))
    out = module(x)
    assert out.shape == (10, 2, 32)
    # cos and sin are float32 tables (as in the model): measured 7e-8 of the largest output
    torch.testing.assert_close(out, deepseek_reference(module, x), rtol=4e-7, atol=4e-7 * out.abs().max().item())


def test_parameters_have_hugging_faces_shapes():
    shapes = {name: tuple(p.shape) for name, p in mla(CFG).named_parameters()}
    assert shapes == {"q_down.weight": (20, 32), "q_norm.weight": (20,), "q_up.weight": (HEADS * (NOPE + ROPE), 20),
                      "kv_down.weight": (KV_RANK + ROPE, 32), "kv_norm.weight": (KV_RANK,),
                      "kv_up.weight": (HEADS * (NOPE + V), KV_RANK), "proj.weight": (32, HEADS * V)}
    assert {name for name, _ in mla(NO_Q_LORA).named_parameters()} == {
        "q.weight", "kv_down.weight", "kv_norm.weight", "kv_up.weight", "proj.weight"}


def test_causal():
    module = mla(CFG)
    x = torch.randn(12, 2, 32, generator=seeded(2))
    changed = x.clone()
    changed[7:] += 1.0
    out, out_changed = module(x), module(changed)
    assert torch.equal(out[:7], out_changed[:7])
    assert not torch.allclose(out[7:], out_changed[7:])


def test_positions_enter_through_the_decoupled_rope_channels_only():
    """Without the RoPE channels' weights the layer cannot tell the order of earlier tokens:
    the last token's output is the same for any order of the ones before it."""
    module, plain = mla(CFG).double(), mla(CFG).double()
    with torch.no_grad():
        plain.q_up.weight.view(HEADS, NOPE + ROPE, -1)[:, NOPE:] = 0
        plain.kv_down.weight[KV_RANK:] = 0
    x = torch.randn(9, 1, 32, dtype=torch.float64, generator=seeded(3))
    shuffled = torch.cat([x[:8][torch.randperm(8, generator=seeded(4))], x[8:]])
    torch.testing.assert_close(plain(shuffled)[-1], plain(x)[-1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(module(shuffled)[-1], module(x)[-1], rtol=1e-3)


def test_yarn_frequencies_follow_the_formula():
    """dim 8, base 10000, original context 4096, beta 32 / 1: the pair turning 32 times over the
    context sits at channel 8 ln(4096 / 64 pi) / 2 ln 10000 = 1.31 (floored: 1), the one turning once
    at 2.81 (ceiled: 3); pairs 0-1 keep their frequency, pair 3 is divided by the factor, pair 2 blends."""
    theta = [10000 ** (-2 * i / 8) for i in range(4)]
    expected = [theta[0], theta[1], theta[2] * (0.5 + 0.5 / 40), theta[3] / 40]
    torch.testing.assert_close(yarn_frequencies(8, 10000.0, 40.0, 4096, 32.0, 1.0),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)


def test_softmax_scale_and_rope_magnitude_follow_deepseek_v3_and_v2_lite():
    v3 = MultiLatentAttention(ModelConfig(**{**CFG.__dict__, "mscale": 1.0, "mscale_all_dim": 1.0}), NO_TP)
    assert v3.softmax_scale == pytest.approx((0.1 * math.log(40) + 1) ** 2 / math.sqrt(NOPE + ROPE), rel=1e-15)
    assert v3.rope_magnitude == 1.0
    lite = MultiLatentAttention(CFG, NO_TP)
    assert lite.rope_magnitude == pytest.approx((0.1 * math.log(40) + 1) / (0.0707 * math.log(40) + 1), rel=1e-15)
    unscaled = MultiLatentAttention(ModelConfig(**{**CFG.__dict__, "rope_scaling_factor": 1.0}), NO_TP)
    assert (unscaled.softmax_scale, unscaled.rope_magnitude) == (1 / math.sqrt(NOPE + ROPE), 1.0)


def test_every_linear_runs_through_the_layers_gemm():
    """So FP8 covers every projection, and the W split (its store, passed to the GEMM) every weight."""
    seen = set()

    def gemm(x, weight, wgrad_store=None, cache=None):
        seen.add(id(weight))
        return linear(x, weight, wgrad_store, cache)

    for config in (CFG, NO_Q_LORA):
        module = mla(config, gemm=gemm)
        module(torch.randn(4, 1, 32))
        assert seen >= {id(p) for name, p in module.named_parameters() if "norm" not in name}


def test_rope_row_order_conversions_are_inverse_reshapes():
    rows = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    assert interleaved_to_half_split(rows)[0, :, 0].tolist() == [0, 6, 12, 3, 9, 15]
    assert torch.equal(half_split_to_interleaved(interleaved_to_half_split(rows)), rows)


def test_the_model_uses_mla_when_configured():
    config = ModelConfig(**{**CFG.__dict__, "num_layers": 2, "ffn_hidden_size": 64, "vocab_size": 64,
                            "init_method_std": 0.02})
    chunk = build_chunk(config, full_model_stage(config), seed=1)
    assert all(isinstance(layer.attention, MultiLatentAttention) for layer in chunk.layers.values())
    tokens = torch.randint(0, 64, (2, 10), generator=seeded(5))
    chunk(tokens, tokens).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in chunk.parameters())


def test_attention_runs_sdpas_fused_kernel_with_todays_results():
    """MLA's value head (10) differs from its query/key head (14): the values are padded so that SDPA's
    fused (flash) kernel, which keeps no s x s score matrix, is selectable; restricted to it, forward
    and backward run, and equal the unpadded math path (today's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    module = mla(CFG)
    x = torch.randn(16, 2, CFG.hidden_size, generator=torch.Generator().manual_seed(0))

    def run(backends):
        module.zero_grad()
        x_ = x.clone().requires_grad_()
        with sdpa_kernel(backends):
            out = module(x_)
            out.square().sum().backward()
        return out.detach(), x_.grad, [p.grad.clone() for p in module.parameters()]

    fused = run([SDPBackend.FLASH_ATTENTION])
    q, k, v = (torch.randn(2, HEADS, 16, d) for d in (NOPE + ROPE, NOPE + ROPE, V))
    with pytest.raises(RuntimeError), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # unpadded: no fused kernel
    pad = MultiLatentAttention._core
    try:  # today's: the values as they are, through the math path
        MultiLatentAttention._core = lambda self, q, k, v, samples, allowed=None: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale)
        math_path = run([SDPBackend.MATH])
    finally:
        MultiLatentAttention._core = pad
    for got, want in zip(fused, math_path):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-6)  # measured: 1.4e-6
