"""The trainer's command line: ``python -m effnet_jax.train --config=... --workdir=...``.

    python -m effnet_jax.train --config=effnet_jax/configs/digits.py --workdir=runs/digits
    python -m effnet_jax.train --config=effnet_jax/configs/imagenet.py:b3 --workdir=runs/b3 \
        --config.batch_size=1024

Flags and process-wide setup (``jax.distributed``, the persistent compilation cache) live
here and in ``effnet_jax.cli``; the training itself is ``trainer.train_and_evaluate``.

Exit codes: 0 done; 1 training diverged (non-finite loss); 2 a mistake in the flags, config,
data or workdir, or a full / read-only disk (one ``error:`` line on stderr, nothing written
when it is found before training); 130 Ctrl-C (one line saying how to resume).
"""

from __future__ import annotations

import sys
from typing import Any

import jax

from effnet_jax import cli
from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.training import recipe, rundir, trainer


def _define_train_flags(fv: Any) -> None:
    from absl import flags

    flags.DEFINE_bool("restart", False, "delete the workdir's checkpoints, metrics and results first and start "
                      "over (a workdir refuses a changed config otherwise)", flag_values=fv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The CLI: exit 0 done, 1 diverged, 2 a mistake or a full / read-only disk, 130 Ctrl-C (one stderr line)."""
    config, fv = cli.parse_config_flags(sys.argv if argv is None else argv, define_extra=_define_train_flags)
    if not fv.workdir:
        raise UserError("--workdir is required")
    workdir, lead = fv.workdir, jax.process_index() == 0
    prepared = recipe.prepare(config)
    stored = None if fv.restart else rundir.check_resume(config, workdir, prepared.total_steps,
                                                         prepared.steps_per_epoch,
                                                         getattr(prepared.source, "fingerprint", None) or None)
    if stored is not None:
        if lead:
            print(f"{trainer.summary_line(stored)} (already finished; nothing changed)", flush=True)
        return stored
    cli.enable_compile_cache(config.compile_cache_dir)
    result = trainer.train_and_evaluate(config, workdir, prepared=prepared, restart=fv.restart)
    if lead:
        print(trainer.summary_line(result), flush=True)
    if result["status"] == "diverged":
        print(f"error: training diverged at step {result['steps']} (non-finite loss); lower the learning rate",
              file=sys.stderr, flush=True)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
