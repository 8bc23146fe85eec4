"""Which source a config's ``data`` section names: the one place that dispatches on ``data.name``.

Sources build on ``input_pipeline`` (the protocol, array sources, digits); ``idx_source`` (numpy
only) says which names are its own; local image folders go through ``grain_source`` (Grain and PIL,
no TensorFlow); ``tfds_source`` is imported only when a config names a tfds dataset or a remote
folder (``folder:gs://...``): TensorFlow only then. No source module imports this one back.
"""

from __future__ import annotations

from typing import Any

from effnet_jax.data import input_pipeline
from effnet_jax.data.input_pipeline import Source
from effnet_jax.errors import UserError


def create_source(data: Any, resolution: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> Source:
    """A Source for ``data.name``: 'digits', 'idx:DIR' / 'fashion_mnist', a tfds dataset name, or 'folder:PATH'."""
    if global_batch % process_count:
        raise UserError(f"batch size {global_batch} is not divisible by the {process_count} processes")
    if data.name in input_pipeline.EMBEDDED:
        return input_pipeline.digits_source(data, resolution, global_batch, seed, process_index, process_count)
    from effnet_jax.data import idx_source  # MNIST-format files, numpy only

    if idx_source.is_idx_name(data.name):
        return idx_source.idx_source(data, resolution, global_batch, seed, process_index, process_count)
    if data.name.startswith("folder:") and "://" not in data.name:
        from effnet_jax.data import grain_source  # Grain and PIL, no TensorFlow

        return grain_source.folder_source(data, resolution, global_batch, seed, process_index, process_count)
    try:
        from effnet_jax.data import tfds_source  # imports TensorFlow: only on this path
    except ImportError as e:
        if "tfds_source" in str(e):
            raise UserError(f"unknown dataset {data.name!r}: only the embedded {', '.join(input_pipeline.EMBEDDED)} "
                            "is available in this installation") from None
        raise UserError(f"dataset {data.name!r} needs TensorFlow Datasets: pip install -e '.[data]' ({e})") from None
    return tfds_source.create_source(data, resolution, global_batch, seed, process_index, process_count)
