"""A Python oslo.messaging peer for warren's interoperability tests.

Driven by the Rust tests over stdin/stdout, one JSON object per line.

  rpc-server  --url U --exchange E --topic T --server S
      An oslo RPCServer (threading executor). Prints {"event": "ready"}, then one event per
      cast it handles; stops cleanly when stdin closes.
  rpc-client  --url U --exchange E --topic T [--allow MODULE ...]
      Reads {"id", "op": "call"|"cast", "method", "args", "ctxt", "server", "version",
      "namespace", "timeout", "call_monitor_timeout", "fanout"} and answers {"id", "result"}
      or {"id", "error": {...}} describing the exception oslo raised.
  notify      --url U --exchange E --driver messagingv2|messaging --topic T --publisher P
      Reads {"id", "priority", "event_type", "payload", "ctxt"}; answers {"id", "sent": true}.
  listen      --url U --exchange E --topic T [--pool P] [--requeue-once EVENT_TYPE]
      An oslo notification listener; prints {"event": "ready"} then one event per
      notification.
"""

import argparse
import json
import sys
import threading
import time

from oslo_config import cfg
import oslo_messaging

OUT_LOCK = threading.Lock()


def emit(obj):
    with OUT_LOCK:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def wait_for_stdin_eof():
    for _ in sys.stdin:
        pass


class InstanceNotFound(Exception):
    """A nova-style exception: message built from kwargs, kwargs kept."""

    def __init__(self, message=None, **kwargs):
        self.kwargs = kwargs
        super().__init__(message or "Instance %(instance_id)s could not be found." % kwargs)


class MainEndpoint:
    target = oslo_messaging.Target(version="1.3")

    def __init__(self, server):
        self.server = server

    def echo(self, ctxt, **kwargs):
        return kwargs

    def whoami(self, ctxt):
        return self.server

    def types(self, ctxt):
        return {
            "int": 42,
            "negative": -7,
            "big": 2 ** 62,
            "float": 1.5,
            "small": 1e-05,
            "unicode": "h\u00e9llo \u2603 \U0001F680",
            "null": None,
            "true": True,
            "false": False,
            "list": [1, "two", [3.0, None]],
            "nested": {"a": {"b": {"c": [1, 2, 3]}}},
            "empty_list": [],
            "empty_dict": {},
        }

    def big(self, ctxt, size):
        return "x" * size

    def context(self, ctxt):
        return ctxt

    def fail(self, ctxt, message):
        raise ValueError(message)

    def not_found(self, ctxt, instance_id):
        raise InstanceNotFound(instance_id=instance_id)

    @oslo_messaging.expected_exceptions(KeyError)
    def expected(self, ctxt, key):
        raise KeyError(key)

    def sleep(self, ctxt, seconds):
        time.sleep(seconds)
        return seconds

    def count(self, ctxt, n):
        emit({"event": "cast", "n": n, "server": self.server})


class AdminEndpoint:
    target = oslo_messaging.Target(namespace="admin", version="2.1")

    def __init__(self, server):
        self.server = server

    def reset(self, ctxt):
        return "reset by " + self.server


def transport(args, allowed=()):
    oslo_messaging.set_transport_defaults(control_exchange=args.exchange)
    cfg.CONF([], project="warren-interop")
    return oslo_messaging.get_rpc_transport(cfg.CONF, url=args.url, allowed_remote_exmods=list(allowed))


def rpc_server(args):
    t = transport(args)
    target = oslo_messaging.Target(topic=args.topic, server=args.server)
    endpoints = [MainEndpoint(args.server), AdminEndpoint(args.server)]
    server = oslo_messaging.get_rpc_server(t, target, endpoints, executor="threading")
    server.start()
    emit({"event": "ready"})
    wait_for_stdin_eof()
    server.stop()
    server.wait()
    t.cleanup()


def describe(error):
    described = {
        "type": type(error).__name__,
        "module": type(error).__module__,
        "str": str(error),
        "args": [a if isinstance(a, (str, int, float, bool, type(None))) else repr(a) for a in error.args],
    }
    if isinstance(error, oslo_messaging.RemoteError):
        described["exc_type"] = error.exc_type
        described["value"] = error.value
    return described


