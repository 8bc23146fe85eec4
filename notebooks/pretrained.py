# ---
# jupyter:
#   colab:
#     name: pretrained.ipynb
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Pretrained EfficientNet weights from timm
#
# timm's `tf_efficientnet_b*` checkpoints are ports of the official TensorFlow
# weights. `effnet_jax.pretrained.load_timm` builds our Flax NNX `EfficientNet` from one
# (architecture and class count inferred from the tensor shapes), and the two compute the
# same logits. On Colab this notebook downloads the ImageNet weights and classifies a
# photo; offline (and in CI) it uses randomly initialised weights and a synthetic image,
# which still checks the conversion.

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

# %% tags=["parameters"]
TINY = False               # True: smoke-test settings (random weights, synthetic 64 px image)
MODEL_NAME = "tf_efficientnet_b0"
PRETRAINED = None          # None: ImageNet weights on Colab, random weights elsewhere (offline)
IMAGE_URL = "https://upload.wikimedia.org/wikipedia/commons/2/26/YellowLabradorLooking_new.jpg"
IMAGE_SIZE = 0             # 0: the checkpoint's own resolution (224 for B0)
WORKDIR = "runs/pretrained"

# %%
if TINY:
    PRETRAINED, IMAGE_URL, IMAGE_SIZE = False, "", 64
if PRETRAINED is None:
    PRETRAINED = "google.colab" in sys.modules

# %% [markdown]
# Import torch (and timm) **before** anything that may import TensorFlow: importing
# TensorFlow first and then triton (which `torch._dynamo` pulls in) can crash the kernel.

# %%
import timm  # first: see above
import torch

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effnet_jax import eval_view
from effnet_jax.pretrained import load_timm, load_weights, save_weights

print(f"jax {jax.__version__} on {jax.devices()}; torch {torch.__version__}, timm {timm.__version__}")

# %%
torch.manual_seed(0)
tm = timm.create_model(MODEL_NAME, pretrained=PRETRAINED).eval()
if not PRETRAINED:  # random weights: non-trivial BatchNorm statistics make the comparison below mean more
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
cfg = tm.pretrained_cfg
size = IMAGE_SIZE or cfg["input_size"][-1]
print(f"{MODEL_NAME}: pretrained={PRETRAINED}, {size} px, crop_pct {cfg['crop_pct']}, "
      f"{sum(p.numel() for p in tm.parameters()):,} parameters")

# %%
model = load_timm(tm.state_dict())  # architecture and classes inferred from the shapes
ours = eval_view(model)  # inference mode: BatchNorm running statistics, no dropout
print(f"ours: {len(model.arch.blocks)} blocks, {model.classifier.out_features} classes")

# %% [markdown]
# ## An image
#
# timm's evaluation preprocessing: resize the shorter side to `size / crop_pct` (bicubic),
# centre-crop `size`, normalise with ImageNet's mean and std. Our model takes NHWC.

# %%
import io
import urllib.request

from IPython.display import display
from PIL import Image as PILImage

image = None
if IMAGE_URL:
    try:
        req = urllib.request.Request(IMAGE_URL, headers={"User-Agent": "effnet_jax-notebook"})
        with urllib.request.urlopen(req, timeout=20) as f:
            image = PILImage.open(io.BytesIO(f.read())).convert("RGB")
    except OSError as e:
        print(f"cannot fetch {IMAGE_URL} ({e}); using a synthetic image")
if image is None:  # offline: smooth colour gradients with a bright disc
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    disc = ((xx - 0.55) ** 2 + (yy - 0.45) ** 2 < 0.08)[..., None]
    rgb = np.stack([xx, yy, 1 - xx * yy], -1) * 0.6 + disc * 0.4
    image = PILImage.fromarray((rgb * 255).clip(0, 255).astype(np.uint8))

def preprocess(img, size, crop_pct, mean, std):
    scale = size / crop_pct / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), PILImage.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = (np.asarray(img, np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    return x[None]  # (1, size, size, 3)

x = preprocess(image, size, cfg["crop_pct"], cfg["mean"], cfg["std"])
display(image.resize((160, round(160 * image.height / image.width))))
print("input", x.shape, x.dtype)

# %% [markdown]
# ## Same logits as timm

# %%
forward = nnx.jit(lambda m, x: m(x))
with torch.no_grad():
    ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
logits = np.asarray(forward(ours, jnp.asarray(x)))
diff = float(np.abs(logits - ref).max())
print(f"logits {logits.shape}: max |ours - timm| = {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
assert diff < 1e-3 * max(1.0, float(np.abs(ref).max())), diff

# %%
from timm.data import ImageNetInfo

names = ImageNetInfo()
probs = np.asarray(jax.nn.softmax(logits[0]))
if not PRETRAINED:
    print("(random weights: the classes below mean nothing; on Colab PRETRAINED is True)")
for i in np.argsort(probs)[::-1][:5]:
    print(f"{probs[i]:6.1%}  {names.index_to_description(int(i))}")

# %% [markdown]
# ## Save in our format, fine-tune from it
#
# `save_weights` writes a safetensors file whose metadata rebuilds the model;
# `load_weights` reads it back and a training config starts from it with
# `model.init_from` (`scripts/convert_timm.py` does the same from the command line).

# %%
path = os.path.join(WORKDIR, f"{MODEL_NAME}.safetensors")
save_weights(model, path)
again = eval_view(load_weights(path))
same = np.asarray(forward(again, jnp.asarray(x)))
print(f"saved {path} ({os.path.getsize(path) / 1e6:.1f} MB); reloaded logits equal: "
      f"{np.array_equal(same, logits)}")
print(f"fine-tune: python -m effnet_jax.train --config=... --config.model.init_from={path}")
