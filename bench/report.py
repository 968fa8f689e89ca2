"""The bench's report: markdown tables for each phase, the plots, the `Where we stand` verdicts
against the targets, and RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from common import (CLK_TCK, HUGE, LABELS, PERF_LISTENERS, SPREAD_LISTENERS, TARGET_HDRS_MAX, TARGET_OFF_AIM,
                    TARGET_OFF_MAX, TARGET_P99_ADDED_US, div, errors_note, fmt_range, med, paired_ratios, summarize)
from phases.global_ import GLOBAL_LABELS, GLOBAL_LISTENERS, GLOBAL_SECTIONS


def perf_tables(rows: list[dict], conns_list) -> tuple[str, dict]:
    lines = []
    headline = {}
    for conns in conns_list:
        sub = [r for r in rows if r["conns"] == conns]
        lines.append(f"\n#### {conns} connection{'s' if conns > 1 else ''}\n")
        lines.append("| listener | CPU us/request | requests/s | p50 us | p99 us | Envoy CPU util | other CPU |")
        lines.append("|---|---|---|---|---|---|---|")
        for name in PERF_LISTENERS:
            s = [r for r in sub if r["listener"] == name]
            if not s:
                continue
            cpu = summarize(s, "cpu_us_per_req")
            rps = summarize(s, "rps")
            p50 = summarize(s, "p50_us")
            p99 = summarize(s, "p99_us")
            util = summarize(s, "envoy_cpu_util")
            other = summarize(s, "other_cpu")
            headline[(conns, name)] = {"cpu": cpu, "rps": rps, "p50": p50, "p99": p99}
            lines.append(
                f"| {LABELS[name]} | {fmt_range(*cpu)} | {fmt_range(*rps, nd=0)} | {fmt_range(*p50, nd=0)} | "
                f"{fmt_range(*p99, nd=0)} | {fmt_range(*util)} | {fmt_range(*other)} |"
            )
        lines.append("")
        lines.append("| ratio (CPU us/request) | ratio of medians | per-round range |")
        lines.append("|---|---|---|")
        for num, den in [("ours", "floor"), ("ours_hdrs", "floor"), ("ours", "native"), ("ours", "none"),
                         ("ours_hdrs", "none"), ("floor", "none"), ("native", "none")]:  # fmt: skip
            pr = paired_ratios(sub, num, den, "cpu_us_per_req")
            if (conns, num) not in headline or (conns, den) not in headline:
                continue
            rm = div(headline[(conns, num)]["cpu"][0], headline[(conns, den)]["cpu"][0])
            headline[(conns, f"{num}/{den}")] = (rm, min(pr), max(pr))
            lines.append(f"| {num} / {den} | {rm:.3f} | {min(pr):.3f}-{max(pr):.3f} |")
    lines += errors_note(rows)
    return "\n".join(lines), headline


def spread_table(rows: list[dict], tenant_counts) -> tuple[str, dict]:
    lines = [
        "| tenants | native us/req | floor us/req | ours us/req | ours / floor | ours / native | ours / floor per-round |",
        "|---|---|---|---|---|---|---|",
    ]
    res = {}
    for nt in tenant_counts:
        sub = [r for r in rows if r["tenants"] == nt]
        m = {n: summarize([r for r in sub if r["listener"] == n], "cpu_us_per_req") for n in SPREAD_LISTENERS}
        pr = paired_ratios(sub, "ours", "floor", "cpu_us_per_req")
        rf = div(m["ours"][0], m["floor"][0])
        rn = div(m["ours"][0], m["native"][0])
        res[nt] = rf
        lines.append(
            f"| {nt:,} | {fmt_range(*m['native'])} | {fmt_range(*m['floor'])} | {fmt_range(*m['ours'])} | "
            f"{rf:.3f} | {rn:.3f} | {min(pr):.3f}-{max(pr):.3f} |"
        )
    return "\n".join(lines), res


def accuracy_table(rows: list[dict]) -> str:
    lines = [
        "| workers | filter | t (s) | requests | admitted (Envoy 2xx) | capacity + rate*t | admitted - bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['filter']} | {r['seconds']:.2f} | {r['requests']:,} | {r['admitted']:,} | "
            f"{r['bound']:.1f} | {r['over']:+.1f} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    lines = [
        "| filter | distinct tenants | requests (step) | RSS before (MiB) | RSS after (MiB) | delta (MiB) | bytes/tenant | live slots |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for s in r["steps"]:
            d = s["rss_kib"] - r["rss0_kib"]
            per = d * 1024 / s["tenants"] if s["tenants"] else 0
            slots = "" if s["live_slots"] is None else f"{s['live_slots']:,}"
            lines.append(
                f"| {r['filter']} | {s['tenants']:,} | {s['requests']:,} | {r['rss0_kib'] / 1024:.1f} | {s['rss_kib'] / 1024:.1f} | "
                f"{d / 1024:.1f} | {per:.0f} | {slots} |"
            )
    return "\n".join(lines)


def plots(rows: list[dict], conns_list, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(conns_list)
    for i, conns in enumerate(conns_list):
        meds, lo, hi = [], [], []
        for name in PERF_LISTENERS:
            m, a, b = summarize([r for r in rows if r["conns"] == conns and r["listener"] == name], "cpu_us_per_req")
            meds.append(m), lo.append(m - a), hi.append(b - m)
        xs = [j + (i - (len(conns_list) - 1) / 2) * width for j in range(len(PERF_LISTENERS))]
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=f"{conns} conn")
    ax.set_xticks(range(len(PERF_LISTENERS)), [LABELS[n] for n in PERF_LISTENERS], rotation=12)
    ax.set_ylabel("Envoy CPU us / request (median, min-max)")
    ax.set_title("Envoy CPU per request by listener (1 worker)")
    files.append(save(plt, fig, ax, outdir / "cpu_per_request.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in PERF_LISTENERS:
        ys = [summarize([r for r in rows if r["conns"] == c and r["listener"] == name], "rps")[0] for c in conns_list]
        ax.plot(conns_list, ys, marker="o", label=LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_xticks(conns_list, [str(c) for c in conns_list])
    ax.set_xlabel("connections")
    ax.set_ylabel("requests/s (median)")
    ax.set_title("Throughput by connections (1 Envoy worker, 1 core)")
    files.append(save(plt, fig, ax, outdir / "rps_by_connections.png"))
    return files


def save(plt, fig, ax, path: Path) -> Path:
    """Legend, layout, write `path`, close the figure."""
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def where_we_stand(head: dict, conns_list, acc: list[dict], spread: dict, perf: list[dict]) -> str:
    lines = []
    other = med([r["other_cpu"] for r in perf])
    if other > 1.2:
        lines.append(
            f"- **Caveat: the machine was not quiet.** Median CPUs busy with something other than Envoy during "
            f"the runs: {other:.2f} (wrk alone accounts for at most ~1.0). Absolute numbers are inflated and "
            f"noisy; the interleaved same-round ratios are the robust part. Re-run `make bench` on an idle machine."
        )
    big = max(conns_list)
    for conns in conns_list:
        r = head.get((conns, "ours/floor"))
        if r:
            aim = "; aim 1.05x " + verdict(r[0] <= TARGET_OFF_AIM)
            lines.append(
                f"- Headers off, {conns} conn: {r[0]:.3f}x the floor (per-round {r[1]:.3f}-{r[2]:.3f}); "
                f"target <= {TARGET_OFF_MAX}x {verdict(r[0] <= TARGET_OFF_MAX)}{aim}."
            )
    for conns in conns_list:
        r = head.get((conns, "ours_hdrs/floor"))
        if r:
            lines.append(
                f"- Headers on, {conns} conn: {r[0]:.3f}x the floor (per-round {r[1]:.3f}-{r[2]:.3f}); "
                f"target <= {TARGET_HDRS_MAX}x {verdict(r[0] <= TARGET_HDRS_MAX)}."
            )
    for r in acc:
        if r["filter"] == "ours":
            lines.append(
                f"- Over-admission, ours, {r['workers']} workers: admitted {r['admitted']} vs bound {r['bound']:.1f} "
                f"({r['over']:+.1f}); target <= +1 token {verdict(r['over'] <= 1.0)}."
            )
    if (big, "ours") in head and (big, "none") in head:
        for name in ("ours", "ours_hdrs"):
            added = head[(big, name)]["p99"][0] - head[(big, "none")]["p99"][0]
            lines.append(
                f"- p99 added over no filter at {big} connections ({LABELS[name]}): {added:.0f} us "
                f"(median p99 {head[(big, name)]['p99'][0]:.0f} vs {head[(big, 'none')]['p99'][0]:.0f} us); "
                f"target < {TARGET_P99_ADDED_US:.0f} us {verdict(added < TARGET_P99_ADDED_US)}."
            )
    if spread:
        worst = max(spread.items(), key=lambda kv: kv[1])
        lines.append(
            f"- Tenant spread: ours/floor {', '.join(f'{v:.3f}x at {k:,}' for k, v in spread.items())} tenants "
            f"(worst {worst[1]:.3f}x at {worst[0]:,}; informational, the targets are stated for one hot tenant)."
        )
    return "\n".join(lines)


def write_report(path: Path, ctx: dict) -> None:
    c = ctx
    md = f"""# tenant-ratelimit benchmark results

