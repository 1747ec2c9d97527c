"""`make bench`: run every benchmark, then regenerate benchmarks/RESULTS.md from their JSON.

Each benchmark module runs in its own process (``python -m benchmarks.<module>``) and writes
``benchmarks/out/<module>.json``; this script then reads every JSON there and writes one
Markdown report with the machine it ran on. Ratios only: each module measures its floors (copy
bandwidth, GEMM rate) and its peers in the same process (docs/guides/benchmarks.md).

    python benchmarks/run.py                    # everything (tens of minutes on 2 cores)
    python benchmarks/run.py --modules elementwise memory
    python benchmarks/run.py --report-only      # only regenerate RESULTS.md
    python benchmarks/run.py --small --results /tmp/R.md   # smoke run (tiny sizes)

Modules that are missing are skipped; a module that fails is reported and the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    convergence,
    distributed,
    elementwise,
    harness,
    lr_sweep,
    memory,
    model,
    precision_convergence,
    precision_speed,
)

# Module -> (arguments for a full run, arguments for a smoke run or None to skip it there,
# title in RESULTS.md). `SOURCE` names the file of an entry that is another's mode.
MODULES: dict[str, tuple[list[str], list[str], str]] = {
    "model": ([], ["--small"], "Whole model: every algorithm on a transformer-shaped tree"),
    "elementwise": ([], ["--small"], "Element-wise families: donated step vs optax and the floor"),
    "memory": ([], ["--small"], "Memory: state bytes per parameter, peak of a donated step"),
    "muon": ([], ["--quick"], "Muon and Adafactor"),
    "kron_soap": ([], [], "SOAP and Kron-PSGD vs the matmul floor and psgd-jax"),
    "kron_soap_large": (
        ["--large"],
        None,  # not part of smoke runs
        "Large single matrices: Kron vs psgd-jax, SOAP 2048x8192",
    ),
    "sophia_mars": ([], ["--small"], "Sophia and MARS"),
    "stateful": ([], ["--small"], "Stateful API vs the pure step"),
    "convergence": ([], ["--small"], "Convergence"),
    "lr_sweep": (
        [],
        ["--small", "--problems", "digits", "--max-rates", "3"],
        "Learning rates: every configuration on a log grid",
    ),
    "distributed": (
        [],
        ["--quick", "--mesh", "fsdp8", "--config", "muon", "adamw"],
        "Sharded training: per-device programs on 8 devices",
    ),
    "precision_convergence": (
        [],
        ["--small", "--problems", "digits", "--families", "adamw"],
        "State precision: convergence with bfloat16 and 8-bit state",
    ),
    "memory_precision": (
        ["--precision"],
        ["--precision", "--small"],
        "State precision: state bytes per parameter and the peak of a donated step",
    ),
    "precision_speed": (
        [],
        ["--size", "small", "--rounds", "1", "--iters", "1", "--only", "adamw"],
        "State precision: step time against float32",
    ),
}
SOURCE = {"kron_soap_large": "kron_soap", "memory_precision": "memory"}
OWN_RENDERERS = {"elementwise", "memory", "convergence", "model", "lr_sweep"}
RATIO_HINTS = ("over", "/", "ratio", "bytes_per", "per_param")


def run_module(name: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run one module in a fresh interpreter; return its status."""
    source = SOURCE.get(name, name)
    if not (ROOT / "benchmarks" / f"{source}.py").is_file():
        return {"module": name, "status": "missing"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{source}", *args],
            cwd=ROOT,
            # single-threaded LAPACK (see benchmarks/model.py): spinning OpenBLAS threads on a
            # busy CPU time the load, not the algorithm
            env={"OPENBLAS_NUM_THREADS": "1", **os.environ},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"module": name, "status": f"timed out after {timeout:.0f}s"}
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
    return {"module": name, "status": status, "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- rendering


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    return str(value)


def _is_ratio(key: str) -> bool:
    return any(h in key for h in RATIO_HINTS)


def _rows_table(rows: list[dict[str, Any]], label: str | None = None) -> str:
    """A Markdown table of the identifying and ratio columns of a list of flat dicts."""
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k in keys or isinstance(v, dict):
                continue
            if isinstance(v, (str, list)) or _is_ratio(k) or k in ("name", "n_params"):
                keys.append(k)
    if label:
        keys = [label, *keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k, "-")) for k in keys) + " |")
    return "\n".join(lines)


def render_generic(payload: dict[str, Any]) -> str:
    """Ratios of another module's JSON: lists of records and name -> record maps as tables,
    scalar ratios and notes as a list. Bare times are left out (they are in the JSON)."""
    parts, bullets = [], []
    for key, value in payload.items():
        if key in ("machine", "benchmark"):
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            parts.append(f"**{key}**\n\n{_rows_table(value)}")
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            rows = [{"key": k, **_flatten(v)} for k, v in value.items()]
            parts.append(f"**{key}**\n\n{_rows_table(rows)}")
        elif isinstance(value, dict):
            flat = _flatten(value)
            shown = {k: v for k, v in flat.items() if _is_ratio(k) or isinstance(v, str)}
            bullets += [f"- {key}.{k}: {_fmt(v)}" for k, v in shown.items()]
        elif _is_ratio(key) or isinstance(value, str):
            bullets.append(f"- {key}: {_fmt(value)}")
    return "\n\n".join([*parts, "\n".join(bullets)] if bullets else parts)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def render_elementwise(payload: dict[str, Any]) -> str:
    return (
        f"{payload['n_params'] / 1e6:.1f}M float32 parameters; copy bandwidth "
        f"{payload['copy_bandwidth_GBps']:.1f} GB/s (best of {payload['rounds']} rounds). "
        "`ours/floor` and `optax/floor`: step time over the memory-traffic floor (params "
        "read+write, gradient read, state read+write at the copy bandwidth). `traffic`: bytes "
        "the compiled step reads and writes (from its HLO) over the floor's bytes; above 1 "
        "means extra passes over memory (XLA on CPU fuses no sibling outputs, so a "
        "two-moment rule is at least 10/7).\n\n" + elementwise.table(payload)
    )


