"""Shared-memory figures of compiled Pallas (Triton) kernels, for the A10G budget
(``pallas_kernels._common.A10G_SMEM_BYTES``: 101,376 B a block on sm_86).

Two sources, both on the GPU machine:

* sm_90a: XLA compiles each Pallas kernel with its bundled Triton and logs ``Shared memory usage: N B``
  at ``TF_CPP_VMODULE=xtile_compiler=2``. :func:`start_log` (call it before importing jax) turns the
  log on and sends stderr to a file that :func:`new_log_text` reads back after each compile.
* sm_86 (A10G): :func:`capture_ttir` records the Triton IR Pallas emits for each kernel, and
  :func:`sm86_shared` compiles that IR with the ``triton`` package for ``cuda:86`` and returns
  ``metadata.shared``.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import List, Optional

_LOG: Optional[tempfile._TemporaryFileWrapper] = None
_POS = 0
TTIR: List[str] = []


def start_log() -> None:
    global _LOG
    os.environ.setdefault("TF_CPP_VMODULE", "xtile_compiler=2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    _LOG = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    saved = os.dup(2)
    os.dup2(_LOG.fileno(), 2)
    sys.stderr = os.fdopen(saved, "w", buffering=1)


def new_log_text() -> str:
    global _POS
    if _LOG is None:
        return ""
    _LOG.flush()
    with open(_LOG.name) as fh:
        fh.seek(_POS)
        text = fh.read()
        _POS = fh.tell()
    return text


def logged_shared_bytes(text: str) -> List[int]:
    return [int(v) for v in re.findall(r"Shared memory usage: (\d+)", text)]


def capture_ttir() -> None:
    """Record the Triton IR of every Pallas kernel lowered from now on."""
    from jax._src.pallas.triton import pallas_call_registration as reg
    original = reg.lowering.lower_jaxpr_to_triton_module

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        TTIR.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = wrapped


def sm86_shared(ttir: str, num_warps: int, num_stages: int) -> dict:
    """Compile Triton IR with the ``triton`` package for sm_86; its ``shared`` metadata in bytes."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except Exception as exc:  # noqa: BLE001
        return {"error": f"triton not importable: {exc!r}"}
    with tempfile.NamedTemporaryFile("w", suffix=".ttir", delete=False) as fh:
        fh.write(ttir)
        path = fh.name
    try:
        compiled = triton.compile(path, target=GPUTarget("cuda", 86, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        return {"shared_bytes": int(compiled.metadata.shared), "triton": triton.__version__}
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)[:600]}


def measure(compile_fn, num_warps: int, num_stages: int) -> dict:
    """Compile (``compile_fn()``) and return both figures, the maximum over every Pallas kernel it
    lowered (``sm86.per_kernel`` lists each)."""
    new_log_text()
    before = len(TTIR)
    compile_fn()
    logged = logged_shared_bytes(new_log_text())
    row = {"sm90_shared_bytes": max(logged) if logged else None, "sm90_per_kernel": logged}
    per_kernel = [sm86_shared(ir, num_warps, num_stages) for ir in TTIR[before:]]
    if per_kernel:
        sizes = [r["shared_bytes"] for r in per_kernel if "shared_bytes" in r]
        row["sm86"] = dict(per_kernel[-1], per_kernel=per_kernel)
        if len(sizes) == len(per_kernel):
            row["sm86"]["shared_bytes"] = max(sizes)
        else:
            row["sm86"].pop("shared_bytes", None)
            row["sm86"]["error"] = "some kernels did not compile for sm_86"
    return row
