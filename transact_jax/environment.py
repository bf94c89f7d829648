"""The run environment recorded with every benchmark and ablation result: device and versions."""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Dict

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "torch", "triton")


def environment() -> Dict[str, object]:
    """Device name, platform and count, Python and the versions of the libraries that matter."""
    import jax
    dev = jax.devices()[0]
    out: Dict[str, object] = {
        "device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
        "device_count": jax.device_count(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "machine": platform.machine()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
