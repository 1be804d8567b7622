"""The planner: memory per rank and layouts that fit, before launch (`python -m megadual.plan`).

memory_model.py counts what one micro-batch of each layer keeps, per precision; rank_memory.py
walks a rank's schedule with it and adds parameters, gradients and optimizer state;
layout_search.py ranks the layouts that fit N GPUs; check.py pairs predictions with the memory
report of real runs (the tests and scripts/bench_memory.py); __main__.py is the command line.
"""