def rpc_client(args):
    t = transport(args, args.allow)
    client = oslo_messaging.get_rpc_client(t, oslo_messaging.Target(topic=args.topic))

    def run(request):
        prepare = {}
        for key in ("server", "version", "namespace", "timeout", "call_monitor_timeout", "fanout"):
            if request.get(key) is not None:
                prepare[key] = request[key]
        cctxt = client.prepare(**prepare)
        method = getattr(cctxt, request["op"])
        try:
            result = method(request.get("ctxt") or {}, request["method"], **(request.get("args") or {}))
            emit({"id": request["id"], "result": result})
        except Exception as error:  # noqa: BLE001 - every error is reported to the test
            emit({"id": request["id"], "error": describe(error)})

    threads = []
    for line in sys.stdin:
        request = json.loads(line)
        thread = threading.Thread(target=run, args=(request,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    reply_queue = getattr(t._driver, "_reply_q", None)
    t.cleanup()
    if reply_queue:
        # oslo leaves its reply queue to expire (30 min); a test leaves nothing behind.
        import kombu
        broker = args.url.replace("rabbit://", "amqp://", 1).split("?")[0]
        with kombu.Connection(broker) as connection:
            connection.default_channel.queue_delete(reply_queue)


def notify(args):
    oslo_messaging.set_transport_defaults(control_exchange=args.exchange)
    cfg.CONF([], project="warren-interop")
    t = oslo_messaging.get_notification_transport(cfg.CONF, url=args.url)
    notifier = oslo_messaging.Notifier(t, publisher_id=args.publisher, driver=args.driver, topics=[args.topic])
    for line in sys.stdin:
        request = json.loads(line)
        ctxt = request.get("ctxt")
        if request.get("request_context"):
            from oslo_context import context as oslo_context
            ctxt = oslo_context.RequestContext(**request["request_context"])
        method = getattr(notifier, request["priority"])
        method(ctxt or {}, request["event_type"], request["payload"])
        emit({"id": request["id"], "sent": True})
    t.cleanup()


class ListenEndpoint:
    def __init__(self, requeue_once):
        self.requeue_once = requeue_once
        self.requeued = set()

    def _record(self, priority, ctxt, publisher_id, event_type, payload, metadata):
        if event_type == self.requeue_once and metadata["message_id"] not in self.requeued:
            self.requeued.add(metadata["message_id"])
            emit({"event": "requeued", "event_type": event_type})
            return oslo_messaging.NotificationResult.REQUEUE
        emit({
            "event": "notification",
            "priority": priority,
            "ctxt": ctxt,
            "publisher_id": publisher_id,
            "event_type": event_type,
            "payload": payload,
            "metadata": metadata,
        })
        return oslo_messaging.NotificationResult.HANDLED


for _priority in ("audit", "debug", "info", "warn", "error", "critical", "sample"):
    def _handler(self, ctxt, publisher_id, event_type, payload, metadata, _p=_priority):
        return self._record(_p, ctxt, publisher_id, event_type, payload, metadata)
    setattr(ListenEndpoint, _priority, _handler)


def listen(args):
    oslo_messaging.set_transport_defaults(control_exchange=args.exchange)
    cfg.CONF([], project="warren-interop")
    t = oslo_messaging.get_notification_transport(cfg.CONF, url=args.url)
    targets = [oslo_messaging.Target(topic=args.topic)]
    listener = oslo_messaging.get_notification_listener(
        t, targets, [ListenEndpoint(args.requeue_once)], executor="threading",
        pool=args.pool, allow_requeue=bool(args.requeue_once))
    listener.start()
    emit({"event": "ready"})
    wait_for_stdin_eof()
    listener.stop()
    listener.wait()
    t.cleanup()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["rpc-server", "rpc-client", "notify", "listen"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--server")
    parser.add_argument("--allow", action="append", default=[])
    parser.add_argument("--driver", default="messagingv2")
    parser.add_argument("--publisher", default="interop.python")
    parser.add_argument("--pool")
    parser.add_argument("--requeue-once")
    args = parser.parse_args()
    {"rpc-server": rpc_server, "rpc-client": rpc_client, "notify": notify, "listen": listen}[args.mode](args)


if __name__ == "__main__":
    main()
