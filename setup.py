"""effnet_jax: EfficientNet compound scaling end to end in JAX / Flax NNX."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.4.35",
    "flax>=0.12.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "scikit-learn>=1.3",  # the embedded offline dataset (digits)
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "tensorboard>=2.15",  # event files, written without TensorFlow
    "safetensors>=0.4",
    "optuna>=4.2",  # the experiment layer: studies, durable storages (journal file, SQLite, PostgreSQL)
    "scipy>=1.11",  # t quantiles, Welch's test and rank correlations for the search's verdicts
    "grain>=0.2.18",  # image folders: random-access sources, global shuffles, loader threads/processes
    "pillow>=10.0",  # image folders: decoding, the official crops, RandAugment (matplotlib needs it anyway)
]
DATA = [  # TFDS datasets (and folder:gs://... remote folders) through tf.data; imported lazily, only by that path
    "tensorflow-cpu>=2.16; platform_machine == 'x86_64'",
    "tensorflow>=2.16; platform_machine != 'x86_64'",
    "tensorflow-datasets>=4.9",
    "importlib_resources",  # tfds 4.9.10 imports it without declaring it
]
PEERS = ["torch>=2.4", "torchvision", "timm>=1.0"]  # numerical peer (timm)
POSTGRES = ["psycopg[binary]>=3.1"]  # --storage=postgresql://... (SQLAlchemy's psycopg 3 driver)
TEST = DATA + PEERS + POSTGRES + [
    "pytest>=8", "pytest-xdist>=3", "ruff>=0.6", "nbformat>=5.9", "jupytext>=1.16", "papermill>=2.6", "ipykernel>=6",
]

setup(
    name="effnet_jax",
    version="0.1.0",
    description="EfficientNet compound scaling (Tan & Le 2019) in JAX/Flax NNX: "
    "grid search over alpha, beta, gamma, scaler, trainer",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["effnet_jax", "effnet_jax.*", "experiments", "experiments.*"]),
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "peers": PEERS,
        "postgres": POSTGRES,
        "dashboard": ["optuna-dashboard>=0.16"],
        "test": TEST,
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "License :: OSI Approved :: Apache Software License",
    ],
)
