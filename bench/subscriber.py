"""The bench's MQTT subscriber: a separate process (paho, QoS 1, ``loop_forever``) that checks what arrives.

Run as ``python -m bench.subscriber --port P --topic T --mode ids|samples --out FILE``.

- ``ids``: every message is a canonical event whose id ends in a 12-digit index
  (``bench.ingest.event_id``); counts how often each index arrived, so lost and
  duplicated events are exact.
- ``samples``: every message is an ``io.plantgate.telemetry.samples`` event of the
  OPC UA load tags ``load.tNNN`` whose values are per-tag sequence numbers; counts
  how often each (tag, value) arrived and records, per sample, its source time and
  the receive time of its message (for latency).

It prints nothing; ``--progress FILE`` is rewritten twice a second with
``{"subscribed", "messages", "items", "last_receive"}`` so the harness can wait on
it. SIGTERM (or ``--deadline`` seconds) ends it: it disconnects and writes
``--out`` (JSON; the per-index counts and the time arrays base64-encoded).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import threading
import time
from array import array
from datetime import datetime
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class _IdOnly(msgspec.Struct):
    id: str


class _Sample(msgspec.Struct):
    tag: str
    time: datetime
    value: float | int | bool | str | None = None


class _SamplesData(msgspec.Struct):
    samples: list[_Sample]


class _SamplesEvent(msgspec.Struct):
    type: str
    data: _SamplesData


class Counts:
    """Occurrences per non-negative integer key, 0..255 each, in a growable bytearray."""

    def __init__(self, size: int = 0):
        self.data = bytearray(size)

    def add(self, key: int) -> bool:
        """Count ``key``; True when it had been seen before (a duplicate)."""
        data = self.data
        if key >= len(data):
            data.extend(bytes(max(key + 1 - len(data), len(data) // 2 + 1024)))
        seen = data[key]
        if seen < 255:
            data[key] = seen + 1
        return seen > 0


class Subscriber:
    """See the module docstring."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.mode: str = args.mode
        self.messages = 0
        self.items = 0
        self.duplicates = 0
        self.undecodable = 0
        self.first_receive: float | None = None
        self.last_receive: float | None = None
        self.subscribed = False
        self.ids = Counts(args.expected + 1 if args.expected else 0)
        self.tags: dict[int, Counts] = {}
        self.initial = 0  # samples with value <= 0: the values before the load started
        self.source_times = array("d")
        self.receive_times = array("d")
        self.stop = threading.Event()
        self._id_decoder = msgspec.json.Decoder(_IdOnly)
        self._samples_decoder = msgspec.json.Decoder(_SamplesEvent)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_ids if self.mode == "ids" else self._on_samples

    # --- paho callbacks ---------------------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.args.topic, qos=1)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self.subscribed = True
        self._write_progress()

    def _received(self) -> float:
        """Count one message and note when it came; the receive time."""
        now = time.time()
        if self.first_receive is None:
            self.first_receive = now
        self.last_receive = now
        self.messages += 1
        return now

    def _on_ids(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._received()
        try:
            index = int(self._id_decoder.decode(message.payload).id[-12:])
        except (msgspec.DecodeError, ValueError):
            self.undecodable += 1
            return
        self.items += 1
        if self.ids.add(index):
            self.duplicates += 1

    def _on_samples(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        now = self._received()
        try:
            event = self._samples_decoder.decode(message.payload)
        except msgspec.DecodeError:
            self.undecodable += 1
            return
        if event.type != "io.plantgate.telemetry.samples":
            return
        tags = self.tags
        source_times = self.source_times
        receive_times = self.receive_times
        for sample in event.data.samples:
            value = sample.value
            if not isinstance(value, int | float) or isinstance(value, bool):
                self.undecodable += 1
                continue
            if value <= 0:
                self.initial += 1
                continue
            try:
                tag = int(sample.tag.rsplit("t", 1)[1])
            except (IndexError, ValueError):
                self.undecodable += 1
                continue
            counts = tags.get(tag)
            if counts is None:
                counts = tags[tag] = Counts(4096)
            self.items += 1
            if counts.add(int(value)):
                self.duplicates += 1
            source_times.append(sample.time.timestamp())
            receive_times.append(now)

    # --- run --------------------------------------------------------------------------------------------

    def _write_progress(self) -> None:
        if not self.args.progress:
            return
        doc = {
            "subscribed": self.subscribed,
            "messages": self.messages,
            "items": self.items,
            "duplicates": self.duplicates,
            "last_receive": self.last_receive,
        }
        tmp = self.args.progress + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, self.args.progress)

    def _watch(self) -> None:
        deadline = time.monotonic() + self.args.deadline
        while not self.stop.wait(0.5):
            self._write_progress()
            if time.monotonic() >= deadline:
                break
        self._write_progress()
        self.client.disconnect()

    def run(self) -> None:
        self.client.connect(self.args.host, self.args.port, keepalive=60)
        watcher = threading.Thread(target=self._watch, name="watch", daemon=True)
        watcher.start()
        self.client.loop_forever()
        self.stop.set()
        watcher.join(timeout=5)
        self._write_result()

    def _write_result(self) -> None:
        doc: dict[str, Any] = {
            "mode": self.mode,
            "messages": self.messages,
            "items": self.items,
            "duplicates": self.duplicates,
            "undecodable": self.undecodable,
            "first_receive": self.first_receive,
            "last_receive": self.last_receive,
        }
        if self.mode == "ids":
            doc["counts_b64"] = base64.b64encode(bytes(self.ids.data)).decode()
        else:
            doc["initial"] = self.initial
            doc["tags"] = {str(tag): base64.b64encode(bytes(c.data)).decode() for tag, c in self.tags.items()}
            doc["source_times_b64"] = base64.b64encode(self.source_times.tobytes()).decode()
            doc["receive_times_b64"] = base64.b64encode(self.receive_times.tobytes()).decode()
        tmp = self.args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, self.args.out)


def load_result(path: str) -> dict[str, Any]:
    """Read a subscriber's ``--out`` file, decoding its arrays (``counts``, ``tags``, time arrays)."""
    with open(path, encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    if "counts_b64" in doc:
        doc["counts"] = base64.b64decode(doc.pop("counts_b64"))
    if "tags" in doc:
        doc["tags"] = {int(tag): base64.b64decode(data) for tag, data in doc["tags"].items()}
    for key in ("source_times", "receive_times"):
        raw = doc.pop(f"{key}_b64", None)
        if raw is not None:
            values = array("d")
            values.frombytes(base64.b64decode(raw))
            doc[key] = values
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--mode", choices=["ids", "samples"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--progress", default="")
    parser.add_argument("--expected", type=int, default=0, help="ids mode: the expected number of events")
    parser.add_argument("--deadline", type=float, default=900.0, help="stop by itself after this many seconds")
    parser.add_argument("--client-id", default=f"bench-sub-{os.getpid()}")
    args = parser.parse_args()
    sub = Subscriber(args)
    signal.signal(signal.SIGTERM, lambda *_: sub.stop.set())
    signal.signal(signal.SIGINT, lambda *_: sub.stop.set())
    sub.run()


if __name__ == "__main__":
    main()
