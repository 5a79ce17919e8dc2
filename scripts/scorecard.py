#!/usr/bin/env python3
"""Issue 12's scorecard: runs every performance bench in one sitting and prints one table of
figure, target, value and whether it is met.

    python3 scripts/scorecard.py            # the full run (~7 min on the 2-core machine)
    python3 scripts/scorecard.py --quick    # smaller sizes, shorter phases, nothing judged
                                            # that the targets state at larger sizes
    python3 scripts/scorecard.py --write    # also writes the table into docs/performance.md

Each bench starts its own broker and Redis (see docs/performance.md for what each measures);
this script only runs them one after the other (never two at once: they share the 2 cores),
reads the figures they print and compares them with the targets. A bench that fails, or
prints no figure the script can read, stops the run with its output: a scorecard with a
missing row would read as a pass.

Set CARGO_TARGET_DIR as for any bench (e.g. /work/target-release, so the release build is
kept apart from the test build).
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
BEGIN = "<!-- scorecard: written by scripts/scorecard.py --write -->"
END = "<!-- /scorecard -->"


class BenchError(Exception):
    """A bench failed, or printed no figure where one was expected."""


def settle():
    """Waits until the previous bench's broker, Redis and tierd are gone (up to a minute), then
    a few seconds more: one run's API p99 was 1 s right after the latency bench, 34 ms alone."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = subprocess.run(
            ["pgrep", "-f", r"kafka\.Kafka|redis-server|release/tierd"],
            capture_output=True,
            check=False,
        )
        if left.returncode != 0:
            break
        time.sleep(1)
    time.sleep(5)


