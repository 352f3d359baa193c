#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) from the oslo wire
captures in tests/fixtures/oslo-wire/ plus a few hand-made messages.

The committed corpus is this seed set after fuzzing and `cargo fuzz cmin`; run this script
only to start over (`python3 fuzz/seed_corpus.py`, then `scripts/fuzz`). Standard library
only: MessagePack is written by the small encoder below, as rmp-serde writes warren's
messages (structs as maps, smallest integer forms, floats as f64).
"""

import glob
import hashlib
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "oslo-wire")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")

# Content-type selector bytes of warren::fuzzing::split_content_type.
JSON, MSGPACK, JSON_CHARSET, X_MSGPACK, TEXT, NONE = 0, 1, 2, 3, 6, 7


def msgpack(value):
    """MessagePack of a JSON value (dicts keep their order)."""
    if value is None:
        return b"\xc0"
    if value is True:
        return b"\xc3"
    if value is False:
        return b"\xc2"
    if isinstance(value, int):
        if 0 <= value < 0x80:
            return bytes([value])
        if -32 <= value < 0:
            return struct.pack("b", value)
        for fmt, tag, lo, hi in (
            ("B", 0xCC, 0, 0xFF), ("H", 0xCD, 0, 0xFFFF), ("I", 0xCE, 0, 0xFFFFFFFF),
            ("Q", 0xCF, 0, 2**64 - 1), ("b", 0xD0, -128, 127), ("h", 0xD1, -(2**15), 2**15 - 1),
            ("i", 0xD2, -(2**31), 2**31 - 1), ("q", 0xD3, -(2**63), 2**63 - 1),
        ):
            if lo <= value <= hi:
                return bytes([tag]) + struct.pack(">" + fmt, value)
        raise ValueError(value)
    if isinstance(value, float):
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode("utf-8")
        n = len(data)
        if n < 32:
            head = bytes([0xA0 | n])
        elif n < 0x100:
            head = b"\xd9" + struct.pack(">B", n)
        elif n < 0x10000:
            head = b"\xda" + struct.pack(">H", n)
        else:
            head = b"\xdb" + struct.pack(">I", n)
        return head + data
    if isinstance(value, list):
        n = len(value)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
        return head + b"".join(msgpack(v) for v in value)
    if isinstance(value, dict):
        n = len(value)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(msgpack(k) + msgpack(v) for k, v in value.items())
    raise TypeError(type(value))


def write(target, data):
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def captures():
    """(role, body bytes, inner message dict) of every captured message."""
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*.json"))):
        case = json.load(open(path))
        for message in case.get("messages", []):
            body = message["body"].encode("utf-8")
            decoded = message.get("decoded", {})
            inner = decoded.get("oslo_message_json") or decoded.get("body_json")
            yield message["role"], body, inner, decoded.get("failure_json")


def main():
    for role, body, inner, failure in captures():
        write("oslo_envelope", body)
        packed = msgpack(inner)
        write("msgpack_message", packed)
        target = {
            "rpc_call_request": "request",
            "rpc_cast": "request",
            "rpc_cast_fanout": "request",
            "rpc_reply": "reply",
            "rpc_reply_heartbeat": "reply",
            "notification": "notification",
        }[role]
        write(target, bytes([JSON]) + body)
        write(target, bytes([MSGPACK]) + packed)
        if failure is not None:
            failure_text = json.dumps(failure).encode()
            write("reply", bytes([JSON]) + failure_text)

    # Hand-made requests: every method of the fuzz dispatcher, in both codecs.
    requests = [
        {"method": "echo", "args": {"x": [1, 2.5, None, True, "h\u00e9llo \U0001f680"]}},
        {"method": "add", "args": {"a": 2, "b": 3}, "_msg_id": "m1", "_reply_q": "reply_q",
         "_timeout": 2.5, "_unique_id": "u1", "_context_user_id": "alice"},
        {"method": "add", "args": {"a": 9223372036854775807, "b": 1}, "_msg_id": "m2",
         "_reply_q": "reply_q", "_timeout": None},
        {"method": "ping", "_msg_id": "m3", "_reply_q": "q", "version": "1.0"},
        {"method": "typed", "args": {"name": "n", "count": 3, "ratio": 0.5, "tags": ["a"],
                                     "flags": {"f": True}, "inner": {"id": -1, "data": {}},
                                     "kind": {"Large": {"size": 7}}},
         "_msg_id": "m4", "_reply_q": "q"},
        {"method": "context", "args": {}, "_msg_id": "m5", "_reply_q": "q",
         "_context_roles": ["member"], "_context_is_admin": False},
        {"method": "fail", "args": {"k": "v"}, "_msg_id": "m6", "_reply_q": "q"},
        {"method": "echo_args", "namespace": "old_ns", "version": "1.2", "args": {"a": 1},
         "_msg_id": "m7", "_reply_q": "q"},
        {"method": "_private", "args": {}, "_msg_id": "m8", "_reply_q": "q"},
        {"method": "echo", "version": "2.0", "args": {}, "_msg_id": "m9", "_reply_q": "q"},
    ]
    for request in requests:
        inner = json.dumps(request).encode()
        body = json.dumps({"oslo.version": "2.0", "oslo.message": inner.decode()}).encode()
        write("request", bytes([JSON]) + body)
        write("request", bytes([JSON_CHARSET]) + inner)  # 1.0: no envelope
        write("request", bytes([MSGPACK]) + msgpack(request))
        write("oslo_envelope", body)
        write("msgpack_message", msgpack(request))
    # Python's non-finite floats, as json.dumps writes them.
    nan = b'{"method": "echo", "args": {"x": NaN, "y": [Infinity, -Infinity]}, "_msg_id": "m", "_reply_q": "q"}'
    write("request", bytes([JSON]) + nan)
    write("oslo_envelope", json.dumps({"oslo.version": "2.0", "oslo.message": nan.decode()}).encode())

    # Hand-made replies.
    replies = [
        {"result": {"a": [1, 2]}, "failure": None, "ending": True, "_msg_id": "m1"},
        {"result": None, "failure": None, "ending": False, "_msg_id": "m1"},
        {"result": 7, "_msg_id": "m1"},
        {"result": ["x", "y"], "ending": True, "_msg_id": "m1", "_unique_id": "u"},
        {"failure": json.dumps({"class": "X", "message": "m", "tb": ["l\n"], "args": [1.5],
                                "kwargs": {"k": None}}), "ending": True, "_msg_id": "m1"},
        {"failure": "not json", "_msg_id": "m1"},
    ]
    for reply in replies:
        write("reply", bytes([JSON]) + json.dumps(reply).encode())
        write("reply", bytes([X_MSGPACK]) + msgpack(reply))
        write("msgpack_message", msgpack(reply))

    # Hand-made notifications.
    notifications = [
        {"message_id": "0", "publisher_id": "compute.h", "event_type": "compute.instance.x",
         "priority": "WARNING", "payload": {"a": 1}, "timestamp": "2026-01-01 00:00:00.000000",
         "_unique_id": "u", "_context_project_id": "fixture-p"},
        {"priority": "sample", "payload": None},
        {"priority": "bogus"},
    ]
    for notification in notifications:
        write("notification", bytes([JSON]) + json.dumps(notification).encode())
        write("notification", bytes([MSGPACK]) + msgpack(notification))

    # Hand-made MessagePack edge cases: every family of formats, and length claims far
    # beyond the body (4 GiB strings, maps and binaries).
    for raw in [
        b"\x81\xa6method\xa1m",
        b"\x81\xa6method\xc4\x01m",  # bin instead of str
        b"\x82\xa6method\xa1m\xa4args\xc7\x01\x05x",  # ext 8
        b"\x81\xa6method\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4G entries
        b"\x81\xa4args\xdd\xff\xff\xff\xff",  # array32 claiming 4G items
        b"\x81\xa6method\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\x91" * 40 + b"\xc0",  # nested arrays
        b"\x81\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\xc0",  # NaN as a key
        b"\x82\xa8priority\xa4info\xa7payload\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # inf
    ]:
        write("msgpack_message", raw)
        write("request", bytes([MSGPACK]) + raw)
        write("reply", bytes([MSGPACK]) + raw)
        write("notification", bytes([MSGPACK]) + raw)

    # Transport URLs.
    for url in [
        "rabbit://guest:guest@127.0.0.1:5672/",
        "rabbit://nova:s%40cret@h1:5672,nova:s%40cret@h2:5673/my%2Fvhost?amqp_durable_queues=true",
        "amqp://us@er:pa:ss@host/",
        "rabbit://u:p@[::1]:5673,[fe80::2]/",
        "kombu+memory://x/",
        "memory://unit-test/",
        "fake://",
        "rabbit://h/?a=1&b=x+y&a=2",
        "rabbit://u:secret@h:notaport/",
        "rabbit://u:sec/ret@h/",
        "rabbit://u:sec?ret@h/",
        "rabbit://u:sec#ret@h/",
        "rabbit://h/%zz",
        "rabbit://h/?heartbeat_timeout_threshold=30&rpc_response_timeout=0.5"
        "&rabbit_qos_prefetch_count=10&executor_thread_pool_size=4&codec=json"
        "&rabbit_transient_queues_ttl=60&amqp_auto_delete=yes&rabbit_retry_interval=1"
        "&rabbit_retry_backoff=2&rabbit_interval_max=30&kombu_reconnect_splay=0.5"
        "&kombu_failover_strategy=shuffle&kombu_missing_consumer_retry_timeout=5"
        "&control_exchange=nova&max_message_size=1048576",
        "rabbit://h/?rpc_response_timeout=1e400",
        "amqps://u:p@h/",
    ]:
        write("url", url.encode())

    # JSON round trip: the input is a small bytecode (see ValueBuilder in src/fuzzing.rs).
    for raw in [
        b"",
        b"\x09\x03\x05key\x01\x07\x05a\x80\x00\x00\x22",
        b"\x08\x04\x05\x00\x00\x00\x00\x00\x00\xf0\x3f\x02\xff\xff\xff\xff\xff\xff\xff\x7f"
        b"\x03\xff\xff\xff\xff\xff\xff\xff\xff\x07\x03\x7f\x5c\x22",
        b"\x06\x9a\x99\x99\x99\x99\x99\xb9\x3f",
    ]:
        write("json_roundtrip", raw)


if __name__ == "__main__":
    main()