Generated by `bench/bench.py` on {c['date']}{' (SMOKE RUN: 1 round, 1 s per measurement; numbers are not meaningful)' if c['smoke'] else ''}.

Command: `{c['command']}`

## Machine and versions

- CPUs: {c['nproc']} x {c['cpu']}; pinning: {c['pinning']}
- Kernel: {c['kernel']}
- Envoy: `{c['envoy_version']}` (V8 runtime)
- rustc: `{c['rustc']}`
- wrk: `{c['wrk_version']}`
- Clock ticks per second (CPU accounting resolution): {CLK_TCK}

## Method

One Envoy process, `--concurrency 1`, pinned to one core; wrk (`-t1`) pinned to the other;
loopback only; every listener answers with a direct response (no upstream). All listeners live in
ONE bootstrap and each Wasm listener has its own `vm_id`/`root_id`. Every request carries
`x-tenant-id: tenant-1` (a static wrk header, same bytes for every listener).

- **CPU us/request** = delta of Envoy's utime+stime (`/proc/<pid>/stat`, whole process) over a
  wrk run / requests wrk completed. **Envoy CPU util** = Envoy CPU seconds / wall seconds
  (about 1.0 means Envoy's core was saturated). **Other CPU** = CPUs busy with anything but
  Envoy during the run (`/proc/stat`), wrk included (at most about 1.0); above that, something
  else was running on the machine and the numbers are noisier. Load average at start / end:
  {c['load_start']} / {c['load_end']}.
- {c['rounds']} interleaved rounds; each round visits every connection count and every listener
  (listener order rotated per round); {c['seconds']} s per measurement after a {c['warm']} s warm-up
  per listener. Cells show **median (min-max)** over rounds. Ratios: the ratio of the medians, and
  the range of the per-round (same-round, paired) ratios.
- Buckets never deny during these runs: ours `capacity`/`refill_rate` = {HUGE:,}, `max_tenants` {c['perf_max_tenants']:,};
  native `local_ratelimit` per-tenant wildcard descriptor (`rate_limits` on `x-tenant-id`,
  `max_dynamic_descriptors` {c['perf_max_tenants']:,}) with a {HUGE:,}-token bucket.
- p50/p99 are wrk's (closed loop: at 16 and 64 connections latency is mostly queueing, so p99
  differences there track throughput differences).

