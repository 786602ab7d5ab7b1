"""Point-to-point messages for the Communicator: checked, and watched like every collective.

A parameter server, a pipeline and gossip exchange messages between pairs of
ranks. Going through here instead of raw mpi4py gives them what collectives
have: argument checks that name the problem, a receive that reports who
sent a message and refuses one of the wrong length, and a watchdog entry
for every wait, so a peer that died or stalled ends the job with the
watchdog's message instead of a hang. Messages travel on a duplicate of
the communicator of their own, so user tags never meet a collective's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from mpi4py import MPI
from mpi4py.util import dtlib

from mpitrain.backend import is_device_array
from mpitrain.comm.checks import ERROR_TYPES, Problem, buffer_problem
from mpitrain.comm.device import device_buffer_problem
from mpitrain.comm.ops import wire

ANY_SOURCE = MPI.ANY_SOURCE
ANY_TAG = MPI.ANY_TAG
Watch = Callable[[str], contextlib.AbstractContextManager[None]]


class Message(NamedTuple):
    """What a receive got: who sent it, with which tag, and how many elements."""

    source: int
    tag: int
    count: int


def _peer_problem(peer: Any, size: int, what: str, wildcard: bool) -> Problem | None:
    if wildcard and peer == ANY_SOURCE:
        return None
    if not (isinstance(peer, (int, np.integer)) and 0 <= peer < size):
        return "ValueError", f"{what} {peer!r} is outside [0, {size})"
    return None


def _tag_problem(tag: Any, wildcard: bool) -> Problem | None:
    if wildcard and tag == ANY_TAG:
        return None
    if not (isinstance(tag, (int, np.integer)) and 0 <= tag <= 32767):
        return "ValueError", f"tag {tag!r} is outside [0, 32767] (MPI guarantees at least that range)"
    return None


class Request:
    """A pending ``isend`` / ``irecv``; ``wait`` blocks under the watchdog and returns the ``Message``
    (for a send: the destination, tag and count)."""

    def __init__(
        self, request: MPI.Request, what: Callable[[], str], watch: Watch, finish: Callable[[MPI.Status], Message]
    ):
        self._request, self._what, self._watch, self._finish = request, what, watch, finish
        self._done: Message | None = None

    def test(self) -> bool:
        """Whether the operation has completed (never blocks)."""
        if self._done is not None:
            return True
        status = MPI.Status()
        if not self._request.Test(status):
            return False
        self._done = self._finish(status)
        return True

    def cancel(self) -> None:
        """Cancel a receive that no message will match (e.g. a server's standing receive at the end)."""
        if self._done is None:
            self._request.Cancel()
            self._request.Wait()
            self._done = Message(-1, -1, 0)

    def wait(self) -> Message:
        """Block until the operation completes (watched); the Message."""
        if self._done is None:
            status = MPI.Status()
            with self._watch(self._what):
                self._request.Wait(status)
            self._done = self._finish(status)
        return self._done


def wait_any(requests: Sequence[Request], watch: Watch, note: Callable[[], str] | None = None) -> int:
    """Block until one of ``requests`` completes (watched; ``note`` adds to an overdue report); its index.

    A request that had already completed is returned first. Raises
    ValueError when every request is done already (nothing to wait for).
    """
    for index, request in enumerate(requests):
        if request._done is not None:
            return index
    if not requests:
        raise ValueError("wait_any: no request to wait for")
    status = MPI.Status()

    def what() -> str:  # formatted only if overdue
        text = "a message from any of: " + ", ".join(request._what() for request in requests)
        return text if note is None else f"{text}; {note()}"

    with watch(what):
        index = MPI.Request.Waitany([request._request for request in requests], status)
    request = requests[index]
    request._done = request._finish(status)
    return index


class PointToPoint:
    """The point-to-point half of ``Communicator`` (a mixin: uses its ``_p2p``, ``size``, ``checked``,
    ``_wait``, ``_guard`` and ``_device_message``). Buffers are C-contiguous numpy arrays of the
    collectives' dtypes, or device arrays (sent as they are to a CUDA-aware MPI, else through
    page-locked host buffers)."""

    _p2p: MPI.Comm
    size: int
    sent_bytes: int
    checked: bool
    _wait: Watch
    _device_message: Callable[[Any, bool], tuple[Any, Callable[[], None] | None]]  # see device.DeviceCollectives

    def _guard(self) -> None:
        raise NotImplementedError

    def _message_buffer(self, buf: Any, peer: Any, tag: Any, receiving: bool) -> tuple[Any, Callable[[], None] | None]:
        """(what MPI moves for ``buf``, what to run once the message is complete, or None)."""
        self._guard()
        device = type(buf) is not np.ndarray and is_device_array(buf)
        problem = device_buffer_problem(buf) if device else buffer_problem(buf, writable=receiving)
        problem = problem or _peer_problem(peer, self.size, "source" if receiving else "dest", receiving)
        problem = problem or _tag_problem(tag, receiving)
        if problem is not None:
            name = "recv" if receiving else "send"
            raise ERROR_TYPES[problem[0]](f"{name}: {problem[1]}")
        if device:
            return self._device_message(buf.reshape(-1), receiving)
        return wire(buf.reshape(-1)), None

    def _received(self, flat: Any, status: MPI.Status, after: Callable[[], None] | None = None) -> Message:
        if after is not None:  # a staged device receive: its data to the device
            after()
        count = status.Get_count(dtlib.from_numpy_dtype(flat.dtype))
        source, tag = status.Get_source(), status.Get_tag()
        if self.checked and count != flat.size:
            raise ValueError(
                f"recv: rank {source} sent {count} elements with tag {tag}; the buffer holds {flat.size} x {flat.dtype}"
            )
        return Message(source, tag, count)

    @staticmethod
    def _describe(verb: str, peer: int, tag: int, flat: np.ndarray) -> Callable[[], str]:
        """What a wait is for, formatted only if the watchdog reports it (a message costs microseconds)."""

        def describe() -> str:
            who = "any rank" if peer == ANY_SOURCE else f"rank {peer}"
            return f"{verb} {who} (tag {'any' if tag == ANY_TAG else tag}, {flat.size} x {flat.dtype})"

        return describe

    def send(self, buf: np.ndarray, dest: int, tag: int = 0) -> None:
        """Send ``buf`` to rank ``dest`` (blocking until the buffer may be reused; watched).

        Contract: the receiver posts a buffer of the same length and dtype.
        Raises ValueError / TypeError for a bad buffer, rank or tag (on this rank).
        """
        flat, after = self._message_buffer(buf, dest, tag, receiving=False)
        self.sent_bytes += flat.nbytes
        with self._wait(self._describe("send to", dest, tag, flat)):
            self._p2p.Send(flat, dest=dest, tag=tag)
        if after is not None:
            after()

    def recv(
        self, buf: np.ndarray, source: int = ANY_SOURCE, tag: int = ANY_TAG, note: Callable[[], str] | None = None
    ) -> Message:
        """Receive into ``buf`` from ``source`` (default: any rank) with ``tag`` (default: any); watched.

        Returns the Message (sender, tag, count). In checked mode a message
        shorter than ``buf`` is a ValueError naming the sender; a longer one
        is MPI's truncation error. ``note`` adds to the watchdog's report
        should the wait overrun (e.g. which senders a server still awaits).
        """
        flat, after = self._message_buffer(buf, source, tag, receiving=True)
        status = MPI.Status()
        what = self._describe("recv from", source, tag, flat)
        with self._wait(what if note is None else lambda: f"{what()}; {note()}"):
            self._p2p.Recv(flat, source=source, tag=tag, status=status)
        return self._received(flat, status, after)

    def isend(self, buf: np.ndarray, dest: int, tag: int = 0) -> Request:
        """Start sending ``buf`` to ``dest``; leave ``buf`` unchanged until the Request's ``wait``."""
        flat, after = self._message_buffer(buf, dest, tag, receiving=False)
        self.sent_bytes += flat.nbytes
        sent = Message(dest, tag, flat.size)

        def finish(_: MPI.Status) -> Message:
            if after is not None:
                after()
            return sent

        request = self._p2p.Isend(flat, dest=dest, tag=tag)
        return Request(request, self._describe("isend to", dest, tag, flat), self._wait, finish)

    def irecv(self, buf: np.ndarray, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        """Start receiving into ``buf``; the Request's ``wait`` returns the Message (checked as ``recv``)."""
        flat, after = self._message_buffer(buf, source, tag, receiving=True)
        request = self._p2p.Irecv(flat, source=source, tag=tag)
        what = self._describe("irecv from", source, tag, flat)
        return Request(request, what, self._wait, lambda status: self._received(flat, status, after))

    def wait_any(self, requests: Sequence[Request], note: Callable[[], str] | None = None) -> int:
        """Block until one of ``requests`` completes; its index (see ``wait_any``). A server that keeps a
        receive posted for every client serves whichever comes first."""
        return wait_any(requests, self._wait, note)

    def sendrecv(
        self,
        sendbuf: np.ndarray,
        dest: int,
        recvbuf: np.ndarray,
        source: int = ANY_SOURCE,
        sendtag: int = 0,
        recvtag: int = ANY_TAG,
    ) -> Message:
        """Send ``sendbuf`` to ``dest`` and receive ``recvbuf`` from ``source`` at once (no deadlock when
        every rank of a ring calls it); watched. Returns the received Message."""
        out, sent = self._message_buffer(sendbuf, dest, sendtag, receiving=False)
        into, after = self._message_buffer(recvbuf, source, recvtag, receiving=True)
        self.sent_bytes += out.nbytes
        status = MPI.Status()
        there, back = self._describe("sendrecv to", dest, sendtag, out), self._describe("from", source, recvtag, into)
        what = lambda: f"{there()} / {back()}"  # noqa: E731 - formatted only if overdue
        with self._wait(what):
            self._p2p.Sendrecv(out, dest, sendtag, into, source, recvtag, status=status)
        if sent is not None:
            sent()
        return self._received(into, status, after)
