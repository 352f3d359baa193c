"""Where the time of one call (or cast) goes: per thread group of warren and bare amiquip, and in the broker.

For each workload and round, runs warren and bare amiquip (the commands of compare.py, so the
same flags) and, in a window after a warm-up, counts with `perf stat --per-thread -p` the
context switches and CPU time of each thread of the process, and from /proc/<pid>/stat the CPU
time of the RabbitMQ node (beam.smp). Figures are per operation: counts in the window divided
by the operations in it (the run's throughput times the window). Thread names lose their
numbers, so the 16 `warren-worker-N` threads are one group. Prints a markdown table of medians
over the rounds. The broker is shared: run it on a quiet machine.

    scripts/bench-compare builds the binaries; then
    python3 benches/breakdown.py [--only call,call16] [--rounds 3] [--duration 8]
"""

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the workloads and the tools' command lines)

TOOLS = ["bare", "warren"]
WARM_UP = 2.0


def broker_pid(port):
    """The pid of the RabbitMQ node listening on `port` (private test nodes use other ports)."""
    done = subprocess.run(["ss", "-ltnpH", "sport = :%d" % port], capture_output=True,
                          text=True)
    found = re.search(r"pid=(\d+)", done.stdout)
    return int(found.group(1)) if found else None


def cpu_ticks(pid):
    """utime + stime of a process, in clock ticks."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def group(thread):
    """A thread's group: its name without the tid perf appends and without numbers."""
    return re.sub(r"[-\d]+$", "", thread) or thread


def measure(tool, workload, options):
    """{group: (cs/op, cpu µs/op)}, plus broker and totals, for one run."""
    window = options.duration - WARM_UP - 1.0
    cmd = compare.command(tool, workload, options)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(WARM_UP)
    beam = broker_pid(urllib.parse.urlsplit(options.url).port or 5672)
    before = cpu_ticks(beam) if beam else None
    perf_out = "target/bench/breakdown-perf.txt"
    subprocess.run(["perf", "stat", "--per-thread", "-x,", "-e", "context-switches,task-clock",
                    "-o", perf_out, "-p", str(proc.pid), "--", "sleep", str(window)],
                   capture_output=True)
    after = cpu_ticks(beam) if beam else None
    stdout, _ = proc.communicate(timeout=options.duration * 6 + 60)
    lines = [line for line in stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    operations = result["throughput_per_s"] * window
    switches = collections.Counter()
    cpu_ms = collections.Counter()
    with open(perf_out) as f:
        for line in f:
            fields = line.strip().split(",")
            if len(fields) < 4 or not fields[1].replace(".", "", 1).isdigit():
                continue
            if fields[3].startswith("context-switches"):
                switches[group(fields[0])] += float(fields[1])
            elif fields[3].startswith("task-clock"):
                cpu_ms[group(fields[0])] += float(fields[1])
    figures = {name: (switches[name] / operations, cpu_ms[name] * 1000.0 / operations)
               for name in cpu_ms}
    figures["process"] = (sum(switches.values()) / operations,
                          sum(cpu_ms.values()) * 1000.0 / operations)
    if before is not None:
        tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
        figures["broker"] = (None, (after - before) * tick_us / operations)
    figures["rate"] = (None, result["throughput_per_s"])
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    parser.add_argument("--codec", default="msgpack", choices=["msgpack", "json"])
    parser.add_argument("--workers", type=int, default=16, help="warren's server workers")
    parser.add_argument("--only", default="call,call-unconfirmed",
                        help="comma-separated workloads: " + ", ".join(compare.WORKLOADS))
    parser.add_argument("--warren-query", default="")
    parser.add_argument("--url", default=os.environ.get(
        "WARREN_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    options = parser.parse_args()
    os.makedirs("target/bench", exist_ok=True)
    for name in options.only.split(","):
        runs = {tool: [] for tool in TOOLS}
        for round_index in range(options.rounds):
            order = TOOLS if round_index % 2 == 0 else TOOLS[::-1]
            for tool in order:
                runs[tool].append(measure(tool, name, options))
        print("\n%s (medians of %d rounds; per operation)\n" % (compare.WORKLOADS[name][0],
                                                                 options.rounds))
        print("| tool | thread group | context switches | CPU µs |")
        print("|---|---|---|---|")
        for tool in TOOLS:
            groups = sorted({g for run in runs[tool] for g in run} - {"rate"},
                            key=lambda g: (g in ("process", "broker"), g))
            rate = statistics.median(run["rate"][1] for run in runs[tool])
            for g in groups:
                values = [run[g] for run in runs[tool] if g in run]
                switches = [v[0] for v in values if v[0] is not None]
                label = {"process": "**whole process**", "broker": "RabbitMQ node"}.get(g, g)
                print("| %s (%.0f/s) | %s | %s | %.1f |" % (
                    compare.TITLES[tool], rate, label,
                    "%.2f" % statistics.median(switches) if switches else "—",
                    statistics.median(v[1] for v in values)))


if __name__ == "__main__":
    main()
