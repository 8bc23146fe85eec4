"""The one way into Optuna: a study on a durable, shared storage, and what it remembers besides trials.

* **Storage.** ``storage_for`` opens a journal file in the workdir (the default: no server, safe for
  several processes, replayed on restart; a record torn by a crash is cut off first), a journal file
  elsewhere (a shared disk), or any Optuna RDB URL (``sqlite:///...``, ``postgresql://...``), so machines
  without a shared disk share one experiment by running the same command against the same URL. Passwords
  never reach a message (``redact``).
* **Identity.** A study keeps the *identity* of its trials (the trainer config minus cosmetic fields):
  ``open_study`` refuses a rerun with another one, with one line naming the difference, instead of mixing
  the two.
* **``Study``.** Everything the experiments and the queue (``experiments.queue``) do to a study goes
  through its methods, on Optuna's public API only: trials, their attributes and states, the study's own
  attributes, and the one per-device cache of measured latencies (``latencies`` / ``store_latencies``)
  that every experiment planning on time reads, so workers and reruns plan the same models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from effnet_jax.errors import UserError
from effnet_jax.training import rundir

DATA_ATTR = "data"  # the fingerprint of the data the trials read (Study.check_data)
LATENCY_ATTR = "latency"  # the study's user attribute: {device key: {network key: {kind: cost}}}


# ----------------------------------------------------------------------- storage

def storage_for(url: str | None, workdir: str) -> Any:
    """An Optuna storage: a journal file in ``workdir`` by default (``url`` None or empty), else an RDB URL
    or a journal file's path; UserError for a path that names a directory (a journal is a file)."""
    import optuna

    if not url:
        os.makedirs(workdir, exist_ok=True)
        return _journal(os.path.join(workdir, "study.journal"))
    if "://" not in url:  # a path: a journal file, e.g. on a shared (NFS) disk
        if os.path.isdir(url) or url.endswith(("/", os.sep)):
            raise UserError(f"--storage={url} names a directory; a journal storage is a file: give its path (e.g. "
                            f"--storage={os.path.join(url, 'study.journal')}) or an RDB URL (sqlite:///..., "
                            "postgresql://...)")
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        return _journal(url)
    engine_url = url
    if url.startswith("postgresql://") and not _has_module("psycopg2") and _has_module("psycopg"):
        engine_url = "postgresql+psycopg://" + url[len("postgresql://"):]  # SQLAlchemy's psycopg 3 dialect
    try:
        return optuna.storages.RDBStorage(engine_url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as e:
        raise UserError(f"--storage={redact(url)}: missing database driver ({e}); for PostgreSQL: "
                        "pip install -e '.[postgres]'") from None
    except Exception as e:  # sqlalchemy's OperationalError / ArgumentError: a bad URL or no server
        raise UserError(f"--storage={redact(url)}: cannot open the storage: {redact(first_line(e))}") from None


def _journal(path: str) -> Any:
    """Optuna's journal file storage, after cutting off a record torn by a crash mid-write.

    Optuna's reader skips a torn last line, but its next write would be glued onto it and lost
    with it, and every later run would fail: so the torn bytes go (under the journal's own lock,
    while no other process writes). A file that is not a journal is one line saying what to do.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    if os.path.isfile(path) and os.path.getsize(path):
        lock = JournalFileSymlinkLock(path)
        lock.acquire()
        try:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    keep = data.rfind(b"\n") + 1
                    f.truncate(keep)
                    print(f"{path} ended in a record torn by a crash ({len(data) - keep} bytes): removed it",
                          flush=True)
        finally:
            lock.release()
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is not a readable Optuna journal ({first_line(e)}); move it aside and rerun to "
                        "start the study afresh (trial directories with checkpoints resume)") from None


_CREDENTIALS = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s]*:)[^@\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked (postgresql://user:***@host/db)."""
    return _CREDENTIALS.sub(r"\1***@", text)


def first_line(e: BaseException) -> str:
    """'Type: first line of the message': an exception as one line of a log or an error."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------- identity

def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What makes two trials with the same key comparable: the trainer config minus cosmetic fields."""
    d = json.loads(config.to_json_best_effort())
    return {k: v for k, v in d.items() if k not in rundir.COSMETIC_FIELDS}


def differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 5) -> list[str]:
    """'key old -> new' for each field of ``new`` that ``old`` holds otherwise, read as a workdir's config is
    (``rundir.stored_fields``: a field ``old`` predates counts as its default, one ``new`` lacks is read by
    nothing)."""
    a, b = rundir.stored_fields(dict(old)), rundir.config_fields(dict(new))
    return rundir.describe_differences(a, b, [k for k in sorted(b) if k not in a or a[k] != b[k]], limit)


# ------------------------------------------------------------------------- study

class TrialFinished(Exception):
    """The trial was finished by another process meanwhile (it judged the trial's worker dead and queued the
    trial again: that copy runs)."""


