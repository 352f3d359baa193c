"""The oslo.messaging baseline of `warren bench`: the same workloads, the same JSON.

Run in the venv scripts/ensure-oslo-venv sets up (scripts/bench-compare does):

    target/oslo-venv/bin/python benches/oslo_bench.py --mode call --clients 16 --duration 10 --json

Servers (oslo RPCServer, threading executor with --workers threads) and client threads (one
shared RPC transport, RPCClient.call / cast) run in this process, like `warren bench --role
both`. oslo.messaging always waits for publisher confirms and always speaks its JSON wire
format, so --confirm and --codec are reported as "on" and "json" whatever is asked. Every
queue the run declares is deleted at the end.
"""

import argparse
import json
import math
import resource
import sys
import threading
import time
import uuid

import amqp
from oslo_config import cfg
import oslo_messaging


class Stats:
    """Completed operations, per-second counts, per-call latencies, errors by kind."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.latencies = []
        self.errors = {"timeout": 0, "remote": 0, "delivery": 0, "other": 0}
        self.started = time.monotonic()
        self.first_start = None
        self.last_done = None
        self.per_second = []

    def starting(self):
        if self.first_start is None:
            with self.lock:
                if self.first_start is None:
                    self.first_start = time.monotonic()

    def done(self, latency=None):
        with self.lock:
            self.ok += 1
            self.last_done = time.monotonic()
            if latency is not None:
                self.latencies.append(latency)

    def record(self, latency):
        """A cast's publish time (not a completed operation: the server counts those)."""
        with self.lock:
            self.latencies.append(latency)

    def error(self, kind, exc):
        with self.lock:
            if self.errors[kind] == 0:
                sys.stderr.write("first error of its kind: %r\n" % (exc,))
            self.errors[kind] += 1

    def quantile(self, q, ordered):
        if not ordered:
            return 0
        rank = min(len(ordered), max(1, math.ceil(q * len(ordered))))
        return int(ordered[rank - 1] * 1e6)

    def ticker(self, stop, quiet):
        last = 0
        second = 0
        while not stop.is_set():
            second += 1
            due = self.started + second
            while time.monotonic() < due and not stop.is_set():
                time.sleep(min(0.05, max(0.0, due - time.monotonic())))
            with self.lock:
                ok = self.ok
                ordered = sorted(self.latencies[-5000:])
            self.per_second.append(ok - last)
            if not quiet:
                sys.stderr.write(
                    "[%3ds] %8d/s  p50 %6d us  p99 %6d us  errors %d\n"
                    % (second, ok - last, self.quantile(0.5, ordered),
                       self.quantile(0.99, ordered), sum(self.errors.values())))
            last = ok

    def report(self, fields, duration):
        ordered = sorted(self.latencies)
        active = 0.0
        if self.first_start is not None and self.last_done is not None:
            active = max(0.0, self.last_done - self.first_start)
        report = dict(fields)
        report.update({
            "duration_s": round(duration, 3),
            "ok": self.ok,
            "errors": self.errors,
            "throughput_per_s": round(self.ok / active, 1) if active > 0 else 0.0,
            "latency_us": {
                "p50": self.quantile(0.5, ordered),
                "p90": self.quantile(0.9, ordered),
                "p99": self.quantile(0.99, ordered),
                "max": int(ordered[-1] * 1e6) if ordered else 0,
            },
            "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "per_second": self.per_second,
        })
        return report


class BenchEndpoint:
    def __init__(self, stats):
        self.stats = stats

    def echo(self, ctxt, payload):
        return payload

    def sink(self, ctxt, payload):
        if self.stats is not None:
            self.stats.starting()
            self.stats.done()


def classify(exc):
    if isinstance(exc, oslo_messaging.MessagingTimeout):
        return "timeout"
    if isinstance(exc, oslo_messaging.MessageDeliveryFailure):
        return "delivery"
    if isinstance(exc, oslo_messaging.RemoteError):
        return "remote"
    return "other"


