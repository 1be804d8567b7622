"""The planner: memory per rank and layouts that fit, before launch (`python -m megadual.plan`).

tensor_bytes.py holds the primitives (precisions, a micro-batch's shape, activations adding up);
memory_model.py counts what one micro-batch of each layer keeps and walks a schedule's peak; rank_memory.py
walks a rank's schedule with it and adds parameters, gradients and optimizer state;
layout_search.py ranks the layouts that fit N GPUs; check.py pairs predictions with the memory
report of real runs (the tests and scripts/bench_memory.py); __main__.py is the command line.
"""