## Headline (CPU per request, {max(c['conns'])} connections)

{c['headline']}

## Where we stand

{c['stand']}

## CPU, throughput and latency by listener
{c['perf']}

![CPU per request](cpu_per_request.png)
![requests/s by connections](rps_by_connections.png)

## Tenant spread

wrk's Lua `request()` rotates `x-tenant-id` over N tenants (the same script for every listener),
{c['spread_conns']} connections, {c['spread_rounds']} interleaved rounds of {c['spread_seconds']} s, median (min-max).

{c['spread']}

## Admission accuracy

`capacity` 100, `refill_rate` 50/s, one hot tenant (fresh bucket), 64 keep-alive connections
(wrk `-t2`, unpinned) for {c['acc_seconds']} s against a separate Envoy with 2 and then 4 workers.
Admitted = the listener's `downstream_rq_2xx` delta from Envoy's stats; t = wrk's run duration.
Native: the same wildcard descriptor, `max_tokens` 100, `tokens_per_fill` 50, `fill_interval` 1 s,
`local_rate_limit_per_downstream_connection` false (default: one bucket per Envoy process, shared
by the workers).

{c['accuracy']}

## Memory

A separate Envoy (1 worker) per filter; RSS (`VmRSS`) after one warm-up request, then after
sending distinct tenants (ids handed out one after another by one wrk Lua counter, 8 keep-alive
connections), cumulatively. Every bucket stays short of full during the run (ours: `capacity` 100,
`refill_rate` 0.001/s, `max_tenants` {c['mem_max_tenants']:,}, so no slot is reused; native: `max_tokens` 100,
1 token/s, `max_dynamic_descriptors` {c['mem_max_tenants']:,}). Requests = wrk's count for that step (a few
more than the new tenants: requests in flight when the step stops).

