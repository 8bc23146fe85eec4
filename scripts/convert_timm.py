"""Convert a timm EfficientNet checkpoint to effnet_jax's weights file.

    python scripts/convert_timm.py tf_efficientnet_b0.safetensors weights/b0.safetensors
    python scripts/convert_timm.py pytorch_model.bin weights/b3.safetensors --arch b3

Why: training configs start from ``model.init_from=PATH``, which reads our format
(``pretrained.load_weights``), not timm's. The architecture and class count are
inferred from the tensor shapes unless given; the script prints what it inferred
and the parameter count. ``.pth``/``.bin`` inputs need torch and are read with
``torch.load(weights_only=True)``; ``.safetensors`` inputs need no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flax import nnx  # noqa: E402

from effnet_jax import pretrained  # noqa: E402
from effnet_jax.errors import UserError, exit_on_user_error  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="timm checkpoint: .safetensors, .pth, .pt or .bin")
    p.add_argument("output", help="our weights file to write (.safetensors)")
    p.add_argument("--arch", default=None,
                   help='"b0".."b8", "l2" or "tf_efficientnet_b3"; default: inferred from the shapes')
    p.add_argument("--num-classes", type=int, default=None,
                   help="class count; default: the checkpoint's (needed only for a checkpoint without classifier)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.output.endswith(".safetensors"):
        raise UserError(f"output must be a .safetensors file, got {args.output}")
    if os.path.exists(args.input) and os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise UserError("output would overwrite the input checkpoint")
    model = pretrained.load_timm(args.input, args.arch, args.num_classes)
    spec = pretrained.spec_for_arch(model.arch)
    arch = model.arch
    params = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    how = "given" if args.arch else "inferred"
    if spec is not None:
        print(f"{how}: {spec.name} (width {spec.width:g}, depth {spec.depth:g}, "
              f"resolution {spec.resolution}, dropout {spec.dropout:g})")
    print(f"{len(arch.blocks)} blocks, stem {arch.stem_channels}, head {arch.head_channels} channels, "
          f"{model.classifier.out_features} classes, {params:,} parameters")
    pretrained.save_weights(model, args.output, spec)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
