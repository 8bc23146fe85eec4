"""A run's workdir and its checkpoints: claiming the workdir for a config (``claim_workdir``), forking a
longer wsd run from a shorter one's stable state, and restoring the state to resume from (``restore``).

A checkpoint can be damaged without the run knowing (files cut short by an interrupted copy of a workdir, a
file deleted by hand): ``restore`` reads the newest checkpoint, and when it does not restore falls back to
the one before it, with one line on stderr saying so; when none restores it stops with one ``UserError``
line naming the damaged checkpoint. A damaged checkpoint it passed over is renamed ``<step>.damaged`` (the
run saves that step again).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Any

import jax
import ml_collections

from effnet_jax import errors
from effnet_jax.errors import UserError, one_line
from effnet_jax.training import rundir
from effnet_jax.training.recipe import Prepared, TrainState, cooldown_start

DAMAGED = ".damaged"  # a checkpoint that did not restore, renamed: kept for a look, listed by no manager


def claim_workdir(config: ml_collections.ConfigDict, workdir: str, prepared: Prepared, restart: bool,
                  held: contextlib.ExitStack) -> dict[str, Any] | None:
    """Make ``workdir`` this run's (its lock taken into ``held``, cleared with ``restart``) and write its
    config.json; or, when it already holds this run finished, return the stored result and write nothing."""
    lead = jax.process_index() == 0
    total, per_epoch = prepared.total_steps, prepared.steps_per_epoch
    data = getattr(prepared.source, "fingerprint", None) or None  # what the run reads: data.json
    if restart:
        rundir.check_workdir(workdir)
    elif (stored := rundir.check_resume(config, workdir, total, per_epoch, data)) is not None:
        return stored
    if "://" in workdir:
        os.makedirs(workdir, exist_ok=True)
    else:
        rundir.make_workdir(workdir)
    if lead:
        held.enter_context(rundir.locked(workdir))
    if restart:
        if lead:
            rundir.clear_workdir(workdir)
        _sync("effnet_jax restart")  # nobody reads the old checkpoints while process 0 deletes them
    elif (stored := rundir.check_resume(config, workdir, total, per_epoch, data)) is not None:
        return stored  # finished by another run while this one waited for the lock
    elif rundir.forks(config, workdir):
        _fork(config, workdir, total)
    if lead:
        rundir.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
        if data:
            rundir.write_json(os.path.join(workdir, rundir.DATA_FILE), data)
    return None


def _fork(config: ml_collections.ConfigDict, workdir: str, total_steps: int) -> None:
    """Start a longer wsd run where a shorter one of the same config finished: from the shorter run's stable
    checkpoint (``restore``); its checkpoints past that point hold a cooled-down state, not this run's, and go."""
    start = cooldown_start(config, total_steps)
    if not any(s <= start for s in rundir.stable_steps(workdir)):
        raise UserError(f"workdir {workdir} holds a shorter wsd run of this config but no stable checkpoint at or "
                        f"before step {start} to continue from; use a new --workdir or pass --restart to start over")
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    _sync("effnet_jax fork")  # nobody restores a checkpoint while process 0 deletes it


