"""The import graph reads one way: entry points on top, libraries below, no cycles.

Every ``import`` of an ``effnet_jax`` module counts, module-level or inside a function (a lazy
import is still a dependency); a test that can fail: add ``from effnet_jax import cli`` to
training/trainer.py and it does. Modules are named by their dotted path below the package
(``training.trainer``), so the layer folders are part of the graph.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "effnet_jax")
ENTRY_POINTS = {"cli", "train"}  # flag parsing and process-wide setup live only here
# What each layer folder may import from the others (the model imports no data, training or weights; ...)
LAYERS = {"model": set(), "data": set(), "weights": {"model"}, "training": {"model", "data", "weights"}}


def _modules() -> dict[str, str]:
    """Dotted name below effnet_jax (``training.trainer``) -> file; configs are data, not modules."""
    out = {}
    for folder, dirs, files in os.walk(PKG):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "configs")]
        rel = os.path.relpath(folder, PKG)
        for f in files:
            if f.endswith(".py") and f != "__init__.py":
                parts = ([] if rel == "." else rel.split(os.sep)) + [f[:-3]]
                out[".".join(parts)] = os.path.join(folder, f)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(open(path).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("effnet_jax"):
                base = node.module[len("effnet_jax"):].lstrip(".")
                for a in node.names:  # `from effnet_jax.training import trainer`, `from effnet_jax.model.arch import X`
                    deps.add(f"{base}.{a.name}".lstrip(".") if f"{base}.{a.name}".lstrip(".") in modules else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name[len("effnet_jax."):] for a in node.names if a.name.startswith("effnet_jax.")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_the_graph_sees_the_layer_folders():
    graph = _graph()
    assert {"training.trainer", "model.efficientnet", "data.sources", "weights.weight_files"} <= set(graph)
    assert "model.scaling" in graph["training.trainer"]


def test_no_library_module_imports_the_command_line_layer():
    graph = _graph()
    assert ENTRY_POINTS <= set(graph)
    offenders = {m: sorted(deps & ENTRY_POINTS) for m, deps in graph.items()
                 if m not in ENTRY_POINTS and deps & ENTRY_POINTS}
    assert not offenders, f"library modules import the CLI layer: {offenders}"
    assert "train" not in graph["cli"], "cli is shared by every entry point; it must not import one of them"


def test_layer_folders_import_only_the_layers_below():
    offenders = []
    for m, deps in _graph().items():
        layer = m.split(".")[0]
        if layer not in LAYERS:
            continue
        for d in deps:
            other = d.split(".")[0]
            if other != layer and other in LAYERS and other not in LAYERS[layer]:
                offenders.append(f"{m} imports {d}")
    assert not offenders, offenders


def test_the_trainer_parses_no_flags():
    for path in [p for m, p in _modules().items() if m.startswith("training.")]:
        tree = ast.parse(open(path).read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.startswith(("absl", "argparse", "ml_collections.config_flags"))}, path


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def _experiments() -> tuple[str, ...]:
    """Every module of experiments/ with a ``main``: the experiments, found rather than listed."""
    out = []
    for f in sorted(os.listdir(os.path.join(ROOT, "experiments"))):
        if f.endswith(".py") and f != "__init__.py":
            tree = ast.parse(open(os.path.join(ROOT, "experiments", f)).read())
            if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
                out.append(f[:-3])
    return tuple(out)


def test_the_experiments_are_found():
    assert {"grid_search", "fidelity", "scaling_study", "scale_up"} <= set(_experiments())


def test_no_experiment_imports_another_outside_its_main():
    """The experiments share trials / constraints / strategies / study / queue / workers / report / stats / plots;
    only a ``main`` may hand over to another experiment (``grid_search --then_scale`` runs scale_up)."""
    experiments = _experiments()
    offenders = []
    for name in experiments:
        tree = ast.parse(open(os.path.join(ROOT, "experiments", name + ".py")).read())
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        in_main = {id(x) for m in mains for x in ast.walk(m)}
        for node in ast.walk(tree):
            if id(node) in in_main:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module.split(".")[1]} if node.module.startswith("experiments.") else \
                    {a.name for a in node.names} if node.module == "experiments" else set()
            elif isinstance(node, ast.Import):
                names = {a.name.split(".")[1] for a in node.names if a.name.startswith("experiments.")}
            else:
                continue
            offenders += [f"{name} imports {n}" for n in names & set(experiments) - {name}]
    assert not offenders, offenders
