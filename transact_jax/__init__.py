"""transact-jax: TransAct V2 (arXiv 2506.02267) in JAX/Flax/Pallas."""
from transact_jax.config import FeatureConfig, SelectionConfig

__version__ = "0.1.0"
__all__ = ["FeatureConfig", "SelectionConfig", "__version__"]
