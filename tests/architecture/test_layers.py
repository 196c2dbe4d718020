"""The package's layers import one way (core <- parallel <- backends <- training <- cli), and
TensorFlow is imported only where a model's maths runs in it."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RANKS = {"core": 0, "parallel": 1, "backends": 2, "training": 3, "cli": 4}
TOP = len(RANKS)  # engine/__init__, __main__, demo: the public face, may import any layer


def _imports(path):
    """Every module name imported anywhere in the file (function bodies included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _rank(module_parts):
    return RANKS.get(module_parts[1], TOP) if len(module_parts) > 1 else TOP


def _engine_files():
    return sorted((ROOT / "engine").rglob("*.py"))


def test_every_engine_module_sits_in_a_layer():
    loose = [p.name for p in (ROOT / "engine").glob("*.py")
             if p.name not in ("__init__.py", "__main__.py", "demo.py")]
    assert loose == [], f"modules outside the layer folders: {loose}"


@pytest.mark.parametrize("path", _engine_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers(path):
    own = _rank(path.relative_to(ROOT).with_suffix("").parts)
    upward = [name for name in _imports(path)
              if name.startswith("engine.") and _rank(name.split(".")) > own
              and name.split(".")[1] in RANKS]
    assert upward == [], f"{path.name} (layer rank {own}) imports a higher layer: {upward}"


def test_tensorflow_is_imported_only_by_backends_and_the_keras_zoo():
    # The Keras zoo and the Keras interop import TensorFlow inside their functions only.
    allowed = {ROOT / "models" / "keras_zoo.py", ROOT / "models" / "keras_interop.py"}
    offenders = []
    for path in list(_engine_files()) + sorted((ROOT / "models").rglob("*.py")):
        if "backends" in path.relative_to(ROOT).parts or path in allowed:
            continue
        if any(name == "tensorflow" or name.startswith(("tensorflow.", "keras")) for name in
               _imports(path)):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], f"TensorFlow imported outside engine/backends and the zoo: {offenders}"


def test_test_modules_have_unique_names():
    # tests/ has no packages, so pytest imports test files by basename: two of one name break
    # collection of the whole suite.
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
