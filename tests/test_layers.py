"""The floor plan, checked: every import points down the layers, the contract imports no torch, and
Triton model code imports only the contract and its engine's runtime.

    front     clfpipe.cli, clfpipe.pipeline, clfpipe.demo_data
    stages    clfpipe.train | clfpipe.export | clfpipe.serve   (never each other)
    runtime   clfpipe.runtime   (one module per engine runtime)
    nn        clfpipe.nn        (the torch half: model, transforms, TTA, folded graph, reference)
    contract  clfpipe.contract  (no torch)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# where each installed package's source lives (pyproject's package-dir)
SOURCES = {"clfpipe": ROOT / "clfpipe", "clfpipe.train": ROOT / "train", "clfpipe.export": ROOT / "export",
           "clfpipe.serve": ROOT / "serve", "clfpipe.model_repository": ROOT / "model_repository"}
# model_repository: the Triton model files the serve stage copies (its __init__ only names their folder)
RANKS = {"contract": 0, "nn": 1, "runtime": 2, "model_repository": 2, "train": 3, "export": 3, "serve": 3, "front": 4}
FRONT = {"clfpipe", "clfpipe.cli", "clfpipe.pipeline", "clfpipe.demo_data", "clfpipe.__main__"}
HEAVY = ("torch", "torchvision", "onnxruntime", "onnx", "tensorrt", "tritonclient", "polygraphy")


def layer(module: str) -> str:
    if module in FRONT:
        return "front"
    return module.split(".")[1]


def modules() -> dict[str, Path]:
    """Every importable module of the installed package (model.py templates are not modules)."""
    found = {}
    for package, root in SOURCES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            if package == "clfpipe.model_repository" and len(rel.parts) > 1:
                continue  # <model>/model.py: Triton's files, checked below
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts]) if parts else package
            if package == "clfpipe" and rel.parts[0] in ("train", "export", "serve"):
                continue
            found[name] = path
    return found


def imports(path: Path) -> list[str]:
    """Every module an import statement names, at any depth (lazy imports count)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_the_package_is_found():
    found = modules()
    assert {"clfpipe.contract.engines", "clfpipe.train.loop", "clfpipe.export.verify", "clfpipe.serve.server",
            "clfpipe.nn.models", "clfpipe.runtime.ort", "clfpipe.cli"} <= set(found)


def violations(name: str, path: Path) -> list[str]:
    """Imports of `name` (at `path`) that run upward, across stages, or to a generic top-level name."""
    src, wrong = layer(name), []
    for target in imports(path):
        if target.split(".")[0] in ("train", "export", "serve", "model_repository"):
            wrong.append(f"{name} imports the generic top-level name {target!r}")
        if not target.startswith("clfpipe.") or target == "clfpipe":
            continue
        dst = layer(target)
        if dst != src and RANKS[dst] >= RANKS[src]:
            wrong.append(f"{name} ({src}) imports {target} ({dst})")
    return wrong


def test_no_import_runs_upward_or_across_stages():
    wrong = [line for name, path in modules().items() for line in violations(name, path)]
    assert not wrong, "\n".join(wrong)


def test_the_contract_imports_no_torch_or_runtime():
    for name, path in modules().items():
        if layer(name) == "contract":
            heavy = [t for t in imports(path) if t.split(".")[0] in HEAVY]
            assert not heavy, f"{name} imports {heavy}"
    code = ("import sys, pkgutil, importlib, clfpipe.contract as c\n"
            "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('clfpipe.contract.' + m.name)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'torchvision', 'onnxruntime', 'tensorrt'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("model", sorted(p.parent.name for p in (ROOT / "model_repository").glob("*/model.py")))
def test_triton_model_code_imports_only_the_contract_and_a_runtime(model):
    path = ROOT / "model_repository" / model / "model.py"
    ours = [t for t in imports(path) if t.startswith("clfpipe.")]  # clfpipe_<name>: the container's shipped copies
    assert ours and all(t.startswith(("clfpipe.contract", "clfpipe.runtime")) for t in ours), ours


def test_the_onnx_runtime_stub_loads_no_torch():
    """What backbone/model.py imports at the top and on its ONNX Runtime path, in a fresh
    interpreter: ONNX Runtime, never torch (the torch engines' runtime is imported only for them)."""
    path = ROOT / "model_repository" / "backbone" / "model.py"
    top = [t for node in ast.parse(path.read_text()).body if isinstance(node, ast.ImportFrom) and (t := node.module)
           and t.startswith("clfpipe")]
    assert "clfpipe.runtime.ort" in imports(path) and "clfpipe.runtime.torch_engine" not in top
    code = "import sys\n" + "".join(f"import {t}\n" for t in [*top, "clfpipe.runtime.ort"]) \
        + "print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False True"


def test_a_violation_is_caught(tmp_path):
    """The checker itself: upward, sideways and generic imports are reported, downward ones are not."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom clfpipe.contract import tensors\n\n\ndef f():\n    from clfpipe.train.loop import train_run\n"
                   "    from clfpipe.export import verify\n    import serve.client\n")
    assert violations("clfpipe.contract.bad", bad) == [
        "clfpipe.contract.bad (contract) imports clfpipe.train.loop (train)",
        "clfpipe.contract.bad (contract) imports clfpipe.export (export)",
        "clfpipe.contract.bad imports the generic top-level name 'serve.client'",
    ]
    assert violations("clfpipe.train.bad", bad) == [
        "clfpipe.train.bad (train) imports clfpipe.export (export)",
        "clfpipe.train.bad imports the generic top-level name 'serve.client'",
    ]
    assert violations("clfpipe.cli", bad) == ["clfpipe.cli imports the generic top-level name 'serve.client'"]
