"""Where a step's time goes: milliseconds per step by JAX op, from a ``benchmark.py --profile`` folder.

    python scripts/benchmark.py --model b0 --resolution 64 --modes train --profile runs/prof
    python scripts/profile_summary.py runs/prof

For each traced program (``train``, ``inference``) it reads the Perfetto trace that
``jax.profiler`` wrote under ``DIR/<mode>/`` and the program's optimized HLO
(``DIR/<mode>.hlo.txt``), maps every kernel event to its HLO instruction (by the event's
``hlo_op`` argument where the backend records one, else by name) and that instruction to
the JAX op it came from (its ``op_name`` metadata), and prints time per step grouped by
forward/backward and op, then the slowest kernels. Kernel time overlaps on a multi-threaded
CPU, so the total can differ from the wall time of a step. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', re.M)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the ``op_name`` of the JAX operation it was lowered from."""
    return {m.group(1): m.group(2) for m in _INSTRUCTION.finditer(hlo_text)}


def category(op_name: str) -> str:
    """'fwd mul', 'bwd reduce_sum', ...: backward ops sit under a ``transpose(...)`` scope."""
    last = re.sub(r"\[.*", "", op_name.rstrip("/").split("/")[-1]) or "?"
    return f"{'bwd' if 'transpose(' in op_name else 'fwd'} {last}"


def _instruction_of(event: dict, ops: dict[str, str]) -> str | None:
    args = event.get("args") or {}
    for name in (args.get("hlo_op"), event.get("name", "")):
        if not name:
            continue
        if name in ops:
            return name
        dotted = re.sub(r"_(\d+)$", r".\1", name)  # GPU kernels: 'fusion_12' for instruction 'fusion.12'
        if dotted in ops:
            return dotted
    return None


def summarize(folder: str, steps: int | None = None) -> dict[str, dict]:
    """{mode: {"total_ms", "by_op": [(category, ms)], "kernels": [(name, ms, op_name)], "unmapped"}} per step.

    ``steps``: steps traced per program; by default what benchmark.py recorded in profile.json.
    """
    if steps is None:
        with open(os.path.join(folder, "profile.json")) as f:
            steps = json.load(f)["steps"]
    out = {}
    for hlo_path in sorted(glob.glob(os.path.join(folder, "*.hlo.txt"))):
        mode = os.path.basename(hlo_path)[: -len(".hlo.txt")]
        traces = sorted(glob.glob(os.path.join(folder, mode, "**", "*.trace.json.gz"), recursive=True))
        if not traces:
            continue
        with open(hlo_path) as f:
            ops = hlo_op_names(f.read())
        with gzip.open(traces[-1]) as f:
            trace = json.load(f)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        by_kernel: collections.Counter = collections.Counter()
        unmapped: collections.Counter = collections.Counter()  # host frames, library kernels without an HLO name
        for e in events:
            if e.get("ph") == "X":
                name = _instruction_of(e, ops)
                ms = e.get("dur", 0) / 1e3 / steps  # microseconds -> ms per step
                if name is not None:
                    by_kernel[name] += ms
                else:
                    unmapped[e.get("name", "?")] += ms
        by_op: collections.Counter = collections.Counter()
        for name, ms in by_kernel.items():
            by_op[category(ops[name])] += ms
        out[mode] = {
            "total_ms": sum(by_kernel.values()),
            "by_op": by_op.most_common(),
            "kernels": [(n, ms, ops[n]) for n, ms in by_kernel.most_common()],
            "unmapped": unmapped.most_common(),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the --profile folder of scripts/benchmark.py")
    p.add_argument("--steps", type=int, default=None, help="steps traced per program (default: profile.json)")
    p.add_argument("--top", type=int, default=15, help="rows of each table")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.folder, "profile.json")) and args.steps is None:
        p.error(f"{args.folder} has no profile.json: not a benchmark.py --profile folder (or pass --steps)")
    result = summarize(args.folder, args.steps)
    if not result:
        print(f"error: no <mode>.hlo.txt with a trace under {args.folder}", file=sys.stderr)
        sys.exit(2)
    for mode, r in result.items():
        print(f"\n{mode}: {r['total_ms']:.2f} ms of kernels per step")
        for cat, ms in r["by_op"][: args.top]:
            print(f"  {ms:9.2f} ms  {cat}")
        print("  slowest kernels:")
        for name, ms, op_name in r["kernels"][: args.top]:
            print(f"  {ms:9.2f} ms  {name[:32]:32s} {op_name[-80:]}")
        print("  events not matched to an instruction (host frames nest, so these overlap):")
        for name, ms in r["unmapped"][:5]:
            print(f"  {ms:9.2f} ms  {name[:110]}")
    return result


if __name__ == "__main__":
    main()
