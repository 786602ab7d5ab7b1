"""--timeline: a Chrome trace that parses, one process per rank, spans that never overlap on a track,
only the asked-for window of steps; and the per-phase breakdown in every metrics record."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter

import pytest

from mpitrain.timeline import Spans, parse_window, trace_document, trace_events
from tests.conftest import run_mpitrain

DIGITS_STEPS = 1437 // 32  # steps per epoch of digits at 1 rank and batch 32 (fewer per rank at more ranks)


def spans_by_track(document: dict) -> dict[tuple[int, int], list[dict]]:
    tracks: dict[tuple[int, int], list[dict]] = {}
    for event in document["traceEvents"]:
        if event["ph"] == "X":
            tracks.setdefault((event["pid"], event["tid"]), []).append(event)
    return tracks


def assert_no_overlap(tracks: dict[tuple[int, int], list[dict]]) -> None:
    for track, events in tracks.items():
        events = sorted(events, key=lambda e: e["ts"])
        for before, after in itertools.pairwise(events):
            assert before["ts"] + before["dur"] <= after["ts"] + 1e-3, (track, before, after)


def test_windows_parse_like_slices_and_bad_ones_say_what_is_expected() -> None:
    assert parse_window("0:100") == (0, 100) and parse_window("5:") == (5, 1 << 62) and parse_window(":3") == (0, 3)
    for bad in ("10", "5:5", "7:2", "-1:4", "a:b"):
        with pytest.raises(ValueError, match="expected A:B"):
            parse_window(bad)


def test_spans_sum_per_name_and_record_only_while_asked() -> None:
    spans = Spans()
    spans.add("forward", 1.0, 1.5)
    spans.recording = True
    spans.add("forward", 2.0, 2.25, micro=0)
    spans.recording = False
    spans.add("backward", 3.0, 4.0)
    assert spans.take() == {"forward": 0.75, "backward": 1.0} and spans.take() == {}
    events = trace_events(3, 1.0, spans.events, main_thread=spans.events[0][3])
    document = json.loads(trace_document([events], {"steps": "0:1"}))
    (span,) = [e for e in document["traceEvents"] if e["ph"] == "X"]
    assert span == {"name": "forward", "cat": "compute", "ph": "X", "ts": 1e6, "dur": 250000.0, "pid": 3, "tid": 0,
                    "args": {"micro": 0}}  # fmt: skip
    assert {"name": "process_name", "ph": "M", "pid": 3, "args": {"name": "rank 3"}} in document["traceEvents"]


@pytest.mark.parametrize("ranks", [2, 3])
def test_timeline_of_a_data_parallel_run(tmp_path, ranks: int) -> None:
    trace, metrics = os.path.join(tmp_path, "trace.json"), os.path.join(tmp_path, "run.jsonl")
    done = run_mpitrain(
        ranks, "train", "--no-progress", "--epochs", "2", "--hidden", "64,64", "--bucket-mb", "0.004",
        "--timeline", trace, "--timeline-steps", "3:9", "--metrics", metrics, "--breakdown",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(trace) as f:
        document = json.load(f)
    assert document["otherData"]["ranks"] == ranks and document["otherData"]["dropped_events"] == 0
    names = {e["pid"]: e["args"]["name"] for e in document["traceEvents"] if e["name"] == "process_name"}
    assert names == {r: f"rank {r}" for r in range(ranks)}
    tracks = spans_by_track(document)
    assert_no_overlap(tracks)
    for rank in range(ranks):
        main = Counter(e["name"] for e in tracks[rank, 0])
        assert main["data"] == main["forward"] == main["backward"] == main["optimizer"] == 6, main  # steps 4..9
        worker = tracks.get((rank, 1), [])  # several buckets: reduced by the gradient thread during backward
        assert worker and {e["name"] for e in worker} == {"allreduce"} and all("bucket" in e["args"] for e in worker)
    assert "epoch   1" in done.stdout and " forward " in done.stdout and "timeline " + trace in done.stdout
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    for record in records:
        assert record["forward_s"] > 0 and record["backward_s"] > 0 and record["exposed_comm_s"] > 0
        assert record["forward_s"] + record["backward_s"] + record["optimizer_s"] < record["time_s"]


def test_timeline_of_a_pipeline_has_every_stage_and_no_overlap(tmp_path) -> None:
    trace = os.path.join(tmp_path, "trace.json")
    done = run_mpitrain(
        2, "train", "--no-progress", "--epochs", "1", "--strategy", "pipeline", "--pipeline-stages", "2",
        "--micro-batches", "4", "--timeline", trace, "--timeline-steps", "0:3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(trace) as f:
        tracks = spans_by_track(json.load(f))
    assert_no_overlap(tracks)
    for rank in (0, 1):
        counts = Counter(e["name"] for e in tracks[rank, 0])
        assert counts["forward"] == counts["backward"] == 3 * 4, counts  # 3 steps x 4 micro-batches
        assert {e["args"]["stage"] for e in tracks[rank, 0] if e["name"] == "forward"} == {rank}


def test_a_bad_window_is_a_usage_error(tmp_path) -> None:
    done = run_mpitrain(1, "train", "--epochs", "1", "--timeline", os.path.join(tmp_path, "t.json"),
                        "--timeline-steps", "9:3")  # fmt: skip
    assert done.returncode == 2 and "--timeline-steps: '9:3': expected A:B" in done.stderr
