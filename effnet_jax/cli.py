"""Command-line plumbing shared by every entry point: config flags, multi-host start, process setup.

``parse_config_flags`` turns ``--config=path[:arg]`` / ``--config.x=y`` / ``--workdir`` into a
ConfigDict, with every mistake (a missing or broken config file, an unknown field, named with
the nearest valid ones) as one ``UserError`` line; ``--distributed`` starts ``jax.distributed``.
The library modules (trainer, model, experiments' planners) parse no flags and set no
process-wide state; only the entry points call this module.
"""

from __future__ import annotations

import difflib
import os
import traceback
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from effnet_jax.errors import UserError, one_line


def _module_name(path: str) -> str:
    """'.../experiments/grid_search.py' -> 'experiments.grid_search' (for the usage line)."""
    parts = os.path.normpath(os.path.splitext(path)[0]).split(os.sep)
    return ".".join(parts[-2:]) if len(parts) >= 2 else parts[-1]


def _config_flag_value(argv: list[str]) -> str | None:
    """The value of --config in ``argv`` (``--config=X`` or ``--config X``), None if absent."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        name, eq, rest = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "config":
            value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def _override_spans(argv: list[str]) -> list[tuple[str | None, list[str]]]:
    """``argv[1:]`` as (overridden field path or None, its tokens): --config.a.b=1 / --config.a.b 1 /
    --noconfig.a.b -> 'a.b'; everything from ``--`` on is one span without a path."""
    spans: list[tuple[str | None, list[str]]] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            spans.append((None, argv[i:]))
            break
        name, eq, _ = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name.startswith(("config.", "noconfig.")):
            takes_next = not eq and name.startswith("config.") and i + 1 < len(argv) \
                and not argv[i + 1].startswith("-")
            spans.append((name.split(".", 1)[1], argv[i:i + 2] if takes_next else [arg]))
            i += 2 if takes_next else 1
            continue
        spans.append((None, [arg]))
        i += 1
    return spans


def config_overrides(argv: list[str]) -> list[str]:
    """Dotted field paths that ``argv`` overrides, in order."""
    return [path for path, _ in _override_spans(argv) if path is not None]


def last_override_wins(argv: list[str]) -> list[str]:
    """``argv`` with only the last of repeated ``--config.x`` overrides (absl would concatenate a tuple
    field's values: ``(1.1,1.3)`` then ``(1.2,1.2)`` gave ``(1.1, 1.3, 1.2, 1.2)``)."""
    spans = _override_spans(argv)
    last = {path: k for k, (path, _) in enumerate(spans) if path is not None}
    return argv[:1] + [tok for k, (path, toks) in enumerate(spans) if path is None or last[path] == k for tok in toks]


def field_problem(config: Any, path: str) -> str | None:
    """Why ``path`` ('model.nosuch') is not a field of ``config``, with the nearest valid names; None if it is."""
    node, parents = config, []
    for part in path.split("."):
        key = part.split("[")[0]
        if not hasattr(node, "keys"):
            return f"config field {'.'.join(parents)!r} ({type(node).__name__}) has no field {key!r}"
        keys = list(node.keys())
        if key not in keys:
            prefix = "".join(p + "." for p in parents)
            # the right name at the wrong level (--config.learning_rate for optimizer.learning_rate), a
            # near miss at this level, or failing both the least far-fetched names here
            close = [p for p in _field_paths(config) if p.rsplit(".", 1)[-1] == key][:3]
            close += [prefix + k for k in difflib.get_close_matches(key, keys, n=3)]
            close = close or [prefix + k for k in difflib.get_close_matches(key, keys, n=2, cutoff=0.3)]
            where = f"fields of {prefix[:-1]}" if parents else "top-level fields"
            hint = f"did you mean: {', '.join(close)}?" if close else f"{where}: {', '.join(keys)}"
            return f"unknown config field {prefix + key!r} ({hint})"
        if "[" in part:  # an element of a list or tuple: config_flags says what is wrong
            return None
        node, parents = node[key], [*parents, key]
    return None


def _field_paths(config: Any, prefix: str = "") -> list[str]:
    out = []
    for k in config.keys():
        v = config[k]
        out += _field_paths(v, f"{prefix}{k}.") if hasattr(v, "keys") else [prefix + k]
    return out


def _unknown_field(argv: list[str], default_config: str | None) -> str | None:
    """After a failed parse: the first --config.x override naming no field of the config file, explained."""
    from absl import flags
    from ml_collections import config_flags

    paths = config_overrides(argv)
    if not paths:
        return None
    fv = flags.FlagValues()
    value = _config_flag_value(argv)
    bare = [argv[0], *([f"--config={value}"] if value is not None else [])]  # the config file, no overrides
    config_flags.DEFINE_config_file("config", default_config, "", flag_values=fv, lock_config=False, sys_argv=bare)
    try:
        fv(bare)
        base = fv.config
        base.keys()
    except (flags.Error, SyntaxError, OSError, AttributeError, KeyError, TypeError, ValueError):  # keep the original
        return None
    for path in paths:
        problem = field_problem(base, path)
        if problem:
            return problem
    return None


def _check_config_file(argv: list[str]) -> None:
    """A missing --config file, or a directory, as one line (config_flags defers the error)."""
    value = _config_flag_value(argv)
    if value is None:
        return
    path = value.split(":", 1)[0]
    if not path:
        raise UserError("--config is empty: give a config file, e.g. --config=effnet_jax/configs/digits.py")
    if not os.path.exists(path):
        raise UserError(f"config file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"--config {path} is not a file")


def _config_file_line(e: BaseException, config_arg: str | None) -> str | None:
    """'PATH line N' if ``e`` was raised by the config file's own code (a mistake in it), else None."""
    if not config_arg:
        return None
    path = config_arg.split(":", 1)[0]
    tb = traceback.extract_tb(e.__traceback__)
    if tb and os.path.abspath(tb[-1].filename) == os.path.abspath(path):
        return f"{path} line {tb[-1].lineno}"
    return None


def _config_error(e: Exception, argv: list[str], default_config: str | None) -> UserError | None:
    """The one-line UserError for an exception from loading / overriding the config; None for a bug."""
    from absl import flags

    if isinstance(e, SyntaxError):
        return UserError(f"config file {e.filename} line {e.lineno}: {e.msg}")
    config_arg = _config_flag_value(argv) or default_config
    where = _config_file_line(e, config_arg)
    if where is not None:  # the config file's own code raised: the user's mistake
        return UserError(f"config file {where}: {type(e).__name__}: {one_line(e)}")
    if not isinstance(e, (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError)):
        return None  # a bug outside the config file keeps its traceback
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()  # KeyError's str() is a repr
    if "Error whilst parsing config file" in text:  # config_flags puts the traceback in the message
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return UserError(f"config file {config_arg}: {lines[-1]}")
    return UserError(_unknown_field(argv, default_config) or text.split("\n")[0])


def parse_config_flags(argv: list[str], default_config: str | None = None,
                       define_extra: Callable[[Any], None] | None = None) -> tuple[ml_collections.ConfigDict, Any]:
    """Parse --config / --config.x=y / --workdir (+ extra flags); mistakes become one-line UserErrors.

    A missing config file, a syntax error in it and an unknown field (named with the nearest
    valid ones, as difflib finds them) are one line each, for every CLI that parses its flags
    here (the trainer, the grid search, the scaling study). Also takes the multi-host flags and
    calls jax.distributed.initialize() when --distributed is given (TPU pods and multi-node
    GPU; see docs/multi-machine.md).
    """
    from absl import flags
    from ml_collections import config_flags

    argv = last_override_wins(list(argv))
    fv = flags.FlagValues()
    try:  # a default config is loaded (and overridden) here already
        config_flags.DEFINE_config_file("config", default_config, "config file (path[:arg])", flag_values=fv,
                                        lock_config=True, sys_argv=argv)
    except Exception as e:
        err = _config_error(e, argv, default_config)
        if err is None:
            raise
        raise err from None
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and results go", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU pods, multi-node GPU)",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (when not auto-detected)",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes (when not auto-detected)", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index (when not auto-detected)", flag_values=fv)
    if define_extra is not None:
        define_extra(fv)
    if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(f"usage: python -m {_module_name(argv[0])} [--flag=value ...]\n"
              "Any field of the --config file's get_config() can be overridden: --config.<field>=<value>.\n")
        print(fv.get_help())
        raise SystemExit(0)
    _check_config_file(argv)
    try:
        fv(argv)
        config = fv.config
        if config is not None:
            config.keys()  # a config file that failed to load raises here (OSError)
    except Exception as e:
        err = _config_error(e, argv, default_config)
        if err is None:
            raise
        raise err from None
    if config is None:
        raise UserError("--config is required, e.g. --config=effnet_jax/configs/digits.py")
    if fv.distributed:
        kwargs = {k: fv[k].value for k in ("coordinator_address", "num_processes", "process_id")
                  if fv[k].value is not None}
        jax.distributed.initialize(**kwargs)
    return config, fv




def enable_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path`` ("" leaves it off): a rerun, a resumed trial or a
    same-shaped trial loads its programs instead of compiling them. Process-wide, so set once here."""
    if path:
        from effnet_jax import compile_cache

        compile_cache.enable(path, min_compile_time_s=0.5)
