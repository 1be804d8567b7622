"""FP8 training with fine-grained scales (DeepSeek-V3 recipe).

quant.py        E4M3 quantization: 1x128 tiles, 128x128 blocks, dequantization, MoE dispatch helpers
gemm.py         fp8_gemm and its backends (reference, triton_gemm.py, te_gemm.py)
linear.py       fp8_linear, the FP8 counterpart of megadual.parallel.linear.linear
"""
