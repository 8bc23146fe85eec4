# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     name: quickstart.ipynb
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # effnet_jax quickstart: compound scaling, end to end
#
# **Compound scaling** (Tan & Le, *EfficientNet*, ICML 2019) grows a small baseline
# network (B0) in depth, width and input resolution *together*: depth by `alpha**phi`,
# width by `beta**phi`, resolution by `gamma**phi`. The constants are found once, by a
# small grid search at `phi = 1` under the constraint `alpha * beta**2 * gamma**2 ≈ 2`
# (a convolution's FLOPs grow linearly with depth and quadratically with width and
# resolution, so each step of `phi` roughly doubles the cost); bigger models
# (B1..B7) then only change `phi`. The paper found `(alpha, beta, gamma) = (1.2, 1.1, 1.15)`.
#
# This notebook runs that recipe: a small grid search over `(alpha, beta, gamma)`, the
# winner scaled to `phi = 1..3` with parameters and MACs, one scaled model trained
# briefly, and accuracy against MACs. By default it uses the embedded offline dataset
# (scikit-learn's 8x8 digits upsampled to 32 px), so it needs no download; on Colab set
# `DATASET` to a TFDS dataset such as `"cifar10"`.
#
# Outside Colab, install the package first (`pip install -e .` in the repository) and
# start Jupyter from the repository root.

# %%
import os
import shutil
import sys

REPO_URL = "https://github.com/<org>/effnet_jax"  # <- placeholder: the repository to install from
REPO_DIR = "/content/effnet_jax"

if "google.colab" in sys.modules:
    if "<org>" in REPO_URL:
        raise ValueError("set REPO_URL in this cell to the effnet_jax repository first")
    if not os.path.isdir(REPO_DIR):
        # !git clone -q --depth 1 {REPO_URL} {REPO_DIR}
    on_tpu = bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")
                  or os.path.exists("/dev/accel0"))
    extra = "[tpu]" if on_tpu else "[gpu]" if shutil.which("nvidia-smi") else ""
    # %pip install -q -e "{REPO_DIR}{extra}"
    sys.path.insert(0, REPO_DIR)  # a running kernel does not see a fresh editable install
    os.chdir(REPO_DIR)  # experiments/ and the configs are found from the repository root
print("working directory:", os.getcwd())

# %% [markdown]
# ## Parameters
#
# The next cell is tagged `parameters` (papermill-style). `TINY = True` is the CI smoke
# test: the `tiny` network, a two-candidate grid and 2 training steps per model.

# %% tags=["parameters"]
TINY = False                 # True: smoke-test settings (tiny network, 2 candidates, 2 steps)
DATASET = "digits"           # embedded and offline; or a TFDS name such as "cifar10" (downloaded)
NETWORK = "b0"               # the block table scaled: "b0", or "tiny" for smoke tests
BASE_RESOLUTION = 32         # resolution at phi = 0 (the digits are 8x8, upsampled)
BATCH_SIZE = 64              # global batch; sharded over all devices, so divisible by their count
NUM_EPOCHS = 4.0             # training budget of each grid-search trial ...
NUM_TRAIN_STEPS = 0          # ... or a step count (> 0 overrides NUM_EPOCHS)

# The search: a grid of (alpha, beta, gamma) with |alpha * beta**2 * gamma**2 - 2| <= TOLERANCE.
ALPHA = (1.0, 1.4)           # depth multiplier range, inclusive
BETA = (1.0, 1.2)            # width multiplier range
GAMMA = (1.0, 1.3)           # resolution multiplier range
STEP = 0.05                  # grid step: 13 candidates with the ranges above
TOLERANCE = 0.02
INCLUDE_REFERENCES = True    # also train the paper's (1.2, 1.1, 1.15) and the unscaled B0

SCALE_PHIS = (1, 2, 3)       # scale the winner to these phi values (params / MACs only)
TRAIN_PHI = 2                # ... and train this one briefly
TRAIN_EPOCHS = 4.0
TRAIN_STEPS = 0              # > 0 overrides TRAIN_EPOCHS

WORKDIR = "runs/quickstart"  # results, plots, checkpoints; a rerun resumes (use a fresh one after edits)
COMPILE_CACHE_DIR = "~/.cache/effnet_jax/xla"  # jax's persistent compilation cache

# %%
if TINY:  # the CI smoke test: minutes on a 2-core CPU
    NETWORK = "tiny"
    NUM_TRAIN_STEPS = TRAIN_STEPS = 2
    # two grid points that build the same tiny network (one compile), no references
    ALPHA, BETA, GAMMA, TOLERANCE = (1.2, 1.25), (1.05, 1.05), (1.2, 1.2), 0.1
    INCLUDE_REFERENCES = False
    SCALE_PHIS = (1, 2)
    TRAIN_PHI = 1  # the winner's own network: its compiled steps come from the cache