def render_convergence(payload: dict[str, Any], plots: str) -> str:
    lines = []
    for name, p in payload["problems"].items():
        lines.append(
            f"- {name}: {p['steps']} steps, target {p['target']:g}, learning rates "
            f"base x {', '.join(f'{f:.2g}' for f in p['lr_factors'])}, {payload['seeds']} seeds"
            f" ([plot]({plots}/convergence_{name}.png))"
        )
    return (
        "Final loss (mean ± std over seeds, at the best rate of the sweep, shown in brackets) "
        "and median steps to the target ('-': not reached by every seed).\n\n"
        + "\n".join(lines)
        + "\n\n"
        + convergence.table(payload)
    )


def render_lr_sweep(payload: dict[str, Any]) -> str:
    lines = [
        f"- {name}: {p['steps']} steps, batch {p['batch']}, {payload['seeds']} seeds"
        for name, p in payload["problems"].items()
    ]
    return (
        "Each configuration of `registry.configurations()` (the algorithms with their defaults, "
        "then the presets) on a log grid of learning rates, factor "
        f"{payload['factor']:g}, grown on a side while the best rate sits on that edge (at most "
        f"{payload['max_rates']} rates). Best rate by mean final validation loss; loss ± "
        "standard error over the seeds at that rate; `+`/`-`: the best rate is the top/bottom "
        "of the grid swept; start at: the smallest rate swept within one standard error of the "
        "best. Every (configuration, rate, seed) final loss is in the JSON.\n\n"
        + "\n".join(lines)
        + f"\n\nThe whole sweep took {payload['seconds'] / 60:.0f} min on this machine (shared "
        "with other jobs).\n\n"
        + lr_sweep.table(payload)
        + "\n\nEvery rate swept (mean final loss over the seeds; the best in bold):\n\n"
        + lr_sweep.grid_table(payload)
    )


def render(out_dir: pathlib.Path, statuses: list[dict[str, Any]], plots: str) -> str:
    payloads = {
        p.stem: json.loads(p.read_text())
        for p in sorted(out_dir.glob("*.json"))
        if p.stem in MODULES or p.stem.startswith("model_")
    }
    mach = next((p["machine"] for p in payloads.values() if "machine" in p), harness.machine())
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/run.py` (`make bench`); do not edit by hand. Every "
        "number is a ratio measured in one process on the machine below "
        "(docs/guides/benchmarks.md); bare times are in the JSON files the modules write.",
        "",
        f"Machine: {mach.get('cpu_model', mach.get('processor'))}, {mach['cpu_count']} cores, "
        f"{mach['platform'].split('-with')[0]}; jax {mach['jax']} ({mach['backend']}).",
    ]
    if statuses:
        lines += ["", "Modules: " + ", ".join(f"{s['module']} {s['status']}" for s in statuses)]
    else:
        lines += [
            "",
            "Assembled (`--report-only`) from each module's latest JSON; the modules may have "
            "run at different times and under different load.",
        ]
    for name, (_, _, title) in MODULES.items():
        if name == "model":
            # the CPU payload, then one subsection per accelerator that ran it
            found = [
                k for k in ("model", *sorted(payloads)) if k.startswith("model") and k in payloads
            ]
            if not found:
                continue
            parts = [model.render(payloads[k]) for k in dict.fromkeys(found)]
            lines += ["", f"## {title}", "", "(`benchmarks/model.py`)", "", "\n\n".join(parts)]
            continue
        if name not in payloads:
            continue
        payload = payloads[name]
        if name == "elementwise":
            body = render_elementwise(payload)
        elif name == "memory":
            body = memory.table(payload)
        elif name == "convergence":
            body = render_convergence(payload, plots)
        elif name == "lr_sweep":
            body = render_lr_sweep(payload)
        elif name == "distributed":
            body = distributed.render(payload)
        elif name == "precision_convergence":
            body = precision_convergence.table(payload)
        elif name == "memory_precision":
            body = memory.precision_table(payload)
        elif name == "precision_speed":
            body = precision_speed.table(payload)
        else:
            body = render_generic(payload)
        source = SOURCE.get(name, name)
        lines += ["", f"## {title}", "", f"(`benchmarks/{source}.py`)", "", body]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pathlib.Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", nargs="*", choices=list(MODULES), help="default: all")
    ap.add_argument("--small", action="store_true", help="every module at smoke-test size")
    ap.add_argument("--report-only", action="store_true", help="only regenerate the report")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per module")
    ap.add_argument(
        "--algorithms", nargs="*", help="registry names for elementwise, memory, convergence"
    )
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args(argv)

    statuses = []
    if not args.report_only:
        for name in args.modules or list(MODULES):
            full, small, _ = MODULES[name]
            if args.small and small is None:
                continue
            print(f"running benchmarks/{name}.py ...", flush=True)
            extra = list(small if args.small else full)
            if args.algorithms and name in OWN_RENDERERS:
                extra += ["--only", *args.algorithms]
            statuses.append(run_module(name, extra, args.timeout))
            print(f"  {statuses[-1]['status']}", flush=True)

    results = pathlib.Path(args.results)
    plots_dir = results.parent / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    for png in harness.OUT_DIR.glob("*.png"):
        shutil.copy(png, plots_dir / png.name)
    results.write_text(render(harness.OUT_DIR, statuses, "plots"))
    print(f"wrote {results}")
    return results


if __name__ == "__main__":
    main()
