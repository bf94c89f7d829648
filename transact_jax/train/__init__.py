"""Training: configs, the jitted data-parallel train step, orbax checkpoints, the loop and evaluation.

Builds on the data layer and the model; the model knows nothing of this package.
"""