def _sync(name: str) -> None:
    """With several processes, wait until all of them get here."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def restore(config: ml_collections.ConfigDict, workdir: str, state: TrainState, total_steps: int
            ) -> tuple[Any, TrainState, int]:
    """The workdir's checkpoint manager, the state (its latest checkpoint that restores, if any) and the step
    to start at.

    Without a checkpoint of its own, a wsd run starts from the latest stable checkpoint at or before
    its cooldown's start: a shorter wsd run's constant phase, which is this run's too. A damaged
    checkpoint is passed over for the one before it (see the module's docstring)."""
    import orbax.checkpoint as ocp

    ckpt = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
    cool = cooldown_start(config, total_steps)
    own = sorted(ckpt.all_steps(), reverse=True)
    stable = sorted((s for s in rundir.stable_steps(workdir) if s <= cool), reverse=True) if cool else []
    if not own and not stable:
        return ckpt, state, 0
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    damaged: list[tuple[str, str]] = []  # (step directory, why), newest first
    with contextlib.ExitStack() as opened:
        # this run's checkpoints, newest first; then (a wsd run) the stable states of its constant phase
        for folder, steps in (("checkpoints", own), (rundir.STABLE_CHECKPOINTS, stable)):
            if not steps:
                continue
            manager = ckpt if folder == "checkpoints" else \
                opened.enter_context(contextlib.closing(stable_manager(workdir)))
            for step in steps:
                restored, why = _try_restore(manager, step, ocp.args.StandardRestore(abstract))
                if why is not None:
                    damaged.append((os.path.join(workdir, folder, str(step)), why))
                    continue
                if damaged:
                    _set_aside(damaged, ckpt)
                    more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
                    if jax.process_index() == 0:
                        print(f"warning: checkpoint {damaged[0][0]} is damaged ({damaged[0][1]}){more}; moved aside "
                              f"to {os.path.basename(damaged[0][0])}{DAMAGED}, resuming from the "
                              f"{'stable ' if folder != 'checkpoints' else ''}checkpoint of step {step}",
                              file=sys.stderr, flush=True)
                return ckpt, restored, step
    ckpt.close()
    raise UserError(f"checkpoint {damaged[0][0]} is damaged ({damaged[0][1]}) and "
                    + ("so is every earlier one" if len(damaged) > 1 else "there is no earlier one")
                    + "; pass --restart to start over, or use a new --workdir")


def _try_restore(manager: Any, step: int, args: Any) -> tuple[Any, str | None]:
    """(the state, None), or (None, why) when the checkpoint does not restore; a full or unreadable disk raises."""
    try:
        return manager.restore(step, args=args), None
    except Exception as e:  # noqa: BLE001 - whatever a damaged checkpoint raises, an earlier one may do
        if errors.storage_error(e) is not None:  # the disk, not the checkpoint
            raise
        _quiet_orbax_leftovers()
        return None, _reason(e)


# orbax (0.12) leaves the reads of a failed restore's other arrays as suspended coroutines that print a
# traceback when they are collected, whenever that is (at exit at the latest): "Exception ignored in:
# <coroutine object _read_array_index_and_device_put ...>". Nothing is wrong beyond the damage already reported.
_ORBAX_LEFTOVER = "_read_array_index_and_device_put"


def _quiet_orbax_leftovers() -> None:
    """From a failed restore on, drop those coroutines' tracebacks (only theirs: every other unraisable
    exception still reaches the hook that was installed before)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_leftovers", False):
        return

    def hook(unraisable: Any) -> None:
        if getattr(getattr(unraisable.object, "cr_code", None), "co_name", None) != _ORBAX_LEFTOVER:
            previous(unraisable)

    hook.drops_orbax_leftovers = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
    """A restore error's first line, short enough for one line of output."""
    lines = str(e).strip().splitlines()
    text = one_line(f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": "))
    text = text.split(" See full TensorStore details")[0]  # a page of the store's spec follows
    return text if len(text) <= 160 else text[:157] + "..."


def _set_aside(damaged: list[tuple[str, str]], ckpt: Any) -> None:
    """Rename the damaged checkpoints passed over to ``<step>.damaged`` (no manager lists them; --restart
    deletes them with the rest): the run trains and saves those steps again."""
    if jax.process_index() == 0:
        from etils import epath  # orbax's paths: a local disk or a bucket (gs://...)

        for path, _ in damaged:
            aside = epath.Path(path + DAMAGED)
            if aside.exists():  # one from an earlier fallback
                aside.rmtree()
            epath.Path(path).rename(aside)
    _sync("effnet_jax damaged checkpoints")
    ckpt.reload()


def stable_manager(workdir: str) -> Any:
    """The checkpoint manager of ``rundir.STABLE_CHECKPOINTS``: every step kept (one per run length)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, rundir.STABLE_CHECKPOINTS)),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))
