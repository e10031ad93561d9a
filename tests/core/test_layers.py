"""The package's layers: each subpackage imports only lower layers (never a higher one, never
a sibling of the same rank), no package code locates the checkout, and the public API is whole."""
import ast
from pathlib import Path

import pytest

import zmagic_core

PACKAGE = Path(zmagic_core.__file__).resolve().parent
# lowest first; packages of the same rank never import each other
RANKS = {"contracts": 0, "files": 1, "method": 2, "models": 3, "sampling": 3, "plugins": 4, "assembly": 5, "app": 6}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else ""


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every zmagic_core import, leaving out `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("zmagic_core"):
            names = [node.module + "." + a.name for a in node.names] if node.module == "zmagic_core" else [node.module]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "<relative import>"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("zmagic_core")]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    source = "zmagic_core." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    own = layer_of(source)
    for line, target in imports(path):
        assert target != "<relative import>", f"{path}:{line}: use absolute zmagic_core imports"
        theirs = layer_of(target)
        if not own or not theirs or own == theirs:  # the public API module, testing.py; same package
            continue
        assert RANKS[theirs] < RANKS[own], f"{source} (layer {own}) imports {target} (layer {theirs}) at line {line}"


def test_every_layer_is_in_the_listing():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == set(RANKS)


def test_no_package_code_locates_the_checkout():
    for path in MODULES:
        text = path.read_text()
        assert ".parents[" not in text and "git rev-parse" not in text, path


def test_public_api_resolves():
    assert len(set(zmagic_core.__all__)) == len(zmagic_core.__all__)
    for name in zmagic_core.__all__:
        assert getattr(zmagic_core, name) is not None, name
    from zmagic_core import Energy, GuidanceStep, hookimpl  # what a plugin author imports
    from zmagic_core.contracts.components import Energy as Inner

    assert Energy is Inner and callable(hookimpl) and GuidanceStep.__name__ == "GuidanceStep"


def test_plugins_and_examples_use_only_the_public_api():
    root = PACKAGE.parent
    if not (root / "plugins").is_dir():
        pytest.skip("not an editable checkout: the plugins are not beside the package")
    checked = 0
    for base in [*root.glob("plugins/*/zmagic_*"), root / "examples"]:
        for path in base.rglob("*.py"):
            checked += 1
            for line, target in imports(path):
                assert target.startswith("zmagic_core.") and target.count(".") == 1 or target == "<relative import>", \
                    f"{path}:{line} imports {target}; plugins import only `from zmagic_core import ...`"
    assert checked >= 20  # the five plugins and the example were found