@dataclasses.dataclass
class Study:
    """An Optuna study and its storage, reached only through Optuna's public API: the storage's
    ``set_trial_*`` calls address a trial by the id that ``get_trial_id_from_study_id_trial_number`` gives.
    Trial states are named as Optuna names them ("WAITING", "RUNNING", "COMPLETE", "PRUNED", "FAIL")."""

    study: Any  # optuna.Study: only this module touches it
    storage: Any  # optuna.storages.BaseStorage
    study_id: int
    _ids: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def study_name(self) -> str:
        return self.study.study_name

    # trials

    def get_trials(self) -> list[Any]:
        """Every trial (frozen, not copied: read them, change them through this class)."""
        return self.study.get_trials(deepcopy=False)

    def trial_id(self, t: Any) -> int:
        if t.number not in self._ids:
            self._ids[t.number] = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
        return self._ids[t.number]

    def set_attr(self, t: Any, key: str, value: Any) -> None:
        """A user attribute of trial ``t``; TrialFinished if another process finished it meanwhile."""
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            self.storage.set_trial_user_attr(self.trial_id(t), key, value)
        except UpdateFinishedTrialError as e:
            raise TrialFinished(str(e)) from e

    def record_params(self, t: Any, attrs: Mapping[str, Any]) -> None:
        """The finite numbers of ``attrs`` as ``t``'s params, so optuna-dashboard can plot them (labels stay user
        attrs: a categorical param may not change its choices between trials); TrialFinished as ``set_attr``."""
        from optuna.distributions import FloatDistribution
        from optuna.exceptions import UpdateFinishedTrialError

        have = set(t.params)
        for k, v in attrs.items():
            if k in have:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                try:
                    self.storage.set_trial_param(self.trial_id(t), k, float(v),
                                                 FloatDistribution(float(v), float(v)))
                except UpdateFinishedTrialError as e:
                    raise TrialFinished(str(e)) from e

    def set_state(self, t: Any, state: str) -> bool:
        """Move ``t`` to ``state`` (a name); False if another process moved it first (the storage decides)."""
        import optuna

        return self.storage.set_trial_state_values(self.trial_id(t), optuna.trial.TrialState[state])

    def enqueue(self, params: Mapping[str, Any], user_attrs: Mapping[str, Any]) -> None:
        """A WAITING trial with fixed ``params`` and ``user_attrs``, for whichever worker claims it."""
        self.study.enqueue_trial(dict(params), user_attrs=dict(user_attrs))

    def ask(self) -> Any:
        """A new RUNNING trial: a queued retry first (its params fixed), else a point the study's sampler suggests."""
        return self.study.ask()

    def tell(self, t: Any, state: str, value: float | None = None, skip_if_finished: bool = False) -> None:
        """Finish ``t`` in ``state`` (a name), with ``value`` when COMPLETE."""
        import optuna

        self.study.tell(t.number, value if state == "COMPLETE" else None, state=optuna.trial.TrialState[state],
                        skip_if_finished=skip_if_finished)

    # the study's own attributes

    def user_attr(self, name: str) -> Any:
        """The study's user attribute ``name`` (None: unset), as the storage holds it now."""
        return self.study.user_attrs.get(name)

    def set_user_attr(self, name: str, value: Any) -> None:
        self.study.set_user_attr(name, value)

    def check_data(self, fingerprint: Mapping[str, Any] | None, where: str) -> None:
        """Keep the data the study's trials read (a source's ``fingerprint``) and refuse another with one line
        saying what changed: finished trials are reused without the trainer ever seeing the data again, so the
        trainer's own check (``data.json`` in each trial's workdir) cannot stand in for this one."""
        from effnet_jax.data.fingerprint import describe_change

        if not fingerprint:
            return
        stored = self.user_attr(DATA_ATTR)
        if stored is None:
            self.set_user_attr(DATA_ATTR, dict(fingerprint))
        elif changed := describe_change(stored, dict(fingerprint)):
            raise UserError(f"the study in {where} was trained on other data: {changed}; use a new --workdir "
                            "(or --study_name) for this data")

    def latencies(self, device: str) -> dict[str, Any]:
        """{network key: {kind: cost}} measured on ``device`` (``latency.device_key()``) and kept in the study:
        measured once per device kind, whichever experiment, worker or rerun asks first."""
        return dict((self.user_attr(LATENCY_ATTR) or {}).get(device) or {})

    def store_latencies(self, device: str, mine: Mapping[str, Any]) -> None:
        """Keep ``mine`` (``latencies(device)`` and what was measured since) as ``device``'s measurements."""
        stored = dict(self.user_attr(LATENCY_ATTR) or {})
        self.set_user_attr(LATENCY_ATTR, {**stored, device: dict(mine)})


def open_study(storage: Any, name: str, ident: Mapping[str, Any], where: str, sampler: Any = None) -> Study:
    """Create or load the study ``name``; refuse one that was started with another identity."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                sampler=sampler)
    ident = json.loads(json.dumps(ident))  # as stored: tuples become lists
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", ident)
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs["identity"]  # a racing creator's
    diff = differences(stored, ident) if stored != ident else []
    if diff:
        raise UserError(f"study {name!r} in {redact(where)} was started with a different trial config: "
                        f"{'; '.join(diff)}. Use a new --workdir (or --study_name), or rerun with the original "
                        "config")
    return Study(study, storage, storage.get_study_id_from_name(name))


def existing(url: str | None, workdir: str, name: str) -> Study | None:
    """The study ``name`` if it exists already, else None: creates neither a journal nor a study (a reader's
    look, e.g. the progress line's, must leave the experiment's own checks of a workdir first)."""
    import optuna

    if not url and not os.path.exists(os.path.join(workdir, "study.journal")):
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_for(url, workdir)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet
        return None
    return Study(study, storage, storage.get_study_id_from_name(name))
