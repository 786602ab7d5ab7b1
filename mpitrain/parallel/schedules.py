"""Pipeline schedules as data: each rank's list of actions, generated for (P, M, V), checked before they run.

A model cut into ``P * V`` consecutive stages runs on ``P`` ranks; stage ``k``
lives on rank ``k % P`` as its model chunk ``k // P`` (with V = 1, stage s is
rank s). A schedule gives every rank an ordered list of ``Action``: the
forward or backward of micro-batch ``m`` on stage ``k``, and the messages
around them (an activation into stage k + 1, a gradient into stage k - 1).

- ``gpipe``: every forward, then every backward (GPipe, Huang et al. 2019);
  stage s holds all M micro-batches' activations at its peak.
- ``1f1b``: P - s - 1 warm-up forwards, then one forward and one backward in
  turn (PipeDream-flush / Megatron-LM's 1F1B); stage s holds min(P - s, M).
- ``interleaved``: 1F1B over V chunks per rank in Megatron-LM's order
  (micro-batches in groups of P, each group through chunk 0, then chunk 1,
  ...), which divides the bubble by V at the price of V times the messages.

Execution semantics, which ``simulate`` models exactly: a send never blocks
(it is an ``isend`` completed at the step's end), every receive is posted at
the step's start into its own buffer, and a rank waits only where its next
action needs a message that has not been sent. ``check`` (``simulate``)
proves before anything runs that every receive finds its send, that no ranks
wait on each other in a cycle, and that every micro-batch's forward precedes
its backward on every stage; a bad schedule is a ``ScheduleError`` naming
the first bad action, never a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b", "interleaved")
FORWARD, BACKWARD = "forward", "backward"
SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = "send_act", "recv_act", "send_grad", "recv_grad"
COMPUTE = (FORWARD, BACKWARD)


class Action(NamedTuple):
    """One thing a rank does: ``op`` on micro-batch ``micro`` at stage ``stage``.

    A send's ``stage`` is the stage that receives it (an activation goes into
    stage k + 1, a gradient into stage k - 1), a receive's is its own stage,
    so a send and its receive have the same (kind, micro, stage); ``peer`` is
    the rank on the other side (-1 for compute).
    """

    op: str
    micro: int
    stage: int
    peer: int = -1

    def __str__(self) -> str:
        side = {SEND_ACT: " to", SEND_GRAD: " to", RECV_ACT: " from", RECV_GRAD: " from"}.get(self.op, "")
        return f"{self.op} micro {self.micro} stage {self.stage}" + (f"{side} rank {self.peer}" if side else "")


class ScheduleError(ValueError):
    """A schedule that would hang or compute the wrong thing; the message names the first bad action."""


def owner(stage: int, ranks: int) -> int:
    """The rank that holds virtual stage ``stage`` (Megatron's interleaving: chunk c of rank r is c * P + r)."""
    return stage % ranks


def _compute_order(
    kind: str, ranks: int, micro: int, chunks: int, rank: int, extra: int = 0
) -> list[tuple[str, int, int]]:
    """(op, micro-batch, stage) of every forward and backward of ``rank``, in the order it runs them
    (``extra``: warm-up forwards beyond the schedule's own count)."""
    if kind == "gpipe":
        return [(FORWARD, m, rank) for m in range(micro)] + [(BACKWARD, m, rank) for m in range(micro)]
    units = micro * chunks

    def unit(j: int, op: str) -> tuple[str, int, int]:
        # Micro-batches go in groups of P (the last one may be smaller), each group through every chunk.
        group = j // (ranks * chunks)
        size = min(ranks, micro - group * ranks)
        within = j - group * ranks * chunks
        chunk = within // size
        if op == BACKWARD:
            chunk = chunks - 1 - chunk
        return op, group * ranks + within % size, chunk * ranks + rank

    if kind == "1f1b":
        warmup = min(ranks - rank - 1 + extra, units)
    else:  # Megatron-LM's interleaved warm-up: twice the distance to the last rank, plus a lap per extra chunk
        warmup = min((ranks - rank - 1) * 2 + (chunks - 1) * ranks + extra, units)
    order = [unit(j, FORWARD) for j in range(warmup)]
    for j in range(units - warmup):
        order += [unit(warmup + j, FORWARD), unit(j, BACKWARD)]
    return order + [unit(j, BACKWARD) for j in range(units - warmup, units)]


def build(kind: str, ranks: int, micro: int, chunks: int = 1) -> list[list[Action]]:
    """Every rank's actions for schedule ``kind`` with ``ranks`` stages' ranks, ``micro`` micro-batches and
    ``chunks`` model chunks per rank (``interleaved`` only), checked by ``simulate`` before it is returned.

    Raises:
        ValueError: an unknown kind or a count out of range.
        ScheduleError: the generated schedule fails the check (a defect here, named precisely).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
    if ranks < 1 or micro < 1 or chunks < 1:
        raise ValueError(f"a schedule needs at least 1 rank, micro-batch and chunk, got {ranks}, {micro}, {chunks}")
    if chunks > 1 and kind != "interleaved":
        raise ValueError(f"{chunks} model chunks per rank need the interleaved schedule, not {kind}")
    if chunks > 1 and ranks < 2:
        raise ValueError("the interleaved schedule needs at least 2 ranks")
    # Megatron's interleaved order assumes M is a multiple of P. Otherwise the last, smaller group of
    # micro-batches can make ranks wait on each other; then the warm-up grows by the least that the check
    # proves deadlock-free (all forwards first always is), at the price of more live activations.
    searching = kind == "interleaved" and micro % ranks != 0
    extra = 0
    while True:
        orders = [_compute_order(kind, ranks, micro, chunks, rank, extra) for rank in range(ranks)]
        schedule = [_actions(order, ranks * chunks - 1, ranks) for order in orders]
        try:
            simulate(schedule, micro, chunks)
            return schedule
        except ScheduleError:
            if not searching or extra >= micro * chunks:
                raise
            extra += 1


def _actions(order: list[tuple[str, int, int]], last: int, ranks: int) -> list[Action]:
    """A rank's compute order with the receive before and the send after each computation that needs one."""
    actions = []
    for op, m, k in order:
        if op == FORWARD:
            actions += [Action(RECV_ACT, m, k, owner(k - 1, ranks))] if k > 0 else []
            actions.append(Action(FORWARD, m, k))
            actions += [Action(SEND_ACT, m, k + 1, owner(k + 1, ranks))] if k < last else []
        else:
            actions += [Action(RECV_GRAD, m, k, owner(k + 1, ranks))] if k < last else []
            actions.append(Action(BACKWARD, m, k))
            actions += [Action(SEND_GRAD, m, k - 1, owner(k - 1, ranks))] if k > 0 else []
    return actions


@dataclass
class Simulation:
    """What ``simulate`` found: the step's length, each rank's busy time, and each stage's peak number of
    micro-batches whose forward has run and backward not yet (live activations)."""

    makespan: float
    busy: list[float]
    peak_live: dict[int, int]

    def bubble(self) -> float:
        """Idle share of the step: 1 - (mean busy time / makespan)."""
        if not self.makespan:
            return 0.0
        return 1.0 - sum(self.busy) / len(self.busy) / self.makespan


Cost = Callable[[str, int], float]  # (FORWARD or BACKWARD, stage) -> seconds


def simulate(schedule: list[list[Action]], micro: int, chunks: int = 1, cost: Cost | None = None) -> Simulation:
    """Run ``schedule`` in pure Python (``micro`` micro-batches, ``chunks`` per rank) and prove it sound.

    Each rank runs its actions in order. Sends never block and take no time,
    a receive waits for its send, a forward takes ``cost(FORWARD, stage)``
    and a backward ``cost(BACKWARD, stage)`` (default 1 and 2). Raises
    ScheduleError for the first of: an action on a stage this rank does not
    hold, a send to or receive from the wrong rank, a forward without its
    input, a backward before its forward or without its gradient, a send of
    something not computed, a repeated computation, ranks that wait on each
    other (deadlock: the first waiting action of the lowest rank is named),
    a message nobody receives, or a micro-batch not run on every stage.
    """
    ranks = len(schedule)
    last = ranks * chunks - 1
    cost = cost or (lambda op, stage: 1.0 if op == FORWARD else 2.0)
    sent: dict[tuple[str, int, int], float] = {}  # (kind, micro, stage) -> when it was sent
    received: set[tuple[str, int, int]] = set()
    done: dict[tuple[str, int, int], float] = {}  # (op, micro, stage) -> when it finished
    have: list[set[tuple[str, int, int]]] = [set() for _ in range(ranks)]  # received messages on hand
    clock, busy, position = [0.0] * ranks, [0.0] * ranks, [0] * ranks
    live: dict[int, int] = {}
    peak: dict[int, int] = {}

    def fail(rank: int, problem: str) -> ScheduleError:
        return ScheduleError(f"rank {rank}, action {position[rank]} ({schedule[rank][position[rank]]}): {problem}")

    def run(rank: int, action: Action) -> bool:  # False: it waits for a message
        op, m, k, peer = action
        if not 0 <= m < micro:
            raise fail(rank, f"micro-batch {m} is outside [0, {micro})")
        if not 0 <= k <= last:
            raise fail(rank, f"stage {k} is outside [0, {last}]")
        if op in (SEND_ACT, SEND_GRAD):
            source = k - 1 if op == SEND_ACT else k + 1
            if owner(source, ranks) != rank or peer != owner(k, ranks):
                raise fail(rank, f"stage {k} is on rank {owner(k, ranks)}, fed by rank {owner(source, ranks)}")
            producer = (FORWARD if op == SEND_ACT else BACKWARD, m, source)
            if producer not in done:
                raise fail(rank, f"sends what {producer[0]} micro {m} stage {source} has not computed yet")
            key = (op[5:], m, k)
            if key in sent:
                raise fail(rank, "sends the same message twice")
            sent[key] = clock[rank]
            return True
        if owner(k, ranks) != rank:
            raise fail(rank, f"stage {k} is on rank {owner(k, ranks)}")
        if op in (RECV_ACT, RECV_GRAD):
            source = k - 1 if op == RECV_ACT else k + 1
            if not 0 <= source <= last or peer != owner(source, ranks):
                raise fail(rank, f"stage {k} gets this from stage {source}, not from rank {peer}")
            key = (op[5:], m, k)
            if key in received:
                raise fail(rank, "receives the same message twice")
            if key not in sent:
                return False
            received.add(key)
            have[rank].add(key)
            clock[rank] = max(clock[rank], sent[key])
            return True
        if op not in COMPUTE:
            raise fail(rank, f"unknown op {op!r}")
        if (op, m, k) in done:
            raise fail(rank, "computes it twice")
        if op == FORWARD and k > 0 and ("act", m, k) not in have[rank]:
            raise fail(rank, f"its input from stage {k - 1} was not received before it")
        if op == BACKWARD:
            if (FORWARD, m, k) not in done:
                raise fail(rank, "runs before the forward of the same micro-batch")
            if k < last and ("grad", m, k) not in have[rank]:
                raise fail(rank, f"its gradient from stage {k + 1} was not received before it")
        clock[rank] += cost(op, k)
        busy[rank] += cost(op, k)
        done[(op, m, k)] = clock[rank]
        live[k] = live.get(k, 0) + (1 if op == FORWARD else -1)
        peak[k] = max(peak.get(k, 0), live[k])
        return True

    while True:
        moved = False
        for rank in range(ranks):
            while position[rank] < len(schedule[rank]) and run(rank, schedule[rank][position[rank]]):
                position[rank] += 1
                moved = True
        if all(position[r] == len(schedule[r]) for r in range(ranks)):
            break
        if not moved:
            waiting = [r for r in range(ranks) if position[r] < len(schedule[r])]
            for rank in waiting:  # a receive whose send is nowhere ahead is the root cause: name it first
                op, m, k, peer = schedule[rank][position[rank]]
                send = SEND_ACT if op == RECV_ACT else SEND_GRAD
                if not any(a.op == send and a.micro == m and a.stage == k for a in schedule[peer][position[peer] :]):
                    raise fail(rank, f"waits forever: rank {peer} never sends it")
            blocked = ", ".join(f"rank {r} at {schedule[r][position[r]]}" for r in waiting)
            raise fail(waiting[0], f"waits forever: ranks wait on each other in a cycle ({blocked})")
    for key in sent:
        if key not in received:
            raise ScheduleError(f"the {key[0]} of micro {key[1]} into stage {key[2]} is sent but never received")
    for k in range(last + 1):
        for m in range(micro):
            for op in COMPUTE:
                if (op, m, k) not in done:
                    raise ScheduleError(f"{op} of micro {m} never runs on stage {k} (rank {owner(k, ranks)})")
    return Simulation(max(clock), busy, peak)


def ideal_bubble(kind: str, ranks: int, micro: int, chunks: int = 1) -> float:
    """The published bubble share of the step with equal stages: (P - 1) / (M + P - 1) for GPipe and 1F1B;
    for interleaved the bubble is (P - 1) / (V M) of the ideal time, so (P - 1) / (V M + P - 1) of the step."""
    if kind == "interleaved":
        return (ranks - 1) / (chunks * micro + ranks - 1)
    return (ranks - 1) / (micro + ranks - 1)
