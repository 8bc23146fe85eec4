"""The import graph reads one way: entry points on top, libraries below, no cycles.

Every ``import`` of an ``effnet_jax`` module counts, module-level or inside a function (a lazy
import is still a dependency); a test that can fail: add ``from effnet_jax import cli`` to
trainer.py and it does.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "effnet_jax")
ENTRY_POINTS = {"cli", "train"}  # flag parsing and process-wide setup live only here


def _graph() -> dict[str, set[str]]:
    modules = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in modules:
        tree = ast.parse(open(os.path.join(PKG, name + ".py")).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "effnet_jax":
                    deps |= {a.name for a in node.names}
                elif node.module.startswith("effnet_jax."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("effnet_jax.")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_library_module_imports_the_command_line_layer():
    graph = _graph()
    assert ENTRY_POINTS <= set(graph)
    offenders = {m: sorted(deps & ENTRY_POINTS) for m, deps in graph.items()
                 if m not in ENTRY_POINTS and deps & ENTRY_POINTS}
    assert not offenders, f"library modules import the CLI layer: {offenders}"
    assert "train" not in graph["cli"], "cli is shared by every entry point; it must not import one of them"


def test_the_trainer_parses_no_flags():
    source = open(os.path.join(PKG, "trainer.py")).read()
    tree = ast.parse(source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.startswith(("absl", "argparse", "ml_collections.config_flags"))}


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


EXPERIMENTS = ("grid_search", "fidelity", "scaling_study", "scale_up")


def test_no_experiment_imports_another_outside_its_main():
    """The experiments share trials / constraints / strategies / runner / report / stats / plots; only a
    ``main`` may hand over to another experiment (``grid_search --then_scale`` runs scale_up)."""
    offenders = []
    for name in EXPERIMENTS:
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
            offenders += [f"{name} imports {n}" for n in names & set(EXPERIMENTS) - {name}]
    assert not offenders, offenders
