"""core/ stays sans-I/O; the four subpackages import under the embxfer namespace."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"torch", "zmq", "threading", "socket", "time", "asyncio", "selectors", "multiprocessing", "datetime"}


@pytest.mark.parametrize("path", sorted((ROOT / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_io(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_core_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, embxfer.core, embxfer.specs; print('torch' in sys.modules, 'zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("name", ["core", "transports", "adapters", "specs"])
def test_subpackages_live_under_embxfer(name):
    module = importlib.import_module(f"embxfer.{name}")
    assert Path(module.__file__).parent.name == name
    assert module.__name__ == f"embxfer.{name}"


def test_public_names_are_exported():
    import embxfer.adapters as adapters
    import embxfer.core as core

    for module in (core, adapters):
        for name in module.__all__:
            assert hasattr(module, name), name
    for name in ("connect_loopback", "EmbeddingData", "Poll"):
        assert name in adapters.__all__
