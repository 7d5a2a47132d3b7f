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


# -- the one direction imports go ----------------------------------------------------------
# specs' tables, schemas and invariants are the ground floor (they import nothing of ours);
# core builds on them; specs' tools (checker, diagrams) drive core; transports carry what
# core asks; adapters bind everything.  Nothing imports upwards.
ALLOWED = {
    "specs": {"specs", "core"},
    "core": {"core", "specs"},
    "transports": {"transports", "core", "specs"},
    "adapters": {"adapters", "transports", "core", "specs"},
}
GROUND_FLOOR = ("tables.py", "schemas.py", "invariants.py")


def _package_modules():
    for layer in ALLOWED:
        for path in sorted((ROOT / layer).rglob("*.py")):
            yield layer, path


def _embxfer_imports(path):
    """The embxfer layers a module imports, absolute or relative."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("embxfer."):
                    yield alias.name.split(".")[1]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("embxfer."):
                yield node.module.split(".")[1]
            elif node.level > 0:
                parts = package[:len(package) - node.level + 1]
                yield parts[0] if parts else "?"


@pytest.mark.parametrize("layer,path", list(_package_modules()), ids=lambda p: getattr(p, "name", p))
def test_imports_go_one_way(layer, path):
    found = set(_embxfer_imports(path))
    assert found <= ALLOWED[layer], f"{path.relative_to(ROOT)} imports {sorted(found - ALLOWED[layer])}"
    if layer == "specs" and path.name in GROUND_FLOOR:
        assert found <= {"specs"}, f"{path.name} is the ground floor but imports {sorted(found)}"


def test_specs_import_nothing_from_adapters_or_transports_at_run_time():
    import subprocess
    import sys

    code = ("import sys, embxfer.specs, embxfer.specs.checker, embxfer.specs.diagrams;"
            "print(sorted(m for m in sys.modules if m.startswith(('embxfer.adapters', 'embxfer.transports'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- messages are built by the core only -----------------------------------------------------
def _message_names():
    from embxfer.core._messages import MESSAGE_TYPES

    return set(MESSAGE_TYPES) | {"AuxHeader"}


@pytest.mark.parametrize("layer,path", [(layer, path) for layer, path in _package_modules() if layer != "core"],
                         ids=lambda p: getattr(p, "name", p))
def test_no_module_outside_core_constructs_a_protocol_message(layer, path):
    """Drivers move bytes and call the core: every message they send comes from the core's
    actions or its ``register_message`` / ``pool_layout_message``, never a constructor."""
    names = _message_names()
    tree = ast.parse(path.read_text())
    built = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in names:
                built.append(f"{name} at line {node.lineno}")
    assert not built, f"{path.relative_to(ROOT)} constructs {built}"


def test_the_message_check_can_fail(tmp_path):
    """The scan above sees a constructor call, by name and through a module attribute."""
    names = _message_names()
    source = "from embxfer.core import Registered\nimport embxfer.core as c\nRegistered(1, 1, '', '')\nc.Abort(1, 0, 'x')\n"
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)]
    found = [(c.func.id if isinstance(c.func, ast.Name) else c.func.attr) for c in calls]
    assert set(found) <= names and len(found) == 2