print(f"TINY={TINY}: network {NETWORK!r} on {DATASET!r}, workdir {WORKDIR}")

# %% [markdown]
# ## Devices
#
# On a Colab TPU runtime `jax.devices()` lists the TPU cores (8 on a v2-8 / v3-8). The
# trainer needs nothing extra to use them: it builds a `Mesh` over `jax.devices()`, shards
# every batch over all cores along its leading axis and replicates the parameters, so
# BatchNorm statistics and gradients are computed over the global batch. That is why
# `BATCH_SIZE` must be divisible by the number of devices (8 on a TPU v2-8). On a GPU it
# runs on the one GPU, on CPU on the CPU; nothing in the notebook changes.

# %%
import jax

print(f"jax {jax.__version__}, backend {jax.default_backend()!r}, {jax.device_count()} device(s):")
print(jax.devices())
if BATCH_SIZE % jax.device_count():
    raise ValueError(f"BATCH_SIZE {BATCH_SIZE} is not divisible by the {jax.device_count()} devices")

# %% [markdown]
# ## The search config
#
# `experiments/configs/grid_search.py` is the default: a full trainer config (`train`,
# every trial is it with B0 scaled by one candidate at `phi = 1`) and the search
# (`search`). A TFDS dataset is downloaded and prepared here once (the trainer itself
# never downloads); when that fails (offline) the notebook falls back to the digits.

# %%
import os

from effnet_jax import cli
from experiments import grid_search, search_report
from experiments.configs import grid_search as grid_config
from experiments.constraints import candidates

import socket

NUM_CLASSES = 10
if DATASET != "digits":
    try:
        import tensorflow_datasets as tfds

        builder = tfds.builder(DATASET)
        if not builder.is_prepared():
            # offline: fail now, not after minutes of download retries
            socket.create_connection(("storage.googleapis.com", 443), timeout=5).close()
            builder.download_and_prepare()
        NUM_CLASSES = builder.info.features["label"].num_classes
    except Exception as e:  # offline, unknown name, no tensorflow-datasets ...
        print(f"cannot prepare {DATASET!r} ({type(e).__name__}: {e}); using the embedded digits")
        DATASET = "digits"

config = grid_config.get_config()
t = config.train
t.data.name = DATASET
if DATASET != "digits":
    t.data.holdout_fraction = 0.1  # validate on the last 10% of train: works for any TFDS dataset
t.model.network = NETWORK
t.model.base_resolution = BASE_RESOLUTION
t.batch_size = BATCH_SIZE
t.num_epochs, t.num_train_steps = NUM_EPOCHS, NUM_TRAIN_STEPS
t.compile_cache_dir = COMPILE_CACHE_DIR
cli.enable_compile_cache(COMPILE_CACHE_DIR)  # process-wide: the trainer (a library) sets none itself
s = config.search
s.alpha, s.beta, s.gamma, s.step, s.tolerance = ALPHA, BETA, GAMMA, STEP, TOLERANCE
s.include_paper = s.include_baseline = INCLUDE_REFERENCES

cands = candidates(s)
print(f"{len(cands)} candidates:")
for c in cands:
    print(f"  alpha={c.alpha:.2f} beta={c.beta:.2f} gamma={c.gamma:.2f}  "
          f"alpha*beta^2*gamma^2={c.product:.3f}  {c.label}")

# %% [markdown]
# ## Grid search
#
# Each candidate is trained through the one trainer (`effnet_jax.training.trainer.train_and_evaluate`)
# and scored on the validation split, in successive-halving rungs (the best third goes on
# with more steps and seeds). Results go to `WORKDIR`: `study.journal` (the Optuna study; a
# rerun skips finished trials, `optuna-dashboard WORKDIR/study.journal` shows it live),
# `results.csv`, `best.json` (the winning constants, their interval and verdict, and the
# search config), `grid.png` and `accuracy_vs_macs.png`.

# %%
import json
import time

t0 = time.time()
out = grid_search.search(config, WORKDIR)
print(f"grid search took {time.time() - t0:.0f} s")
print(search_report.format_table(out["summary"], s.metric, out["verdict"]["verdicts"]))
print(out["verdict"]["sentence"])
best = out["best"]
if best is None:
    raise RuntimeError("no constraint-satisfying candidate finished")
BEST_JSON = os.path.join(WORKDIR, "best.json")
if out["learning"].get("learned") is False:
    # best.json says it is no answer (scale_up and model.constants refuse it): TINY's two steps teach nothing.
    # The cells below still show the machinery, on the top-scoring constants written to a file of their own.
    print(f"no answer: {out['learning']['reason']}")
    BEST_JSON = os.path.join(WORKDIR, "top_scoring_constants.json")
    with open(BEST_JSON, "w") as f:
        json.dump({"alpha": best.alpha, "beta": best.beta, "gamma": best.gamma}, f)
