"""Where a step's time goes: named spans, summed per phase, and a window of them as a Chrome trace.

The instrumented places call ``SPANS.add(name, start)`` with a ``clock()``
start: the loop's data read, ``LocalStep``'s forward and backward, each
bucket's all-reduce in the gradient worker thread, the main thread's wait
for communication ("exposed_comm"), the optimizer, checkpoints and
evaluation. Totals per name feed the per-phase breakdown of each metrics
record; while ``recording`` is on, each span is also kept as an event, and
``trace_document`` makes every rank's events one Chrome trace file
(Perfetto, chrome://tracing), one process per rank, one track per thread.

Recording is bounded (a window of steps, and at most ``MAX_EVENTS`` events
per rank) because an unbounded trace of a long run grows to gigabytes and
slows the run it measures. Spans on one thread never nest: each is a leaf.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

clock = time.perf_counter
MAX_EVENTS = 200_000  # per rank, about 20 MB of trace JSON
CATEGORIES = {"allreduce": "comm", "exposed_comm": "comm", "checkpoint": "io", "data": "io"}


class Spans:
    """Per-name totals of spans, and the spans themselves while ``recording``.

    Thread-safe for what it is used for: each thread adds its own spans (a
    list append and a dict update of its own names under the GIL).
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.events: list[tuple[str, float, float, int, dict[str, Any] | None]] = []
        self.recording = False
        self.dropped = 0
        self.zero = 0.0  # the clock() time a trace counts from

    def add(self, name: str, start: float, end: float | None = None, **args: Any) -> float:
        """A span called ``name`` from ``start`` to ``end`` (default: now), both ``clock()`` times;
        ``args`` go into the trace event. Returns the end."""
        end = clock() if end is None else end
        self.totals[name] = self.totals.get(name, 0.0) + (end - start)
        if self.recording:
            if len(self.events) < MAX_EVENTS:
                self.events.append((name, start, end - start, threading.get_ident(), args or None))
            else:
                self.dropped += 1
        return end

    def take(self) -> dict[str, float]:
        """The totals since the last ``take``, and start new ones."""
        totals, self.totals = self.totals, {}
        return totals

    def reset(self) -> None:
        """Forget every total and event, and stop recording (a new run)."""
        self.totals, self.events, self.recording, self.dropped = {}, [], False, 0


SPANS = Spans()  # the process's spans: one training run or library loop at a time


def parse_window(text: str) -> tuple[int, int]:
    """``A:B`` as (A, B): steps A to B-1, counted from 0 like a Python slice (``A:`` or ``:B`` open)."""
    first, sep, last = text.partition(":")
    try:
        start = int(first) if first.strip() else 0
        stop = int(last) if last.strip() else 1 << 62
    except ValueError:
        start = stop = -1
    if not sep or start < 0 or stop <= start:
        raise ValueError(f"{text!r}: expected A:B with 0 <= A < B (steps A to B-1, counted from 0), e.g. 0:100")
    return start, stop


def trace_events(rank: int, zero: float, events: list, main_thread: int) -> list[dict[str, Any]]:
    """One rank's events in Chrome's trace format (microseconds since ``zero``), with the names of its
    process ("rank r") and threads (track 0: the main thread)."""
    tracks = {main_thread: 0}
    for _, _, _, thread, _ in events:
        tracks.setdefault(thread, len(tracks))
    names = {t.ident: t.name for t in threading.enumerate()}
    out: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}]
    for thread, track in tracks.items():
        label = "main" if track == 0 else names.get(thread, f"thread {track}")
        out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": track, "args": {"name": label}})
    for name, start, duration, thread, args in events:
        event = {
            "name": name,
            "cat": CATEGORIES.get(name, "compute"),
            "ph": "X",
            "ts": round((start - zero) * 1e6, 3),
            "dur": round(duration * 1e6, 3),
            "pid": rank,
            "tid": tracks[thread],
        }
        if args:
            event["args"] = args
        out.append(event)
    return out


def trace_document(per_rank: list[list[dict[str, Any]]], meta: dict[str, Any]) -> bytes:
    """Every rank's trace events as one Chrome trace file's bytes (the JSON object format)."""
    events = [e for rank_events in per_rank for e in rank_events]
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}).encode()
