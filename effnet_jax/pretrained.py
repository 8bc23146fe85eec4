"""Pretrained weights, one import: timm checkpoints (``timm_weights``) and our weight files
(``weight_files``).

    from effnet_jax.pretrained import load_timm, save_weights, load_weights
"""

from effnet_jax.model.spec_inference import spec_for_arch
from effnet_jax.weights.timm_weights import infer_spec, load_timm, read_checkpoint, to_timm_state_dict
from effnet_jax.weights.weight_files import load_weights, load_weights_into, read_metadata, save_weights

__all__ = ["infer_spec", "load_timm", "load_weights", "load_weights_into", "read_checkpoint", "read_metadata",
           "save_weights", "spec_for_arch", "to_timm_state_dict"]