print(f"winner: alpha={best.alpha} beta={best.beta} gamma={best.gamma} "
      f"({s.metric} {best.mean:.4f}) -> {BEST_JSON}")

# %%
from IPython.display import Image, display

for name in ("grid.png", "accuracy_vs_macs.png"):
    display(Image(filename=os.path.join(WORKDIR, name)))

# %% [markdown]
# ## Scale the winner to phi = 1..3
#
# `effnet_jax.size_table.formula_rows` builds B0 scaled by the winning constants at each
# `phi` and counts its parameters and MACs without building weights. `MACs/phi0` is the
# measured growth over the baseline, `(ab2g2)^phi` the paper's prediction: they differ
# because depths and channel counts are rounded, and at a few dozen pixels because the
# stride-32 feature maps round up (38 px ends in 2x2 maps where 32 px ends in 1x1). The
# next tables show the same constants at ImageNet size (224 px, 1000 classes) and the
# official B0..B3.

# %%
from effnet_jax import size_table
from effnet_jax.model.scaling import load_constants

constants = load_constants(BEST_JSON)
rows = size_table.formula_rows(constants, SCALE_PHIS, BASE_RESOLUTION, t.model.resolution_multiple,
                            NUM_CLASSES)
print(f"B0 scaled by {constants} from {BASE_RESOLUTION} px, {NUM_CLASSES} classes:")
print(size_table.format_table(rows))
print()
print("the same constants at ImageNet size (224 px, 1000 classes):")
print(size_table.format_table(size_table.formula_rows(constants, (1, 2, 3), 224, 8, 1000)))
print()
print("the official models (the paper's constants, rounded by hand):")
print(size_table.format_table([size_table.describe(n) for n in ("b0", "b1", "b2", "b3")]))

# %% [markdown]
# ## Train one scaled model
#
# The trainer takes the winner through `model.constants` (the `best.json` path) and
# `model.phi`; resolution, width and depth follow from them. The same run from a shell:
#
# ```bash
# python -m effnet_jax.train --config=effnet_jax/configs/digits.py --workdir=runs/phi2 \
#     --config.model.name=formula --config.model.constants=runs/quickstart/best.json \
#     --config.model.phi=2 --config.model.resolution=0
# ```

# %%
import copy

from effnet_jax.training import trainer

cfg = copy.deepcopy(config.train)
cfg.model.name, cfg.model.constants = "formula", os.path.abspath(BEST_JSON)
cfg.model.phi, cfg.model.resolution = float(TRAIN_PHI), 0  # resolution from gamma**phi
cfg.num_epochs, cfg.num_train_steps = TRAIN_EPOCHS, TRAIN_STEPS
scaled = trainer.train_and_evaluate(cfg, os.path.join(WORKDIR, f"scaled_phi{TRAIN_PHI:g}"))
print(trainer.summary_line(scaled))
print(f"{scaled['params']:,} parameters, {scaled['macs'] / 1e6:.1f} MMACs per image")

# %% [markdown]
# ## Accuracy vs MACs
#
# The grid-search candidates (`phi = 1`), the references when trained, and the scaled
# model. With the short default budgets the bigger model is not necessarily better yet:
# train longer (`TRAIN_EPOCHS`) to see the scaling pay off.

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 4))
done = [r for r in out["summary"] if r.mean is not None]
for r in done:
    color = {"paper": "red", "baseline": "gray"}.get(r.label, "C0")
    ax.plot(r.macs / 1e6, r.mean, "o", color=color)
    if r.label:
        ax.annotate(r.label, (r.macs / 1e6, r.mean), xytext=(5, -10),
                    textcoords="offset points", fontsize=8)
ax.plot(best.macs / 1e6, best.mean, "o", mfc="none", mec="k", ms=12, label="winner (phi = 1)")
if scaled.get("val_top1") is not None:
    ax.plot(scaled["macs"] / 1e6, scaled["val_top1"], "*", color="C3", ms=14,
            label=f"winner at phi = {TRAIN_PHI:g}")
ax.set_xscale("log")
ax.set_xlabel("MMACs per image")
ax.set_ylabel(s.metric)
ax.set_title("accuracy vs cost")
ax.legend(fontsize=8)
fig.tight_layout()
path = os.path.join(WORKDIR, "notebook_accuracy_vs_macs.png")
fig.savefig(path, dpi=110)
plt.close(fig)
display(Image(filename=path))

# %% [markdown]
# ## Next
#
# * The same search from a shell: `python -m experiments.grid_search --workdir=runs/grid`
#   (`--config.search.strategy=exhaustive` for one rung, `--storage=postgresql://...` to share
#   it between machines, `--then_scale=1,2,3` to print the scaled models).
# * `python -m experiments.scale_up --constants=runs/grid/best.json --phi=1,2 --train`
#   trains the scaled models.
# * `notebooks/pretrained.ipynb` loads timm's ImageNet weights into this model.
