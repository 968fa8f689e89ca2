#!/usr/bin/env python3
"""tenant-ratelimit benchmark: a program that reports numbers, not a test.

One real Envoy (V8 runtime, one worker pinned to one core, wrk pinned to the other) serves
several loopback listeners from ONE bootstrap, all answering with a direct response:

  none        no HTTP filter besides the router
  native      envoy.filters.http.local_ratelimit, per-tenant (x-tenant-id) dynamic descriptors,
              buckets too large to ever deny
  floor       a no-op proxy-wasm filter (bench/noop): the cost of running *a* Wasm filter
  ours        tenant-ratelimit, bucket too large to deny, rate_limit_headers "off"
  ours_hdrs   tenant-ratelimit, same, rate_limit_headers "x-ratelimit"

Metric: Envoy CPU microseconds per request = delta of utime+stime of the Envoy process
(/proc/<pid>/stat) over a wrk run / requests wrk completed; also requests/s and p50/p99
latency. Rounds are interleaved (each round visits every listener and connection count).
Then: admission accuracy at 2 and 4 workers, tenant spread, memory per tenant, .wasm sizes.

  ENVOY_BIN=... WASM=... python bench/bench.py            # full run -> bench/RESULTS.md, bench/*.png
  ENVOY_BIN=... WASM=... python bench/bench.py --smoke    # every code path in seconds -> bench/out/smoke/
  ENVOY_BIN=... python bench/bench.py --ab NAME=PATH.wasm[:CONFIGJSON] ... [--rounds 7] [--seconds 4]
      # A/B quick mode: only CPU us/request at 16 connections, the floor and each variant (its own
      # listener and vm_id) in one Envoy; prints a table (WASM is not needed). CONFIGJSON defaults to
      # the full run's `ours` config (bucket too large to deny, headers off).
  ENVOY_BIN=... WASM=... python bench/bench.py --only global [--smoke]
      # only the global-limits phase (below); replaces or appends the `## Global limits` section of
      # RESULTS.md (bench/ or bench/out/smoke/) and leaves the other sections alone.

Global limits phase (full run, --smoke, --only global): our filter with `global` mode "global",
"both", and lease_tokens 10 and 100, against local only; one Envoy, one listener each, a
`ratelimit` cluster to one tenant-ratelimit-service (SERVICE, else target/service/
tenant-ratelimit-service: `make service`) on one redis-server, and mode "global" (and lease_tokens
10) against two services on a 6-node Redis Cluster; all started on free loopback ports and
stopped at exit. Without the service or redis-server the phase prints one line saying why it was
skipped, and the rest still runs.

The smoke run exits 0 whenever the measurements ran: it reports, it never asserts performance.

Layout: this file is the entry point (the CLI, the full run's order, --only global); common.py
(paths, constants, child processes, the bench's Envoy, statistics), load.py (wrk and the
per-run measurement), phases/ (perf, spread, accuracy, memory, global_, ab: one module per
phase), report.py (tables, plots, RESULTS.md). The Envoy launcher and bootstrap builders are
tests/support/envoy.py, shared with the end-to-end tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import (BENCH_DIR, HUGE, LABELS, PERF_LISTENERS, REPO, answer_200, build_noop, cmd_out, cpu_model,
                    ensure_wrk, fmt_range, kill_children, listener, loadavg, log, native_filter, ours_filter, pin_cpus,
                    replace_section, start_envoy, vm_filter)
from load import Wrk
from phases import ab as ab_mode
from phases import accuracy, memory, perf, spread
from phases.global_ import GlobalSkip, global_prereqs, run_global_phase
from report import (accuracy_table, global_section, memory_table, perf_tables, plots, spread_table, where_we_stand,
                    write_report)


# --------------------------------------------------------------------------------------------
# --only global: this phase alone, its section replaced (or appended) in RESULTS.md


def run_only_global(args, envoy_bin: str, wasm: Path, rounds: int, seconds: int, warm: int) -> int:
    outdir = args.out or (BENCH_DIR / "out" / "smoke" if args.smoke else BENCH_DIR)
    try:
        global_prereqs()
    except GlobalSkip as e:
        print(f"[bench] global phase skipped: {e}", flush=True)
        return 0
    load_start = loadavg()
    wrk_bin = ensure_wrk()
    envoy_cpus, wrk_cpus = pin_cpus()
    workdir = Path(tempfile.mkdtemp(prefix="trl-global-"))
    try:
        wrk = Wrk(wrk_bin, workdir, wrk_cpus)
        g = run_global_phase(envoy_bin, wasm, wrk, workdir, rounds, seconds, warm, envoy_cpus)
    finally:
        kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = loadavg()
    if "skipped" in g:
        return 0
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = global_section(g, load_start, load_end)
    cmd = f"bench/bench.py --only global{' --smoke' if args.smoke else ''}"
    section = section.replace("\n\n", f"\n\nMeasured by `{cmd}` on {date}"
                              f"{' (SMOKE: 1 round of 1 s, not meaningful)' if args.smoke else ''}. ", 1)
    outdir.mkdir(parents=True, exist_ok=True)
    report = outdir / "RESULTS.md"
    report.write_text(replace_section(report.read_text() if report.exists() else "", section).lstrip("\n"))
    raw = (outdir if (args.smoke or args.out) else BENCH_DIR / "out") / "global.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(g, indent=1))
    log(f"wrote {report} (section `## Global limits`), {raw}")
    print()
    print(section)
    return 0


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every code path in seconds; writes to bench/out/smoke")
    ap.add_argument("--out", type=Path, help="output directory (default: bench/ for a full run)")
    ap.add_argument("--only", choices=["global"],
                    help="run one phase only: `global` updates (or appends) the `## Global limits` section "
                         "of RESULTS.md in the output directory and leaves the rest of the file alone")
    ab = ap.add_argument_group("A/B quick mode (only with --ab)")
    ab.add_argument("--ab", action="append", metavar="NAME=PATH.wasm[:CONFIGJSON]",
                    help="a variant to compare with the floor (repeatable); CONFIGJSON defaults to "
                         "the full run's `ours` config (bucket too large to deny, headers off)")
    ab.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ab.add_argument("--seconds", type=int, default=4, help="seconds per measurement (default 4)")
    ab.add_argument("--conns", type=int, default=16, help="wrk connections (default 16)")
    ab.add_argument("--warm", type=int, default=2, help="warm-up seconds per listener (default 2)")
    args = ap.parse_args()

    envoy_bin = os.environ.get("ENVOY_BIN")
    if args.ab:
        if args.smoke:
            sys.exit("bench: --ab and --smoke are exclusive")
        if not envoy_bin or not Path(envoy_bin).exists():
            sys.exit("bench: set ENVOY_BIN to the Envoy binary")
        return ab_mode.run_ab(args, envoy_bin)
    wasm = os.environ.get("WASM")
    if not envoy_bin or not wasm:
        sys.exit("bench: set ENVOY_BIN and WASM (make bench does)")
    wasm = Path(wasm).resolve()
    if not Path(envoy_bin).exists() or not wasm.exists():
        sys.exit(f"bench: missing {envoy_bin if not Path(envoy_bin).exists() else wasm}")
    wasm_size = wasm.stat().st_size  # the module Envoy loads below (a rebuild mid-run would not be measured)
    g_rounds, g_seconds, g_warm = (1, 1, 0) if args.smoke else (5, 4, 2)
    if args.only == "global":
        return run_only_global(args, envoy_bin, wasm, g_rounds, g_seconds, g_warm)

    if args.smoke:
        conns_list, rounds, seconds, warm = [1, 64], 1, 1, 0
        spread_counts, spread_rounds, spread_seconds = [1, 100], 1, 1
        acc_seconds, mem_steps = 1, [10, 100]
        outdir = args.out or BENCH_DIR / "out" / "smoke"
    else:
        conns_list, rounds, seconds, warm = [1, 16, 64], 5, 5, 2
        spread_counts, spread_rounds, spread_seconds = [1, 100, 10_000], 5, 3
        acc_seconds, mem_steps = 10, [1_000, 100_000]
        outdir = args.out or BENCH_DIR
    spread_conns = 64
    perf_max_tenants = 20_000
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_start = loadavg()

    wrk_bin = ensure_wrk()
    noop = build_noop()
    envoy_cpus, wrk_cpus = pin_cpus()
    if envoy_cpus is not None:
        pinning = f"Envoy on CPU {envoy_cpus}, wrk on CPU {wrk_cpus} (taskset)"
    else:
        pinning = "none (only one CPU available)"

    workdir = Path(tempfile.mkdtemp(prefix="trl-bench-"))
    wrk = Wrk(wrk_bin, workdir, wrk_cpus)
    log(f"work dir {workdir}; output {outdir}")
    try:
        listeners = [
            listener("none", []),
            listener("native", [native_filter("native", HUGE, HUGE, perf_max_tenants)]),
            listener("floor", [vm_filter("bench_noop", noop, "{}")]),
            listener("ours", [ours_filter("trl_off", wasm, HUGE, HUGE, "off", perf_max_tenants)]),
            listener("ours_hdrs", [ours_filter("trl_hdrs", wasm, HUGE, HUGE, "x-ratelimit", perf_max_tenants)]),
        ]
        envoy = start_envoy(envoy_bin, workdir, "envoy_perf", listeners, 1, envoy_cpus)
        try:
            # Sanity: every listener answers 200; headers appear only where configured.
            for name, hdrs in answer_200(envoy, PERF_LISTENERS).items():
                has = "x-ratelimit-limit" in hdrs
                if has != (name == "ours_hdrs"):
                    raise RuntimeError(f"listener {name}: x-ratelimit-limit present={has}")
            perf_rows = perf.phase_perf(envoy, wrk, conns_list, rounds, seconds, warm)
            log("tenant spread")
            spread_rows = spread.phase_spread(envoy, wrk, spread_counts, spread_rounds, spread_seconds, spread_conns, warm)
        finally:
            envoy.stop()
        log("admission accuracy")
        acc = accuracy.phase_accuracy(envoy_bin, wasm, wrk, workdir, [2, 4], acc_seconds)
        log("memory")
        mem = memory.phase_memory(envoy_bin, wasm, wrk, workdir, mem_steps, envoy_cpus)
        log("global limits")
        g_load0 = loadavg()
        glob = run_global_phase(envoy_bin, wasm, wrk, workdir, g_rounds, g_seconds, g_warm, envoy_cpus)
        g_load1 = loadavg()

        perf_md, head = perf_tables(perf_rows, conns_list)
        spread_md, spread_res = spread_table(spread_rows, spread_counts)
        big = max(conns_list)
        hl = ["| listener | CPU us/request | requests/s | p99 us |", "|---|---|---|---|"]
        for name in PERF_LISTENERS:
            h = head[(big, name)]
            hl.append(f"| {LABELS[name]} | {fmt_range(*h['cpu'])} | {h['rps'][0]:.0f} | {h['p99'][0]:.0f} |")
        hl += ["", "| ratio | CPU/request |", "|---|---|"]
        for k in ("ours/floor", "ours_hdrs/floor", "ours/native", "ours/none"):
            if (big, k) in head:
                r = head[(big, k)]
                hl.append(f"| {k} | {r[0]:.3f} (per-round {r[1]:.3f}-{r[2]:.3f}) |")

        files = plots(perf_rows, conns_list, outdir)
        raw = {"perf": perf_rows, "spread": spread_rows, "accuracy": acc, "memory": mem, "global": glob}
        # Raw samples: next to the report for smoke/--out runs, in the ignored bench/out/ otherwise.
        raw_path = outdir / "results.json" if (args.smoke or args.out) else BENCH_DIR / "out" / "results.json"
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps(raw, indent=1))

        rel = lambda p: os.path.relpath(p, REPO) if str(p).startswith(str(REPO)) else str(p)  # noqa: E731
        command = "make bench" + (
            "-smoke" if args.smoke else ""
        ) + f"  (= ENVOY_BIN={rel(envoy_bin)} WASM={rel(wasm)} .venv/bin/python bench/bench.py{' --smoke' if args.smoke else ''})"
        ctx = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "smoke": args.smoke,
            "command": command,
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "pinning": pinning,
            "kernel": platform.release(),
            "envoy_version": cmd_out([envoy_bin, "--version"]).splitlines()[-1].split("version:", 1)[-1].strip(),
            "rustc": cmd_out(["rustc", "--version"]),
            "wrk_version": cmd_out([wrk_bin, "-v"]).splitlines()[0] if cmd_out([wrk_bin, "-v"]) else "?",
            "rounds": rounds,
            "seconds": seconds,
            "warm": warm,
            "conns": conns_list,
            "perf_max_tenants": perf_max_tenants,
            "headline": "\n".join(hl),
            "stand": where_we_stand(head, conns_list, acc, spread_res, perf_rows),
            "perf": perf_md,
            "spread": spread_md,
            "spread_conns": spread_conns,
            "spread_rounds": spread_rounds,
            "spread_seconds": spread_seconds,
            "accuracy": accuracy_table(acc),
            "acc_seconds": acc_seconds,
            "memory": memory_table(mem),
            "global": global_section(glob, g_load0, g_load1),
            "mem_max_tenants": max(200_000, 2 * mem_steps[-1]),
            "wasm_name": wasm.name,
            "wasm_size": wasm_size,
            "noop_size": noop.stat().st_size,
            "wall": time.monotonic() - started,
            "load_start": load_start,
            "load_end": loadavg(),
        }
        report = outdir / "RESULTS.md"
        write_report(report, ctx)
        log(f"wrote {rel(report)}, {', '.join(rel(f) for f in files)}, {rel(raw_path)}")
        print()
        print("\n".join(hl))
        print()
        print(ctx["stand"])
        print()
        print(ctx["global"])
    finally:
        kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