{c['memory']}

{c['global']}
## Module size

| module | bytes |
|---|---|
| ours (`{c['wasm_name']}`) | {c['wasm_size']:,} |
| no-op floor (`bench/noop`) | {c['noop_size']:,} |

Wall time of this run: {c['wall']:.0f} s.
"""
    path.write_text(md)


def global_section(g: dict, load_start: str = "", load_end: str = "") -> str:
    """The `## Global limits` section of RESULTS.md."""
    head = "## Global limits\n\n"
    if "skipped" in g:
        return head + f"Skipped: {g['skipped']}.\n"
    rows = g["rows"]
    lim = g["limit"]
    lines = [
        f"Our filter asking the rate-limit service (`global` section) against the same filter with local "
        f"buckets only. One Envoy (`--concurrency 1`, pinned like the perf phase), one listener per "
        f"variant (its own `root_id`/`vm_id`). Two topologies, each a STATIC HTTP/2 cluster: ONE "
        f"`tenant-ratelimit-service` on ONE `redis-server`, and TWO services (round robin) on a Redis "
        f"Cluster of 3 masters + 3 replicas; all on loopback and unpinned (they share the machine with "
        f"wrk). One hot tenant (`x-tenant-id: tenant-1`, so one bucket on one master), {g['conns']} "
        f"connections, {g['rounds']} interleaved round{'s' if g['rounds'] != 1 else ''} of "
        f"{g['seconds']} s after a {g['warm']} s warm-up per listener; median (min-max) over rounds.",
        "",
        f"Nothing is denied: the service's bucket is {lim['capacity']:,} at {lim['refill_rate']} per tenant "
        f"(a slow refill, so leases live: a lease ends when the bucket would be full again), "
        f"the local bucket {HUGE:,} at {HUGE:,}/s; `timeout_ms` {g['timeout_ms']}, `failure_mode` allow. "
        f"**Service + Redis CPU** = utime+stime of the service process(es) and of every Redis process "
        f"(replicas included) per request; **per decision** = the same split by service calls "
        f"(`global_calls`); **calls/s** = service calls per second the run sustained; **added p50/p99** = "
        f"the row's latency minus local only's in the same round (median over rounds); **Redis cmds/call** "
        f"= INFO commandstats on the masters per service call: sent (EVALSHA + EVAL) / run (with the "
        f"commands inside the script: TIME, the reads, the writes); **errors** = "
        f"`global_errors` (service errors and timeouts, each admitted) summed over rounds; **other CPU** = "
        f"CPUs busy with anything but Envoy (wrk, and here the service and Redis too). "
        f"Redis: `{g['versions']['redis'].split(' sha=')[0]}`."
        + (f" Load average at start / end of this phase: {load_start} / {load_end}." if load_start else ""),
        "",
        "| listener | requests/s | p99 us | Envoy CPU us/request | CPU / local (per-round) | service + Redis CPU us/request "
        "| calls/request | errors | other CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in GLOBAL_LISTENERS:
        s = [r for r in rows if r["listener"] == name]
        if not s:
            continue
        pr = paired_ratios(rows, name, "g_local", "cpu_us_per_req")
        ratio = "1" if name == "g_local" else f"{med(pr):.2f} ({min(pr):.2f}-{max(pr):.2f})"
        lines.append(
            f"| {GLOBAL_LABELS[name]} | {fmt_range(*summarize(s, 'rps'), nd=0)} | {fmt_range(*summarize(s, 'p99_us'), nd=0)} "
            f"| {fmt_range(*summarize(s, 'cpu_us_per_req'))} | {ratio} | {fmt_range(*summarize(s, 'service_cpu_us_per_req'))} "
            f"| {med([r['calls_per_req'] for r in s]):.3f} | {sum(r['global_errors'] for r in s):,} "
            f"| {med([r['other_cpu'] for r in s]):.2f} |"
        )
    lines += [
        "",
        "The service itself, per decision (one `ShouldRateLimit` call):",
        "",
        "| listener | service CPU us/decision | Redis CPU us/decision | calls/s | added p50 us | added p99 us "
        "| Redis cmds/call sent / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in GLOBAL_LISTENERS:
        s = [r for r in rows if r["listener"] == name and GLOBAL_SECTIONS[name] is not None]
        if not s:
            continue
        lines.append(
            f"| {GLOBAL_LABELS[name]} | {fmt_range(*summarize(s, 'svc_cpu_us_per_call'))} "
            f"| {fmt_range(*summarize(s, 'redis_cpu_us_per_call'))} | {fmt_range(*summarize(s, 'calls_per_s'), nd=0)} "
            f"| {med([r['added_p50_us'] for r in s]):.0f} | {med([r['added_p99_us'] for r in s]):.0f} "
            f"| {med([r['redis_sent_per_call'] for r in s]):.2f} / {med([r['redis_cmds_per_call'] for r in s]):.2f} |"
        )
    lines += errors_note(rows)
    lines += open_loop_lines(g.get("open_loop"))
    return head + "\n".join(lines) + "\n"


def open_loop_lines(ol: dict | None) -> list[str]:
    """The service alone at a fixed rate, open loop (bench/phases/global_.py `open_loop`)."""
    if not ol:
        return []
    lines = [
        "",
        f"The service alone at a fixed {ol['rate']:,} calls/s, open loop (`service/examples/rls_load.rs`: each "
        f"call sent on schedule and timed from its scheduled send, so queueing counts; one HTTP/2 connection "
        f"per service, as an Envoy worker keeps; {ol['seconds']} s after {ol.get('warm', 0)} s of warm-up; Envoy stopped). "
        f"Latency is what a request in mode global waits for its call, measured at the gRPC client:",
        "",
        "| topology | calls | errors | p50 us | p90 us | p99 us | p99.9 us | max us | service CPU us/decision "
        "| Redis CPU us/decision | EVALSHA/call | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ol["rows"].values():
        lines.append(
            f"| {r['label']} | {r['calls']:,} | {r['errors']} | {r['p50_us']} | {r['p90_us']} | {r['p99_us']} "
            f"| {r['p999_us']} | {r['max_us']} | {r['svc_cpu_us_per_call']:.1f} | {r['redis_cpu_us_per_call']:.1f} "
            f"| {r['redis_sent_per_call']:.2f} | {r['load']} |"
        )
    return lines

