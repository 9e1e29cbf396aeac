"""The package's layers (docs/extending.md#layout): a module imports only from its own layer or lower ones,
no import circles, no private name imported across files, and the documented API still imports."""
import ast
import graphlib
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "longtail"

# Lowest first. A module's layer is that of its longest matching prefix.
LAYERS = [
    ("foundation", ["errors", "config", "provenance", "checkpoint", "stats"]),
    ("building blocks", ["distributed", "progress", "runtime", "metrics", "losses", "calibration", "priors",
                         "mixing", "lowrank", "finetune", "plots", "task", "data", "models"]),
    ("run services", ["inference", "rundir", "analysis"]),
    ("methods", ["methods"]),
    ("training", ["training"]),
    ("tools", ["predict", "export", "report", "report_html", "jobs", "slurm", "sweep", "reproduce", "engine"]),
    ("entry", ["cli", "__main__"]),
]
LEVEL = {name: level for level, (_, names) in enumerate(LAYERS) for name in names}
MAX_LINES = 450


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")[1:]  # without `longtail`
    if not parts:  # the package's own __init__
        return 0
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LEVEL:
            return LEVEL[key]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py and to docs/extending.md")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, root: Path = PACKAGE.parent) -> list[tuple[str, list[str], int]]:
    """(imported longtail module, names taken from it, line) for every import in the file, those inside
    functions included and those under `if TYPE_CHECKING:` excluded."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, [], child.lineno) for a in child.names if a.name.startswith("longtail"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                if base.startswith("longtail"):
                    names = [a.name for a in child.names]
                    # `from longtail.data import folder` imports a module, not a name
                    modules = [n for n in names if (root / (base + "." + n).replace(".", "/")).with_suffix(".py").exists()
                               or (root / (base + "." + n).replace(".", "/") / "__init__.py").exists()]
                    found.append((base, [n for n in names if n not in modules], child.lineno))
                    found.extend((base + "." + n, [], child.lineno) for n in modules)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(p): {m for m, _, _ in imports(p)} - {module_name(p)} for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_module_imports_a_higher_layer(path):
    me = module_name(path)
    upward = [f"line {line}: {target} ({LAYERS[layer(target)][0]})" for target, _, line in imports(path)
              if layer(target) > layer(me)]
    assert not upward, f"{me} ({LAYERS[layer(me)][0]}) imports from a higher layer: " + "; ".join(upward)


@pytest.mark.parametrize("path", sorted((PACKAGE / "methods").glob("*.py")), ids=lambda p: module_name(p))
def test_methods_import_neither_analysis_nor_plots(path):
    # A cRT or LWS run must not import matplotlib; methods own their diagnostics through `inference`.
    banned = [f"line {line}: {target}" for target, _, line in imports(path)
              if target.split(".")[:2] in (["longtail", "analysis"], ["longtail", "plots"])]
    assert not banned, f"{module_name(path)} imports analysis or plots: " + "; ".join(banned)


def test_nothing_in_the_package_imports_the_engine_facade():
    # longtail.engine only re-exports the documented API for users; the package imports where things live.
    users = sorted(m for m, targets in GRAPH.items() if "longtail.engine" in targets)
    assert not users, f"{users} import longtail.engine; import from the module that holds the name instead"


def test_there_is_no_import_circle():
    try:
        tuple(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle: {' -> '.join(exc.args[1])}")


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_private_name_is_imported_across_files(path):
    private = [f"line {line}: {name} from {target}" for target, names, line in imports(path) for name in names
               if name.startswith("_")]
    assert not private, f"{module_name(path)} imports private names: " + "; ".join(private)


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines (at most {MAX_LINES}): split it by job"


def test_the_checker_sees_upward_imports_inside_functions(tmp_path):
    # The checker itself: an import inside a function counts; one under TYPE_CHECKING does not.
    (tmp_path / "longtail").mkdir()
    source = tmp_path / "longtail" / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from longtail.cli import main\n"
                      "def f():\n    from longtail.sweep import run_sweep\n    from . import _hidden\n")
    assert imports(source, tmp_path) == [("longtail.sweep", ["run_sweep"], 5), ("longtail", ["_hidden"], 6)]


DOCUMENTED_API = [
    ("longtail.config", ["load_config", "Config", "DataConfig"]),
    ("longtail.data", ["build_data", "LTData", "InstanceSampler", "ClassBalancedSampler", "SqrtSampler",
                       "ClassAwareSampler"]),
    ("longtail.models", ["build_model", "load_exported", "register"]),
    ("longtail.losses", ["build_loss", "LOSSES", "MULTILABEL_LOSSES", "LDAMLoss", "CrossEntropyLoss"]),
    ("longtail.engine", ["fit", "evaluate_run", "collect_logits", "load_run"]),
    ("longtail.metrics", ["summarize"]),
    ("longtail.predict", ["Predictor"]),
    ("longtail.methods", ["register_method", "build_method"]),
    ("longtail.methods.base", ["Method"]),
    ("longtail.errors", ["ConfigError", "DivergedError", "LongtailError"]),
]


@pytest.mark.parametrize("module,names", DOCUMENTED_API, ids=[m for m, _ in DOCUMENTED_API])
def test_the_documented_api_imports(module, names):
    loaded = importlib.import_module(module)
    missing = [n for n in names if not hasattr(loaded, n)]
    assert not missing, f"{module} lacks {missing}"
