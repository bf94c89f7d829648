"""Training: the objective, the jitted data-parallel train step, the loop and evaluation.

Builds on the data layer, the model and the run layer (configs, train state, checkpoints); the
model knows nothing of this package, and serving does not import it.
"""
