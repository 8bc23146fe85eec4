"""Grid search over EfficientNet's compound-scaling constants (alpha, beta, gamma).

    python -m experiments.grid_search                    # embedded digits, a laptop CPU, minutes
    python -m experiments.grid_search --workdir=runs/grid --config.search.strategy=halving
    python -m experiments.grid_search --then_scale=1,2,3  # scale the winner, print params/MACs

Candidates satisfy |alpha * beta**2 * gamma**2 - target| <= tolerance on a grid; the
paper's (1.2, 1.1, 1.15) and the unscaled B0 ride along as labelled references.
Each trial is B0 scaled at phi = 1 by a candidate, trained through the one trainer
(``effnet_jax.train.train_and_evaluate``) and scored on a validation split.

Outputs in --workdir: results.jsonl (one row per finished trial, appended durably),
results.csv, best.json (what ``config.model.constants`` takes), grid.png and
accuracy_vs_macs.png, TensorBoard hparams. Rerunning with the same workdir skips
finished trials and resumes an interrupted one from its checkpoint. Several machines
share one grid with --num_workers/--worker_index on a shared workdir: every worker
computes the same balanced assignment of trials (``schedule``) and runs its own;
worker 0 writes the summary once every row is in.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import fcntl
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from effnet_jax import cost, scaling, train
from effnet_jax import metrics as metrics_io
from effnet_jax.arch import Architecture
from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.scaling import PAPER_CONSTANTS

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "grid_search.py")
RESULT_FIELDS = (
    "status", "reason", "val_top1", "val_top5", "val_loss", "ema_val_top1", "ema_val_top5", "train_loss",
    "resolution", "width", "depth", "blocks", "params", "macs", "steps", "epochs", "wall_time_s", "compile_s",
    "train_img_per_s",
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    alpha: float
    beta: float
    gamma: float
    label: str = ""  # "paper", "baseline" or ""

    @property
    def product(self) -> float:
        return self.alpha * self.beta**2 * self.gamma**2

    @property
    def key(self) -> str:
        return f"a{self.alpha:.3f}-b{self.beta:.3f}-g{self.gamma:.3f}" + ("-phi0" if self.label == "baseline" else "")


def grid_values(bounds: Sequence[float], step: float) -> list[float]:
    """Inclusive grid lo, lo + step, ..., hi (rounded to kill float drift)."""
    lo, hi = float(bounds[0]), float(bounds[1])
    if lo < 1 or hi < lo or step <= 0:
        raise UserError(f"a range must satisfy 1 <= lo <= hi with step > 0, got ({lo}, {hi}) step {step}")
    n = int(math.floor((hi - lo) / step + 1e-9))
    return [round(lo + i * step, 6) for i in range(n + 1)]


def candidates(search: ml_collections.ConfigDict) -> list[Candidate]:
    """Grid points meeting the FLOPs constraint, then the labelled references."""
    points = [Candidate(a, b, g) for a in grid_values(search.alpha, search.step)
              for b in grid_values(search.beta, search.step) for g in grid_values(search.gamma, search.step)]
    if not points:
        raise UserError("the search ranges hold no grid point")
    kept = [c for c in points if abs(c.product - search.target) <= search.tolerance]
    if not kept:
        near = min(points, key=lambda c: abs(c.product - search.target))
        raise UserError(
            f"no candidate satisfies |alpha*beta^2*gamma^2 - {search.target}| <= {search.tolerance}; the closest "
            f"is alpha={near.alpha}, beta={near.beta}, gamma={near.gamma} (product {near.product:.4f}): "
            "widen the ranges or the tolerance")
    if search.include_paper:
        paper = Candidate(**PAPER_CONSTANTS, label="paper")
        kept = [c for c in kept if c.key != paper.key] + [paper]
    if search.include_baseline:
        kept.append(Candidate(1.0, 1.0, 1.0, label="baseline"))
    return kept


def satisfies(c: Candidate, search: ml_collections.ConfigDict) -> bool:
    return c.label != "baseline" and abs(c.product - search.target) <= search.tolerance + 1e-9


def trial_id(c: Candidate, seed: int, rung: int) -> str:
    return f"{c.key}-s{seed}-r{rung}"


def trial_config(config: ml_collections.ConfigDict, c: Candidate, seed: int, rung: int,
                 phi: float | None = None) -> ml_collections.ConfigDict:
    """The trainer config of one trial: B0 scaled by the candidate, this seed, this rung's budget.

    ``phi`` (default config.search.phi) lets the scaling study grow a candidate past phi = 1.
    """
    cfg = copy.deepcopy(config.train)
    cfg.unlock()
    m = cfg.model
    m.name, m.constants = "formula", ""
    m.alpha, m.beta, m.gamma = c.alpha, c.beta, c.gamma
    m.phi = 0.0 if c.label == "baseline" else float(config.search.phi if phi is None else phi)
    cfg.seed = int(seed)
    budget = config.search.halving_eta**rung
    if cfg.num_train_steps:
        cfg.num_train_steps = int(cfg.num_train_steps * budget)
    else:
        cfg.num_epochs = float(cfg.num_epochs * budget)
    return cfg


def trial_model(config: ml_collections.ConfigDict, c: Candidate, seed: int, rung: int,
                phi: float | None = None) -> tuple[scaling.ScalingSpec, Architecture]:
    """The spec and rounded architecture a trial trains (same config path as ``run_trial``)."""
    cfg = trial_config(config, c, seed, rung, phi=phi)
    spec = train.model_spec(cfg)
    return spec, scaling.build_architecture(spec, train.network(cfg), cfg.model.drop_path_rate)


def schedule(config: ml_collections.ConfigDict, trials: Sequence[tuple[Candidate, int]], rung: int,
             num_workers: int) -> list[tuple[int, int]]:
    """(trial index, worker) pairs in the order to run them: longest trial first, least-loaded worker.

    Every worker computes the same list (it depends only on the config). Estimated cost,
    from measured CPU trials: about half of a phi = 1 trial is compiling its network and
    half is training, which grows with MACs; a trial whose rounded network (architecture
    and resolution) is already scheduled reuses that compiled program (persistent cache)
    and costs only its training. Round-robin (trial k on worker k mod N) left one of two local
    workers idle for a whole trial at the end of the default search.
    """
    shapes = []
    for c, seed in trials:
        spec, arch = trial_model(config, c, seed, rung)
        shapes.append(((arch, spec.resolution), cost.count_macs(arch, spec.resolution, 10)))  # relative cost only
    top = max(m for _, m in shapes)
    seen: set[tuple[Any, int]] = set()
    costs = []
    for key, macs in shapes:
        costs.append(0.5 * macs / top + (0.0 if key in seen else 0.5))
        seen.add(key)
    load, out = [0.0] * num_workers, []
    for i in sorted(range(len(trials)), key=lambda i: -costs[i]):  # stable: ties keep the config's order
        w = min(range(num_workers), key=lambda k: (load[k], k))
        load[w] += costs[i]
        out.append((i, w))
    return out


# ----------------------------------------------------------------- results file

class ResultsLog:
    """results.jsonl: appended one complete line per finished trial, under a lock."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "results.jsonl")

    def rows(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for row in metrics_io.read_jsonl(self.path):
            out.setdefault(row["trial_id"], row)  # first one wins, whatever happened
        return out

    def append(self, row: dict[str, Any]) -> bool:
        """Append unless a row for this trial is already there (another worker, an earlier run)."""
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if row["trial_id"] in self.rows():
                return False
            self._repair_torn_tail()
            metrics_io.append_jsonl(self.path, row)
            return True

    def _repair_torn_tail(self) -> None:
        """A kill mid-write can leave an unterminated last line: cut it before appending."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)


def run_trial(config: ml_collections.ConfigDict, workdir: str, c: Candidate, seed: int, rung: int,
              phi: float | None = None) -> dict[str, Any]:
    """Train one trial (resuming its checkpoint if any) and return its results row."""
    tid = trial_id(c, seed, rung)
    cfg = trial_config(config, c, seed, rung, phi)
    row = {"trial_id": tid, "label": c.label, "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma,
           "product": c.product, "phi": cfg.model.phi, "seed": seed, "rung": rung}
    start = time.time()
    try:
        result = train.train_and_evaluate(cfg, os.path.join(workdir, "trials", tid))
    except UserError:
        raise
    except Exception as e:  # a broken trial is a result, not the end of the search
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                  "wall_time_s": time.time() - start}
    row.update({k: result.get(k) for k in RESULT_FIELDS})
    if row["status"] == "diverged":
        row["reason"] = "non-finite training loss"
    return row


# --------------------------------------------------------------------- summary

def summarize(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One entry per candidate at the highest rung it reached: mean +- std over seeds."""
    by_cand: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_cand.setdefault(f"a{r['alpha']:.3f}-b{r['beta']:.3f}-g{r['gamma']:.3f}-{r['label']}", []).append(r)
    out = []
    for group in by_cand.values():
        top = max(r["rung"] for r in group)
        group = [r for r in group if r["rung"] == top]
        ok = [r for r in group if r["status"] == "ok" and r.get(metric) is not None]
        values = [r[metric] for r in ok]
        first = ok[0] if ok else group[0]
        out.append({
            "label": first["label"], "alpha": first["alpha"], "beta": first["beta"], "gamma": first["gamma"],
            "product": first["product"], "rung": top, "seeds": len(group), "ok": len(ok),
            "status": "ok" if ok else group[0]["status"],
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
            **{k: first.get(k) for k in ("resolution", "width", "depth", "blocks", "params", "macs")},
            "wall_time_s": sum(r.get("wall_time_s") or 0.0 for r in group),
            "train_img_per_s": first.get("train_img_per_s"),
        })
    return sorted(out, key=lambda s: (s["mean"] is None, -(s["mean"] or 0.0), s["macs"] or 0))


def pick_best(summary: Sequence[dict[str, Any]], search: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The best constraint-satisfying candidate of the highest rung; ties go to fewer MACs."""
    top = max((s["rung"] for s in summary), default=0)
    eligible = [s for s in summary if s["mean"] is not None and s["rung"] == top
                and satisfies(Candidate(s["alpha"], s["beta"], s["gamma"], s["label"]), search)]
    if not eligible:
        return None
    return max(eligible, key=lambda s: (s["mean"], -(s["macs"] or 0)))


def halving_survivors(alive: Sequence[Candidate], rows: Sequence[dict[str, Any]], metric: str, eta: int
                      ) -> list[Candidate]:
    """Successive halving: keep the top 1/eta (at least one) of the non-baseline candidates by ``metric``."""
    ranked = [x for x in summarize(rows, metric) if x["mean"] is not None and x["label"] != "baseline"]
    keep = {(x["alpha"], x["beta"], x["gamma"], x["label"]) for x in ranked[: max(1, len(ranked) // eta)]}
    return [c for c in alive if (c.alpha, c.beta, c.gamma, c.label) in keep]


def format_table(summary: Sequence[dict[str, Any]], metric: str) -> str:
    head = (f"{'':2}{'alpha':>6} {'beta':>6} {'gamma':>6} {'a*b2*g2':>8} {'res':>4} {'blocks':>6} {'params':>10} "
            f"{'MMACs':>8} {metric:>16} {'rung':>4} {'time s':>7}  status")
    lines = [head, "-" * len(head)]
    for s in summary:
        score = "-" if s["mean"] is None else f"{s['mean']:.4f}" + (f"±{s['std']:.4f}" if s["seeds"] > 1 else "")
        tag = {"paper": "P ", "baseline": "B "}.get(s["label"], "  ")
        lines.append(
            f"{tag}{s['alpha']:>6.2f} {s['beta']:>6.2f} {s['gamma']:>6.2f} {s['product']:>8.3f} "
            f"{s['resolution'] or 0:>4} {s['blocks'] or 0:>6} {s['params'] or 0:>10,} {(s['macs'] or 0) / 1e6:>8.1f} "
            f"{score:>16} {s['rung']:>4} {s['wall_time_s']:>7.1f}  {s['status']}")
    lines.append("P = the paper's constants, B = unscaled B0 (phi = 0)")
    return "\n".join(lines)


def write_outputs(workdir: str, config: ml_collections.ConfigDict, rows: Sequence[dict[str, Any]],
                  summary: Sequence[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """results.csv, best.json, plots and TensorBoard hparams (each file replaced atomically)."""
    import csv
    import io

    fields = ["trial_id", "label", "alpha", "beta", "gamma", "product", "phi", "seed", "rung", *RESULT_FIELDS]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    _atomic_write(os.path.join(workdir, "results.csv"), buf.getvalue())
    if best is not None:
        metric = config.search.metric
        out = {"alpha": best["alpha"], "beta": best["beta"], "gamma": best["gamma"], "product": best["product"],
               metric: best["mean"], f"{metric}_std": best["std"], "seeds": best["seeds"], "rung": best["rung"],
               **{k: best[k] for k in ("resolution", "width", "depth", "blocks", "params", "macs")},
               "config": json.loads(config.to_json_best_effort()),
               "created": datetime.datetime.now().isoformat(timespec="seconds")}
        _atomic_write(os.path.join(workdir, "best.json"), json.dumps(out, indent=2) + "\n")
    from experiments import plots

    plots.grid_plots(summary, config.search.metric, workdir)
    _write_hparams(workdir, rows, config.search.metric)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_hparams(workdir: str, rows: Sequence[dict[str, Any]], metric: str) -> None:
    """One TensorBoard run per trial with its hparams and final metrics (HParams dashboard)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    root = os.path.join(workdir, "tensorboard_hparams")
    for r in rows:
        path = os.path.join(root, r["trial_id"])
        if os.path.isdir(path):
            continue
        writer = EventFileWriter(path)
        hparams = {k: r[k] for k in ("alpha", "beta", "gamma", "product", "seed", "rung")}
        hparams["label"] = r["label"] or "grid"
        writer.add_event(Event(wall_time=time.time(), step=0, summary=hp.hparams_pb(hparams, trial_id=r["trial_id"])))
        values = [Summary.Value(tag=k, simple_value=float(r[k])) for k in (metric, "params", "macs", "wall_time_s")
                  if isinstance(r.get(k), (int, float))]
        writer.add_event(Event(wall_time=time.time(), step=0, summary=Summary(value=values)))
        writer.close()


# ------------------------------------------------------------------------ driver

def _wait_for(log: ResultsLog, ids: Sequence[str], check: Any = None, poll_s: float = 2.0
              ) -> dict[str, dict[str, Any]]:
    """Rows once every trial in ``ids`` has one (other workers' included); ``check`` raises if one died."""
    rows = log.rows()
    while any(i not in rows for i in ids):
        if check is not None:
            check()
        time.sleep(poll_s)
        rows = log.rows()
    return rows


def search(config: ml_collections.ConfigDict, workdir: str, num_workers: int = 1, worker_index: int = 0,
           log: Any = print, check: Any = None) -> dict[str, Any]:
    """Run (or resume) the search in ``workdir``; returns {"rows", "summary", "best"}."""
    s = config.search
    cands = candidates(s)
    if s.strategy not in ("exhaustive", "halving"):
        raise UserError(f"search.strategy must be exhaustive or halving, got {s.strategy!r}")
    if not 0 <= worker_index < num_workers:
        raise UserError(f"--worker_index must be in [0, {num_workers}), got {worker_index}")
    seeds = [int(x) for x in s.seeds]
    if not seeds:
        raise UserError("search.seeds is empty")
    train.prepare(trial_config(config, cands[0], seeds[0], 0))  # validate before writing anything
    os.makedirs(workdir, exist_ok=True)
    results = ResultsLog(workdir)
    rungs = s.halving_rungs if s.strategy == "halving" else 1
    alive = list(cands)
    ids: list[str] = []
    for rung in range(rungs):
        if rung > 0:  # successive halving: the best 1/eta of the scaled candidates go on
            rows = [r for r in _wait_for(results, ids, check).values() if r["rung"] == rung - 1]
            alive = halving_survivors(alive, rows, s.metric, s.halving_eta)
            log(f"rung {rung}: {len(alive)} candidates go on with {s.halving_eta ** rung}x the budget")
        trials = [(c, seed) for c in alive for seed in seeds]
        ids = [trial_id(c, seed, rung) for c, seed in trials]
        for i, worker in schedule(config, trials, rung, num_workers):
            (c, seed), tid = trials[i], ids[i]
            if worker != worker_index or tid in results.rows():
                continue
            log(f"trial {tid} ({c.label or 'grid'}, product {c.product:.3f}) ...")
            row = run_trial(config, workdir, c, seed, rung)
            results.append(row)
            score = row.get(s.metric)
            log(f"  {row['status']}: {s.metric} {score if score is None else round(score, 4)}, "
                f"{row.get('wall_time_s') or 0:.1f} s")
    if worker_index != 0:
        return {"rows": list(results.rows().values()), "summary": [], "best": None}
    rows = list(_wait_for(results, ids, check).values())
    summary = summarize(rows, s.metric)
    best = pick_best(summary, s)
    write_outputs(workdir, config, rows, summary, best)
    return {"rows": rows, "summary": summary, "best": best}


def _define_flags(fv: Any) -> None:
    from absl import flags

    flags.DEFINE_integer("num_workers", 1, "machines sharing this grid through one workdir", flag_values=fv)
    flags.DEFINE_integer("local_workers", 0, "worker processes on this machine (0: 2 on a CPU backend with >= 2 "
                         "cores, else 1); XLA compiles on one core, so two workers halve a CPU search. Keep 1 "
                         "per GPU: XLA autotunes convolutions by timing them, and compiles side by side on one "
                         "GPU chose kernels that made a B0 step 15% slower (docs/benchmarks.md)",
                         flag_values=fv)
    flags.DEFINE_integer("worker_index", 0, "this machine's index in [0, num_workers)", flag_values=fv)
    flags.DEFINE_string("then_scale", "", "comma-separated phi values to scale the winner to", flag_values=fv)
    flags.DEFINE_bool("then_train", False, "also train the --then_scale models with the trial budget",
                      flag_values=fv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv_list = list(sys.argv if argv is None else argv)
    config, fv = train.parse_config_flags(argv_list, DEFAULT_CONFIG, _define_flags)
    workdir = fv.workdir or os.path.join("runs", "grid_search-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    phis = _parse_phis(fv.then_scale)
    print(f"workdir: {workdir}", flush=True)
    t0 = time.time()
    num_workers, children = fv.num_workers, []
    backend = jax.default_backend()
    local = fv.local_workers or (2 if backend == "cpu" and (os.cpu_count() or 1) >= 2 else 1)
    if local > 1 and fv.num_workers == 1:
        if backend == "gpu":
            print(f"warning: {local} workers share one GPU; their compiles autotune side by side, which can "
                  "pick slower kernels (see --help, --local_workers)", file=sys.stderr, flush=True)
        candidates(config.search)  # a bad search config fails here, once, before any worker starts
        num_workers = local
        children = [_spawn_worker(argv_list, workdir, i, local) for i in range(1, local)]
    prefix = f"[worker {fv.worker_index}] " if num_workers > 1 else ""
    def check_children() -> None:
        for child in children:
            if child.poll() not in (None, 0):
                raise UserError(f"worker process ({child.args[-1]}) failed with exit code {child.returncode}")

    out = search(config, workdir, num_workers, fv.worker_index, log=lambda m: print(prefix + m, flush=True),
                 check=check_children)
    for child in children:
        child.wait()
    check_children()
    if fv.worker_index != 0:
        print(f"worker {fv.worker_index} done in {time.time() - t0:.0f} s; worker 0 writes the summary")
        return out
    print(format_table(out["summary"], config.search.metric))
    best = out["best"]
    if best is None:
        print("no constraint-satisfying candidate finished; nothing written to best.json")
    else:
        print(f"winner: alpha={best['alpha']} beta={best['beta']} gamma={best['gamma']} "
              f"({config.search.metric} {best['mean']:.4f}) -> {os.path.join(workdir, 'best.json')}")
    print(f"grid search took {time.time() - t0:.0f} s; results in {workdir}")
    if phis and best is not None:
        from experiments import scale_up

        scale_up.scale_up(os.path.join(workdir, "best.json"), phis, config.train,
                          os.path.join(workdir, "scale_up") if fv.then_train else None)
    return out


def _spawn_worker(argv: list[str], workdir: str, index: int, count: int) -> subprocess.Popen:
    """Another worker process on this machine, killed with us (Linux) so no orphan trains on."""
    args = [a for a in argv[1:] if not a.startswith(("--workdir", "--worker_index", "--num_workers",
                                                      "--local_workers", "--then_"))]
    cmd = [sys.executable, "-m", "experiments.grid_search", *args, f"--workdir={workdir}",
           f"--num_workers={count}", "--local_workers=1", f"--worker_index={index}"]

    def die_with_parent() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    with warnings.catch_warnings():  # jax warns on any fork; this one execs at once
        warnings.simplefilter("ignore", RuntimeWarning)
        return subprocess.Popen(cmd, preexec_fn=die_with_parent)


def _parse_phis(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--then_scale takes comma-separated phi values, got {text!r}") from None


if __name__ == "__main__":
    main()
