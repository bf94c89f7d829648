"""The layering rules of the package, checked by walking every module's imports (top-level and
inside functions), and that no source file points at documents outside the repository."""
from __future__ import annotations

import ast
import pathlib
import re
from typing import Dict, List, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# module prefix -> prefixes it must not import
FORBIDDEN = {
    "pallas_kernels": ("transact_jax",),
    "transact_jax.data": ("transact_jax.model", "transact_jax.train", "transact_jax.serving",
                          "transact_jax.run", "transact_jax.eval", "transact_jax.retrieval"),
    "transact_jax.model": ("transact_jax.train", "transact_jax.serving", "transact_jax.run",
                           "transact_jax.retrieval"),
    # sequential retrieval (leave-one-out, SASRec / HSTU): builds on data and model only
    "transact_jax.retrieval": ("transact_jax.train", "transact_jax.serving", "transact_jax.run",
                               "transact_jax.eval"),
    "transact_jax.run": ("transact_jax.train", "transact_jax.serving"),
    "transact_jax.serving": ("transact_jax.train",),
    "transact_jax.train": ("transact_jax.serving",),
    "tests.kernels": ("transact_jax", "tests.helpers"),
}


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path, module: str) -> Set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:      # relative import: resolve against the package
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names)
    return out


def _sources(*tops: str, root: pathlib.Path = ROOT) -> List[pathlib.Path]:
    return [p for top in tops for p in sorted((root / top).rglob("*.py"))]


def _violations(root: pathlib.Path = ROOT) -> Dict[str, List[str]]:
    found: Dict[str, List[str]] = {}
    for path in _sources("pallas_kernels", "transact_jax", "tests/kernels", root=root):
        module = _module_name(path, root)
        for prefix, banned in FORBIDDEN.items():
            if module != prefix and not module.startswith(prefix + "."):
                continue
            bad = sorted(name for name in _imports(path, module)
                         if any(name == b or name.startswith(b + ".") for b in banned))
            if bad:
                found[module] = bad
    return found


def test_layering_rules_hold():
    assert _violations() == {}


def test_transact_jax_reaches_kernels_only_through_their_api():
    """Callers use ``pallas_kernels.<op>.api`` (plus shared types: the codec, ``_common``, the
    references' data classes), never a kernel, a vjp or a profiling module directly."""
    internal = re.compile(r"^pallas_kernels\.\w+\.(pallas_triton|vjp|profile)(\.|$)")
    bad = {}
    for path in _sources("transact_jax", "examples"):
        names = sorted(n for n in _imports(path, _module_name(path, ROOT)) if internal.match(n))
        if names:
            bad[str(path.relative_to(ROOT))] = names
    assert bad == {}


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a lazy import inside a function and a relative import are both caught."""
    pkg = tmp_path / "transact_jax" / "serving"
    pkg.mkdir(parents=True)
    (tmp_path / "transact_jax" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("def f():\n    from transact_jax.train import loop\n")
    (pkg / "y.py").write_text("from ..train.step import make_train_step\n")
    (pkg / "z.py").write_text("from transact_jax.run import config\n")   # allowed
    found = _violations(tmp_path)
    assert set(found) == {"transact_jax.serving.x", "transact_jax.serving.y"}


# Built from pieces so that this file does not match itself.
_EXTERNAL_REFS = re.compile("SPEC " + "§" + "|" + r"\bissue [0-9]")


@pytest.mark.parametrize("top", ["pallas_kernels", "transact_jax", "tests", "bench", "examples"])
def test_no_references_to_documents_outside_the_repository(top):
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in _sources(top)
           for i, line in enumerate(p.read_text().splitlines(), 1) if _EXTERNAL_REFS.search(line)]
    assert bad == []
