"""The notebooks run top to bottom on CPU with their tiny setting, and are committed without outputs.

Each notebook's source is a jupytext percent-format file, notebooks/<name>.py, paired with the
notebooks/<name>.ipynb that Colab opens (edit the .py, then ``jupytext --sync notebooks/*.py``).
The committed .ipynb must be stripped and hold the same cells as its .py. Each .ipynb is executed
with papermill in a fresh "python3" kernel started in the repository root, with ``TINY = True``
and a temporary WORKDIR / COMPILE_CACHE_DIR injected after the cell tagged "parameters".
"""

import glob
import os
import time

import jupytext
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.py")))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 600


def execute(name, tmp_path, monkeypatch, **params):
    """Run notebooks/<name> with papermill, TINY = True (+ params); returns (notebook, all text output)."""
    import papermill

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits this environment
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    t0 = time.time()
    # raises PapermillExecutionError (with the cell and traceback) if a cell fails
    nb = papermill.execute_notebook(
        os.path.join(ROOT, "notebooks", name), str(tmp_path / name), parameters={"TINY": True, **params},
        kernel_name="python3", cwd=ROOT,  # the kernel's cwd: the repository root
        execution_timeout=CELL_TIMEOUT_S, progress_bar=False)
    print(f"{name}: {time.time() - t0:.1f} s")
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    injected = [i for i, t in enumerate(tags) if "injected-parameters" in t]
    assert len(injected) == 1 and "parameters" in tags[injected[0] - 1], "parameters not injected after their cell"
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                text.append(out.get("data", {}).get("text/plain", ""))
    return nb, "".join(text)


def images(nb):
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


def test_notebooks_exist():
    for names in ({os.path.basename(p) for p in NOTEBOOKS}, {os.path.basename(p) for p in SOURCES}):
        assert {"quickstart", "pretrained"} <= {os.path.splitext(n)[0] for n in names}
    assert [os.path.splitext(p)[0] for p in SOURCES] == [os.path.splitext(p)[0] for p in NOTEBOOKS], \
        "every notebooks/*.py needs its paired .ipynb and vice versa: jupytext --sync notebooks/*.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_notebooks_have_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"cell {i} has an execution count: strip it"
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", SOURCES, ids=os.path.basename)
def test_committed_notebooks_match_their_py_source(path):
    """The .py is the source; a .ipynb that drifted from it would silently run other code on Colab."""
    src = jupytext.read(path)
    nb = jupytext.read(os.path.splitext(path)[0] + ".ipynb")
    hint = f"{os.path.relpath(path, ROOT)} and its .ipynb differ: run jupytext --sync notebooks/*.py"
    assert src.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    for key, value in src.metadata.items():  # kernelspec, colab, accelerator: what Colab and Jupyter read
        if key != "jupytext":
            assert nb.metadata.get(key) == value, f"{hint} (metadata {key!r})"
    assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", f"{hint} (not paired)"

    def cells(notebook):
        return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in notebook.cells]

    assert cells(nb) == cells(src), hint
    assert sum("parameters" in tags for *_, tags in cells(src)) == 1


@pytest.mark.slow
def test_quickstart_runs_tiny(tmp_path, monkeypatch):
    nb, text = execute("quickstart.ipynb", tmp_path, monkeypatch, WORKDIR=str(tmp_path / "work"),
                       COMPILE_CACHE_DIR=str(tmp_path / "xla"))
    assert "TINY=True: network 'tiny'" in text
    assert "CpuDevice" in text  # the devices cell printed jax.devices()
    assert "a*b2*g2" in text and "val_top1" in text  # the grid search's results table
    assert "winner: alpha=" in text
    assert "MACs/phi0" in text and "(ab2g2)^phi" in text  # the scaled models' params / MACs
    assert "done: " in text and "status ok" in text  # trainer.summary_line of the scaled model
    assert images(nb) >= 3  # grid.png, accuracy_vs_macs.png, the notebook's own plot
    for name in ("study.journal", "best.json", "grid.png", "accuracy_vs_macs.png", "notebook_accuracy_vs_macs.png"):
        assert (tmp_path / "work" / name).exists(), name
    assert (tmp_path / "work" / "scaled_phi1" / "result.json").exists()  # TINY trains phi = 1


@pytest.mark.slow
def test_pretrained_runs_tiny(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    nb, text = execute("pretrained.ipynb", tmp_path, monkeypatch, WORKDIR=str(tmp_path / "work"))
    assert "max |ours - timm|" in text
    assert "reloaded logits equal: True" in text
    assert images(nb) >= 1  # the (synthetic) image
    assert (tmp_path / "work" / "tf_efficientnet_b0.safetensors").exists()
