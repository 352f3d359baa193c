"""Runs warren, bare amiquip and oslo.messaging on the same workloads and compares them.

Started by scripts/bench-compare (which builds the binaries and sets up the venv). Each round
runs every workload once per tool, the tools' order rotating from round to round, so that
drift of the machine hits all of them alike. The table shows, per workload and tool, the median
throughput over the rounds (with its median p50 latency), then warren's ratio to bare amiquip
and to oslo.messaging: the median of the per-round ratios, and each round's ratio.

Every tool prints the bench JSON (see reference/bench-contract.md) on its last stdout line;
the raw results go to target/bench/compare-<time>.json, the table to target/bench/compare-<time>.md.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

WORKLOADS = {
    # name: (label, bench arguments, whether oslo can run it, bare amiquip's server threads)
    #
    # Bare amiquip gets its best server thread count for the workload (measured on the
    # reference machine): one thread when it waits for nothing, four when each reply waits for
    # its confirm. warren runs --workers (default 16) throughout, as a deployment would.
    "call": ("sequential call, 100 B", ["--mode", "call", "--clients", "1"], True, 4),
    "call16": ("16 concurrent callers, 100 B", ["--mode", "call", "--clients", "16"], True, 4),
    "call-unconfirmed": ("sequential call, unconfirmed, 100 B",
                         ["--mode", "call", "--clients", "1", "--confirm", "off"], False, 1),
    "call16-unconfirmed": ("16 concurrent callers, unconfirmed, 100 B",
                           ["--mode", "call", "--clients", "16", "--confirm", "off"], False, 1),
    "cast": ("casts, confirmed, 100 B",
             ["--mode", "cast", "--clients", "1", "--confirm", "on"], True, 1),
    "cast-unconfirmed": ("casts, unconfirmed, 100 B",
                         ["--mode", "cast", "--clients", "1", "--confirm", "off"], False, 1),
    "call64k": ("sequential call, 64 KiB",
                ["--mode", "call", "--clients", "1", "--payload", "65536"], True, 4),
}
TOOLS = ["oslo", "bare", "warren"]
TITLES = {"oslo": "oslo.messaging 18.3.1", "bare": "bare amiquip", "warren": "warren"}


def command(tool, workload, options):
    _, workload_args, _, bare_workers = WORKLOADS[workload]
    common = workload_args + ["--duration", str(options.duration), "--json", "--quiet"]
    if tool == "warren":
        url = options.url
        if options.warren_query:
            url += ("&" if "?" in url else "?") + options.warren_query
        return (["target/release/warren", "--url", url, "bench",
                 "--codec", options.codec, "--workers", str(options.workers)] + common)
    if tool == "bare":
        return (["target/release/examples/bare_amiquip", "--url", options.url,
                 "--codec", options.codec, "--workers", str(bare_workers)] + common)
    oslo_url = options.url.replace("amqp://", "rabbit://", 1)
    return ([sys.executable, "benches/oslo_bench.py", "--url", oslo_url,
             "--workers", str(options.workers)] + common)


def perf_available():
    """Whether `perf stat` can count this machine's context switches and task clock."""
    try:
        done = subprocess.run(["perf", "stat", "-x,", "-e", "context-switches,task-clock",
                               "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "context-switches" in done.stderr


def perf_counts(path):
    """(context switches, task-clock ms) from a `perf stat -x,` output file."""
    counts = {}
    try:
        with open(path) as f:
            for line in f:
                fields = line.strip().split(",")
                if len(fields) > 2 and fields[0].replace(".", "", 1).isdigit():
                    counts[fields[2]] = float(fields[0])
    except OSError:
        return None
    if "context-switches" not in counts or "task-clock" not in counts:
        return None
    return counts["context-switches"], counts["task-clock"]


def run(tool, workload, options):
    cmd = command(tool, workload, options)
    perf_out = None
    if options.perf:
        os.makedirs("target/bench", exist_ok=True)
        perf_out = "target/bench/perf-stat.txt"
        cmd = ["perf", "stat", "-x,", "-e", "context-switches,task-clock",
               "-o", perf_out, "--"] + cmd
    try:
        done = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=options.duration * 6 + 60)
    except subprocess.TimeoutExpired:
        sys.stderr.write("  %s timed out\n" % " ".join(cmd))
        return None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        sys.stderr.write("  %s failed (exit %d): %s\n"
                         % (" ".join(cmd), done.returncode, done.stderr.strip()[-500:]))
        return None
    # Per operation over the whole process (client and server threads, set-up included):
    # context switches and CPU time, from perf stat.
    counts = perf_counts(perf_out) if perf_out else None
    operations = result.get("ok", 0)
    if counts and operations:
        result["perf"] = {"cs_per_op": counts[0] / operations,
                          "cpu_us_per_op": counts[1] * 1000.0 / operations}
    return result


def machine():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            memory = "%.0f GiB" % (kib / 1024 / 1024)
    except (OSError, ValueError, IndexError):
        pass
    broker = "?"
    try:
        status = subprocess.run(["rabbitmqctl", "-q", "version"], capture_output=True,
                                text=True, timeout=30)
        broker = "RabbitMQ " + status.stdout.strip() if status.returncode == 0 else "?"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "%d cores (%s), %s RAM, %s, Linux %s" % (
        os.cpu_count() or 0, cpu, memory, broker, platform.release())


def cell(results):
    ok = [r for r in results if r]
    if not ok:
        return "—"
    rate = statistics.median(r["throughput_per_s"] for r in ok)
    p50 = statistics.median(r["latency_us"]["p50"] for r in ok)
    errors = sum(sum(r["errors"].values()) for r in ok)
    text = "{:,.0f}/s (p50 {:,.0f} µs)".format(rate, p50)
    if errors:
        text += ", %d errors" % errors
    return text


def per_op(results, key):
    """The median of a perf figure per operation over the rounds, or None."""
    values = [r["perf"][key] for r in results if r and "perf" in r]
    return statistics.median(values) if values else None


def perf_cell(per_tool, key, fmt):
    """warren's figure / bare amiquip's, and their ratio."""
    ours, theirs = per_op(per_tool["warren"], key), per_op(per_tool["bare"], key)
    if ours is None or theirs is None:
        return "—"
    return (fmt + " / " + fmt + " (%.2f×)") % (ours, theirs, ours / theirs if theirs else 0)


def ratio(results, a, b):
    rounds = []
    for ours, theirs in zip(results[a], results[b]):
        if ours and theirs and theirs["throughput_per_s"] > 0:
            rounds.append(ours["throughput_per_s"] / theirs["throughput_per_s"])
    if not rounds:
        return "—"
    return "**%.2f×** (%s)" % (statistics.median(rounds), ", ".join("%.2f" % r for r in rounds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--codec", default="msgpack", choices=["msgpack", "json"],
                        help="codec of warren and bare amiquip (oslo.messaging: always json)")
    parser.add_argument("--workers", type=int, default=16, help="server worker threads")
    parser.add_argument("--only", help="comma-separated workloads: " + ", ".join(WORKLOADS))
    parser.add_argument("--warren-query", default="",
                        help="transport options for warren only, as a URL query "
                             "(e.g. single_connection=true)")
    parser.add_argument("--no-perf", dest="perf", action="store_false",
                        help="do not count context switches and CPU time with perf stat")
    parser.add_argument("--url", default=os.environ.get(
        "WARREN_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    options = parser.parse_args()
    names = options.only.split(",") if options.only else list(WORKLOADS)
    for name in names:
        if name not in WORKLOADS:
            parser.error("unknown workload %r" % name)

    if options.perf and not perf_available():
        sys.stderr.write("perf stat cannot count here; no per-call columns\n")
        options.perf = False
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {name: {tool: [] for tool in TOOLS} for name in names}
    for round_index in range(options.rounds):
        order = TOOLS[round_index % len(TOOLS):] + TOOLS[:round_index % len(TOOLS)]
        for name in names:
            label, _, oslo_ok, _ = WORKLOADS[name]
            for tool in order:
                if tool == "oslo" and not oslo_ok:
                    results[name][tool].append(None)
                    continue
                sys.stderr.write("round %d/%d: %s: %s\n"
                                 % (round_index + 1, options.rounds, label, TITLES[tool]))
                results[name][tool].append(run(tool, name, options))

    invocation = "scripts/bench-compare " + " ".join(sys.argv[1:])
    lines = [
        "Measured %s on %s." % (started.strftime("%Y-%m-%d"), machine()),
        "Command: `%s` (%d interleaved rounds of %gs per tool and workload; warren and bare "
        "amiquip use %s, oslo.messaging its JSON; warren and oslo.messaging servers have %d "
        "workers, bare amiquip its best thread count%s). \"Confirmed\" rows confirm every "
        "publish (requests, casts, replies) in every tool; \"unconfirmed\" rows none."
        % (invocation.strip(), options.rounds, options.duration, options.codec, options.workers,
           "; warren's transports with `%s`" % options.warren_query
           if options.warren_query else ""),
        "",
        "Per call (or cast), over the whole process (`perf stat -e context-switches,task-clock`, "
        "medians): warren / bare amiquip (ratio).",
        "",
        "| workload | %s | %s | %s | warren ÷ bare (rounds) | warren ÷ oslo (rounds) | "
        "context switches | CPU µs | warren peak RSS |"
        % (TITLES["oslo"], TITLES["bare"], TITLES["warren"]),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        per_tool = results[name]
        rss = [r["rss_kib"] for r in per_tool["warren"] if r]
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            WORKLOADS[name][0],
            cell(per_tool["oslo"]) if WORKLOADS[name][2] else "— (always confirms)",
            cell(per_tool["bare"]),
            cell(per_tool["warren"]),
            ratio(per_tool, "warren", "bare"),
            ratio(per_tool, "warren", "oslo"),
            perf_cell(per_tool, "cs_per_op", "%.1f"),
            perf_cell(per_tool, "cpu_us_per_op", "%.0f"),
            "%.1f MiB" % (max(rss) / 1024.0) if rss else "—",
        ))
    table = "\n".join(lines)
    print(table)
    os.makedirs("target/bench", exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    with open("target/bench/compare-%s.json" % stamp, "w") as f:
        json.dump({"options": vars(options), "results": results}, f, indent=1)
    with open("target/bench/compare-%s.md" % stamp, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