def delete_queues(url, queues):
    parsed = oslo_messaging.TransportURL.parse(cfg.CONF, url)
    host = parsed.hosts[0]
    connection = amqp.Connection(
        host="%s:%d" % (host.hostname or "127.0.0.1", host.port or 5672),
        userid=host.username or "guest", password=host.password or "guest",
        virtual_host=parsed.virtual_host or "/")
    connection.connect()
    try:
        for queue in queues:
            channel = connection.channel()
            try:
                channel.queue_delete(queue)
            except Exception as exc:  # a refusal closes this channel only
                sys.stderr.write("cannot delete queue %s: %s\n" % (queue, exc))
            try:
                channel.close()
            except Exception:
                pass
    finally:
        connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="rabbit://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--mode", choices=["call", "cast", "fanout"], default="call")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--count", type=int)
    parser.add_argument("--codec", default="json")
    parser.add_argument("--confirm", default="on")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.duration is None and args.count is None:
        args.duration = 10.0

    cfg.CONF([], project="warren-bench")
    topic = "oslo-bench-%s" % uuid.uuid4().hex[:12]
    stats = Stats()
    started = time.monotonic()
    end = started + args.duration if args.duration is not None else None
    remaining = [args.count]
    claim_lock = threading.Lock()

    def claim():
        if end is not None and time.monotonic() >= end:
            return False
        if remaining[0] is None:
            return True
        with claim_lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    servers = []
    queues = [topic]
    count_casts = args.mode != "call"
    for i in range(args.servers):
        name = "bench-%d" % i
        queues.append("%s.%s" % (topic, name))
        transport = oslo_messaging.get_rpc_transport(cfg.CONF, url=args.url)
        server = oslo_messaging.get_rpc_server(
            transport, oslo_messaging.Target(topic=topic, server=name),
            [BenchEndpoint(stats if count_casts else None)], executor="threading")
        # Registered by the server; read when it starts its executor.
        cfg.CONF.set_override("executor_thread_pool_size", args.workers)
        server.start()
        servers.append((server, transport))

    transport = oslo_messaging.get_rpc_transport(cfg.CONF, url=args.url)
    target = oslo_messaging.Target(topic=topic, fanout=args.mode == "fanout")
    client = oslo_messaging.get_rpc_client(transport, target, timeout=args.timeout)
    payload = "x" * args.payload
    if args.mode == "call":
        client.call({}, "echo", payload="")  # connections and reply queue, unmeasured

    stop = threading.Event()
    ticker = threading.Thread(target=stats.ticker, args=(stop, args.quiet), daemon=True)
    ticker.start()
    sent = [0]

    def run_client():
        while claim():
            stats.starting()
            begun = time.monotonic()
            try:
                if count_casts:
                    client.cast({}, "sink", payload=payload)
                    stats.record(time.monotonic() - begun)
                    with claim_lock:
                        sent[0] += 1
                else:
                    echoed = client.call({}, "echo", payload=payload)
                    if len(echoed) == len(payload):
                        stats.done(time.monotonic() - begun)
                    else:
                        stats.error("other", "wrong echo")
            except Exception as exc:
                stats.error(classify(exc), exc)

    threads = [threading.Thread(target=run_client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if count_casts:
        copies = args.servers if args.mode == "fanout" else 1
        until = end if end is not None else time.monotonic() + 60
        while stats.ok < sent[0] * copies and time.monotonic() < until:
            time.sleep(0.002)
    stop.set()
    ticker.join()
    # The client's reply queue (oslo leaves it to expire; the bench removes what it caused).
    reply_queue = getattr(getattr(transport, "_driver", None), "_reply_q", None)
    if reply_queue:
        queues.append(reply_queue)
    for server, _ in servers:
        server.stop()
    for server, server_transport in servers:
        server.wait()
        server_transport.cleanup()
    transport.cleanup()
    delete_queues(args.url, queues)

    report = stats.report({
        "tool": "oslo.messaging",
        "mode": args.mode,
        "role": "both",
        "clients": args.clients,
        "servers": args.servers,
        "workers": args.workers,
        "codec": "json",
        "payload": args.payload,
        "confirm": "on",
    }, time.monotonic() - started)
    print("oslo.messaging %s clients=%d payload=%dB: %d ok = %.1f/s; p50 %d us p99 %d us; errors %s"
          % (args.mode, args.clients, args.payload, report["ok"], report["throughput_per_s"],
             report["latency_us"]["p50"], report["latency_us"]["p99"], report["errors"]))
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