def bench(name, env):
    """Runs `cargo bench --bench NAME` with `env` added, on a settled machine; returns its
    stdout."""
    settle()
    # Only the script's own BENCH_* settings: one left exported in the shell would silently
    # change a bench's input (the instructions bench's "fixed input" above all).
    full = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    full.update({k: str(v) for k, v in env.items()})
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"scorecard: {shown} cargo bench --bench {name}", file=sys.stderr, flush=True)
    run = subprocess.run(
        ["cargo", "bench", "--bench", name],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise BenchError(f"bench {name} failed ({run.returncode}):\n{run.stdout}\n{run.stderr[-4000:]}")
    return run.stdout


def figure(text, pattern, what):
    """The first group of `pattern` in `text`, as a float."""
    found = re.search(pattern, text, re.MULTILINE)
    if not found:
        raise BenchError(f"no {what} in the output:\n{text}")
    return float(found.group(1))


def rules(name):
    """tierd configuration running the rules preset `name` (config/rules/NAME.toml)."""
    return "[rules]\npath = {}\n".format(json.dumps(str(ROOT / "config" / "rules" / f"{name}.toml")))


def pipeline(events, customers, extra=""):
    """One pipeline run: its figures, and the broker it ran against."""
    out = bench(
        "pipeline",
        {"BENCH_EVENTS": events, "BENCH_CUSTOMERS": customers, "BENCH_TIERD_TOML": extra},
    )
    broker = re.search(r"broker (Apache Kafka [\d.]+|external broker [^,\s]+)", out)
    if not broker:
        raise BenchError(f"no broker named in the output:\n{out}")
    return {
        "ceiling": figure(out, r"^\| \(a\) raw consume ceiling.*\| ([\d.]+) msg/s \|$", "ceiling"),
        "published": figure(out, r"^\| \(b'\) .*\| ([\d.]+) events/s \|$", "(b') throughput"),
        "rss": figure(out, r"^\| \(c\) tierd peak RSS .*\| ([\d.]+) MiB \|$", "peak RSS"),
        "per_customer": figure(out, r"^\| \(d\) Redis memory per customer \| ([\d.]+) B \|$", "Redis per customer"),
        "tierd_us": figure(out, r"^\| tierd CPU time .*= ([\d.]+) µs per event \|$", "tierd CPU"),
        "redis_us": figure(out, r"^\| Redis CPU time .*= ([\d.]+) µs per event \|$", "Redis CPU"),
        "broker": broker.group(1),
    }


def percentiles(out):
    """p50, p99 and p99.9 of a latency bench's table, in ms."""
    return [figure(out, rf"^\| {p} \| ([\d.]+) ms \|$", p) for p in ("p50", "p99", "p99\\.9")]


def rank_rows(out):
    """(customers, slowest of the three cut-off searches in ms, µs per crosser listed) of each
    row of the rank_scale table."""
    rows = re.findall(
        r"^\| (\d+) \| ([\d.]+) ms \| ([\d.]+) ms \| ([\d.]+) ms \| \d+ × \d+ \|.*\| ([\d.]+) µs \| [\d.]+ MiB \|$",
        out,
        re.MULTILINE,
    )
    if len(rows) < 2:
        raise BenchError(f"fewer than two sizes in the rank_scale output:\n{out}")
    return [(int(n), max(float(a), float(b), float(c)), float(us)) for n, a, b, c, us in rows]


def k(n):
    """1000000 → 1M, 300000 → 300k."""
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def main():
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--quick", action="store_true", help="smaller sizes, shorter phases")
    args.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    opts = args.parse_args()
    q = opts.quick
    if q and opts.write:
        sys.exit("scorecard: --quick runs below the sizes the targets are stated at; not written")
    events, customers = (300_000, 30_000) if q else (1_000_000, 100_000)
    big_customers = 300_000 if q else 1_000_000
    started = datetime.datetime.now(datetime.timezone.utc)

    # tierd's default rules (config/rules/b2b.toml: spend thresholds over a yearly window).
    default = pipeline(events, customers, rules("b2b"))
    pyr = pipeline(events, customers, rules("pyramid"))
    big = pipeline(2 * big_customers, big_customers, rules("b2b"))
    instructions = figure(
        bench("instructions", {}),
        r"^\| instructions per event \(marginal\) \| ([\d.]+) \|$",
        "instructions per event",
    )
    half = int(default["published"] / 2)
    warm = {"BENCH_WARMUP_SECS": 10 if q else 60, "BENCH_SECS": 10 if q else 20}
    b2b = {"BENCH_TIERD_TOML": rules("b2b")}
    p50, p99, p999 = percentiles(bench("latency", dict(warm, BENCH_RATE=half, **b2b)))
    api = percentiles(bench("api", dict(warm, BENCH_API_RATE=10_000, **b2b)))[1]
    sizes = "100000,1000000" if q else "1000000,10000000"
    ranks = rank_rows(bench("rank_scale", {"BENCH_RANK_SCALE_SIZES": sizes}))

    def pct(run):
        return 100.0 * run["published"] / run["ceiling"]

    def judged(met):
        """`met`, or not judged in a quick run (below the sizes the target is stated at)."""
        return None if q else met

    (n0, search0, us0), (n1, search1, us1) = ranks[0], ranks[-1]
    rows = [
        ("throughput until published / raw ceiling, default rules (b2b)", "≥ 85 %",
         f"{pct(default):.0f} % ({default['published']:,.0f} of {default['ceiling']:,.0f}/s)",
         judged(pct(default) >= 85)),
        ("the same, pyramid rules (the outboxes empty once; later rank moves not waited for)", "≥ 85 %",
         f"{pct(pyr):.0f} % ({pyr['published']:,.0f} of {pyr['ceiling']:,.0f}/s)", judged(pct(pyr) >= 85)),
        ("tierd CPU per event, default rules", "≤ 3 µs", f"{default['tierd_us']:.2f} µs", default["tierd_us"] <= 3),
        ("Redis CPU per event, default rules", "≤ 2 µs", f"{default['redis_us']:.2f} µs", default["redis_us"] <= 2),
        ("instructions per event (callgrind, fixed input, B2B lifetime rules)", "tracked", f"{instructions:,.0f}", None),
        (f"tierd peak RSS at {k(big_customers)} customers ({k(2 * big_customers)} events)", "≤ 100 MiB at 1M",
         f"{big['rss']:.0f} MiB", judged(big["rss"] <= 100)),
        ("Redis per customer, default (threshold) rules", "≤ 200 B", f"{default['per_customer']:.1f} B",
         default["per_customer"] <= 200),
        ("Redis per customer, pyramid rules", "reported", f"{pyr['per_customer']:.1f} B", None),
        (f"purchase → change p99 at {half:,}/s (half the maximum), default rules", "≤ 50 ms", f"{p99:.1f} ms",
         judged(p99 <= 50)),
        ("… its p50 and p99.9", "reported", f"{p50:.1f} ms, {p999:.1f} ms", None),
        ("GET /v1/customers/{id} p99 at 10,000/s under ingestion (20,000/s), default rules", "< 1 ms", f"{api:.2f} ms", judged(api < 1)),
        (f"rank cut-off search (slowest of three), {k(n0)} → {k(n1)} customers", "flat (≤ 2×)",
         f"{search0:.2f} → {search1:.2f} ms", judged(search1 <= 2 * search0)),
        (f"rank re-evaluation per crosser listed, {k(n0)} → {k(n1)} customers", "proportional (≤ 2×)",
         f"{us0:.1f} → {us1:.1f} µs", judged(us1 <= 2 * us0)),
    ]
    mark = {True: "**met**", False: "not met", None: "—"}
    mode = " --quick" if q else ""
    lines = [
        f"Scorecard of {started:%Y-%m-%d %H:%M} UTC (`python3 scripts/scorecard.py{mode}`): "
        f"{os.cpu_count()} cores, broker {default['broker']}, Redis 7 on loopback; "
        f"{events:,} events over {customers:,} customers unless named.",
        "",
        "| figure | target | value | met? |",
        "|---|---|---|---|",
    ]
    lines += [f"| {what} | {target} | {value} | {mark[met]} |" for what, target, value, met in rows]
    table = "\n".join(lines)
    print(table)
    if opts.write:
        doc = DOC.read_text(encoding="utf-8")
        start, end = doc.index(BEGIN), doc.index(END)
        DOC.write_text(doc[: start + len(BEGIN)] + "\n" + table + "\n\n" + doc[end:], encoding="utf-8")
        print(f"scorecard: written to {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except BenchError as error:
        sys.exit(f"scorecard: {error}")
