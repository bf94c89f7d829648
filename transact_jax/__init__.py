"""transact-jax: TransAct V2 (arXiv 2506.02267) in JAX/Flax/Pallas."""
__version__ = "0.1.0"
__all__ = ["FeatureConfig", "SelectionConfig", "__version__"]


def __getattr__(name: str):
    # FeatureConfig and SelectionConfig load on first use: importing the package alone (as
    # ``python -m transact_jax --help`` does) must not import jax.
    if name in ("FeatureConfig", "SelectionConfig"):
        from transact_jax import config
        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
