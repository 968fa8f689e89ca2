"""A/B quick mode: CPU per request only, the no-op floor and each variant (its own listener and
vm_id) in one Envoy, interleaved rounds; prints a table (and writes ab.md, ab.json with --out)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import (HUGE, answer_200, build_noop, ensure_wrk, errors_note, fmt_range, kill_children, listener, loadavg,
                    log, med, paired_ratios, pin_cpus, start_envoy, summarize, vm_filter)
from load import Wrk, measure_round, rotated

AB_DEFAULT_CONFIG = {"capacity": HUGE, "refill_rate": HUGE, "rate_limit_headers": "off", "max_tenants": 20_000}


def parse_ab(spec: str) -> tuple[str, Path, str]:
    """NAME=PATH.wasm[:CONFIGJSON] -> (name, path, configuration string)."""
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise ValueError(f"--ab {spec!r}: expected NAME=PATH.wasm[:CONFIGJSON]")
    if not all(c.isalnum() or c in "_-" for c in name) or name == "floor":
        raise ValueError(f"--ab {spec!r}: NAME must be [A-Za-z0-9_-]+ and not 'floor'")
    path, colon, conf = rest.partition(":")
    if colon:
        try:
            json.loads(conf)
        except json.JSONDecodeError as e:
            raise ValueError(f"--ab {spec!r}: CONFIGJSON is not JSON: {e}") from None
    else:
        conf = json.dumps(AB_DEFAULT_CONFIG)
    wasm = Path(path).resolve()
    if not wasm.is_file():
        raise ValueError(f"--ab {spec!r}: no such file {wasm}")
    return name, wasm, conf


def run_ab(args, envoy_bin: str) -> int:
    try:
        variants = [parse_ab(s) for s in args.ab]
    except ValueError as e:
        sys.exit(f"bench: {e}")
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        sys.exit("bench: --ab names must be distinct")
    rounds, seconds, conns, warm = args.rounds, args.seconds, args.conns, args.warm
    load_start = loadavg()
    wrk_bin = ensure_wrk()
    noop = build_noop()
    envoy_cpus, wrk_cpus = pin_cpus()
    workdir = Path(tempfile.mkdtemp(prefix="trl-ab-"))
    wrk = Wrk(wrk_bin, workdir, wrk_cpus)
    order_all = ["floor"] + names
    sizes = {"floor": noop.stat().st_size} | {n: w.stat().st_size for n, w, _ in variants}
    confs = {n: c for n, _, c in variants}
    log(f"A/B: {len(order_all)} listeners, {rounds} rounds x {seconds} s, {conns} connections; load {load_start}")
    rows: list[dict] = []
    try:
        listeners = [listener("floor", [vm_filter("bench_noop", noop, "{}")])]
        listeners += [listener(n, [vm_filter(f"ab_{n}", w, c)]) for n, w, c in variants]
        envoy = start_envoy(envoy_bin, workdir, "envoy_ab", listeners, 1, envoy_cpus)
        try:
            for name, hdrs in answer_200(envoy, order_all).items():
                log(f"listener {name}: 200, x-ratelimit-limit {'present' if 'x-ratelimit-limit' in hdrs else 'absent'}")
            if warm:
                for name in order_all:
                    wrk.run(envoy.url(name), conns, warm, "static")
            for rnd in range(rounds):
                rows += measure_round(envoy, wrk, rotated(order_all, rnd), rnd, conns, seconds)
                line = ", ".join(f"{x['listener']} {x['cpu_us_per_req']:.2f}" for x in rows if x["round"] == rnd)
                log(f"round {rnd + 1}/{rounds}: us/req {line}")
            try:  # the filters' own counters (summed over every listener that defines them)
                custom = [x for x in envoy.admin("/stats?filter=^wasmcustom[.]")[1].splitlines() if not x.endswith(": 0")]
                log("wasmcustom stats: " + "; ".join(custom))
            except Exception as e:  # informative only
                log(f"wasmcustom stats unavailable: {e}")
        finally:
            envoy.stop()
    finally:
        kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = loadavg()

    out = [
        f"A/B: CPU us/request, {conns} connections, 1 Envoy worker (pinned), {rounds} interleaved rounds x {seconds} s",
        f"load average start / end: {load_start} / {load_end}; "
        f"median other CPU (non-Envoy busy CPUs, wrk <= ~1.0): {med([r['other_cpu'] for r in rows]):.2f}",
        "",
        "| listener | bytes | CPU us/request median (min-max) | / floor: median of per-round ratios (min-max) "
        f"| / {names[0]}: same | req/s median |",
        "|---|---|---|---|---|---|",
    ]

    def ratio(num: str, den: str) -> str:
        if num == den:
            return "1"
        pr = paired_ratios(rows, num, den, "cpu_us_per_req")
        return f"{med(pr):.3f} ({min(pr):.3f}-{max(pr):.3f})"

    for name in order_all:
        s = [r for r in rows if r["listener"] == name]
        cpu = summarize(s, "cpu_us_per_req")
        out.append(
            f"| {name} | {sizes[name]:,} | {fmt_range(*cpu)} | {ratio(name, 'floor')} | {ratio(name, names[0])} "
            f"| {med([r['rps'] for r in s]):.0f} |"
        )
    out += errors_note(rows)
    out.append("")
    out += [f"config {n}: {confs[n]}" for n in names]
    text = "\n".join(out)
    print()
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab.md").write_text(text + "\n")
        (args.out / "ab.json").write_text(json.dumps({"rows": rows, "sizes": sizes, "configs": confs,
                                                      "load_start": load_start, "load_end": load_end}, indent=1))
        log(f"wrote {args.out / 'ab.md'}, {args.out / 'ab.json'}")
    return 0

