#!/usr/bin/env python3
"""Issue 12's scorecard: runs every performance bench in one sitting and prints one table of
figure, target, value and whether it is met.

    python3 scripts/scorecard.py            # the full run (~20 min on the 2-core machine)
    python3 scripts/scorecard.py --quick    # smaller sizes and shorter phases (~8 min)
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
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
BEGIN = "<!-- scorecard: written by scripts/scorecard.py --write -->"
END = "<!-- /scorecard -->"


class BenchError(Exception):
    """A bench failed, or printed no figure where one was expected."""


def bench(name, env):
    """Runs `cargo bench --bench NAME` with `env` added; returns its stdout."""
    full = dict(os.environ, **{k: str(v) for k, v in env.items()})
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


def pipeline(events, customers, extra=""):
    """One pipeline run: its figures, and the broker it ran against."""
    out = bench(
        "pipeline",
        {"BENCH_EVENTS": events, "BENCH_CUSTOMERS": customers, "BENCH_TIERD_TOML": extra},
    )
    return {
        "ceiling": figure(out, r"^\| \(a\) raw consume ceiling.*\| ([\d.]+) msg/s \|$", "ceiling"),
        "published": figure(out, r"^\| \(b'\) .*\| ([\d.]+) events/s \|$", "(b') throughput"),
        "rss": figure(out, r"^\| \(c\) tierd peak RSS .*\| ([\d.]+) MiB \|$", "peak RSS"),
        "per_customer": figure(out, r"^\| \(d\) Redis memory per customer \| ([\d.]+) B \|$", "Redis per customer"),
        "tierd_us": figure(out, r"^\| tierd CPU time .*= ([\d.]+) µs per event \|$", "tierd CPU"),
        "redis_us": figure(out, r"^\| Redis CPU time .*= ([\d.]+) µs per event \|$", "Redis CPU"),
        "broker": re.search(r"broker (Apache Kafka [\d.]+|external broker \S+)", out).group(1),
    }


def p99(out):
    return figure(out, r"^\| p99 \| ([\d.]+) ms \|$", "p99")


def rank_rows(out):
    """(customers, µs per crosser) of each row of the rank_scale table."""
    rows = re.findall(r"^\| (\d+) \|.*\| ([\d.]+) µs \| [\d.]+ MiB \|$", out, re.MULTILINE)
    if len(rows) < 2:
        raise BenchError(f"fewer than two sizes in the rank_scale output:\n{out}")
    return [(int(n), float(us)) for n, us in rows]


def k(n):
    """1000000 → 1M, 300000 → 300k."""
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def main():
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--quick", action="store_true", help="smaller sizes, shorter phases")
    args.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    opts = args.parse_args()
    q = opts.quick
    events, customers = (300_000, 30_000) if q else (1_000_000, 100_000)
    big_customers = 300_000 if q else 1_000_000
    pyramid = '[rules]\npath = "{}"\n'.format(ROOT / "config" / "rules" / "pyramid.toml")
    started = datetime.datetime.now(datetime.timezone.utc)

    default = pipeline(events, customers)
    pyr = pipeline(events, customers, pyramid)
    big = pipeline(2 * big_customers, big_customers)
    instructions = figure(
        bench("instructions", {}),
        r"^\| instructions per event \(marginal\) \| ([\d.]+) \|$",
        "instructions per event",
    )
    half = int(default["published"] / 2)
    warm = {"BENCH_WARMUP_SECS": 10 if q else 60, "BENCH_SECS": 10 if q else 20}
    latency = p99(bench("latency", dict(warm, BENCH_RATE=half)))
    api = p99(bench("api", dict(warm, BENCH_API_RATE=10_000)))
    sizes = "100000,1000000" if q else "1000000,10000000"
    ranks = rank_rows(bench("rank_scale", {"BENCH_RANK_SCALE_SIZES": sizes}))

    def pct(run):
        return 100.0 * run["published"] / run["ceiling"]

    (n0, us0), (n1, us1) = ranks[0], ranks[-1]
    rows = [
        ("throughput until published / raw ceiling, default rules", "≥ 85 %",
         f"{pct(default):.0f} % ({default['published']:,.0f} of {default['ceiling']:,.0f}/s)", pct(default) >= 85),
        ("the same, pyramid rules", "≥ 85 %",
         f"{pct(pyr):.0f} % ({pyr['published']:,.0f} of {pyr['ceiling']:,.0f}/s)", pct(pyr) >= 85),
        ("tierd CPU per event", "≤ 3 µs", f"{default['tierd_us']:.1f} µs", default["tierd_us"] <= 3),
        ("Redis CPU per event", "≤ 2 µs", f"{default['redis_us']:.1f} µs", default["redis_us"] <= 2),
        ("instructions per event (callgrind, fixed input)", "tracked", f"{instructions:,.0f}", None),
        (f"tierd peak RSS at {k(big_customers)} customers", "≤ 100 MiB (at 1M)",
         f"{big['rss']:.0f} MiB", big["rss"] <= 100 if not q else None),
        ("Redis per customer, default (threshold) rules", "≤ 200 B", f"{default['per_customer']:.0f} B",
         default["per_customer"] <= 200),
        ("Redis per customer, pyramid rules", "reported", f"{pyr['per_customer']:.0f} B", None),
        (f"purchase → change p99 at {half:,}/s (half the maximum)", "≤ 50 ms", f"{latency:.1f} ms", latency <= 50),
        ("GET /v1/customers/{id} p99 at 10,000/s under ingestion", "< 1 ms", f"{api:.2f} ms", api < 1),
        (f"rank re-evaluation per crosser, {k(n0)} → {k(n1)} customers", "proportional (≤ 2×)",
         f"{us0:.1f} → {us1:.1f} µs", us1 <= 2 * us0),
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
        doc = DOC.read_text()
        start, end = doc.index(BEGIN), doc.index(END)
        DOC.write_text(doc[: start + len(BEGIN)] + "\n" + table + "\n" + doc[end:])
        print(f"scorecard: written to {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except BenchError as error:
        sys.exit(f"scorecard: {error}")
