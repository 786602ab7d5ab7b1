"""The library API for a user's own scripts, with the names Horovod users know (``import mpitrain as mt``).

    import mpitrain as mt
    mt.init()                                   # one Communicator over MPI.COMM_WORLD
    model = mt.nn.build_model("mlp", (64,), 10).init_params(seed=0)
    optimizer = mt.DistributedOptimizer(mt.optim.SGD(model.flat_params, model.flat_grads, 0.05), model)
    mt.broadcast_parameters(model, root=0)
    ...                                         # forward, loss, model.backward(grad), optimizer.step()

Every function is collective over the ranks ``init`` was given: each rank
calls the same ones in the same order with arrays of the same shape and
dtype. The Communicator runs in checked mode, so a mismatch is an error
naming the ranks on every rank, and under a watchdog, so a call that only
some ranks make ends the job after ``timeout`` seconds with a message saying
who was waiting for what, never a silent hang. Calls return new arrays and
leave their arguments alone (as ``hvd.allreduce``); ``allreduce_async``
queues the work on one background thread that also runs every other call of
this module in submission order, so asynchronous and blocking calls keep
one order on every rank.
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.comm import Communicator
from mpitrain.comm.watchdog import abort_job
from mpitrain.nn import Module, Sequential
from mpitrain.optim import Optimizer, clip_grad_norm
from mpitrain.parallel.reducer import DEFAULT_BUCKET_BYTES, GradientReducer

OPS = ("mean", "sum", "max", "min")


class _State:
    """What ``init`` made: the Communicator, the cross-node one, and the worker that runs every call."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.cross = comm.split(comm.local_rank)  # the ranks with this node-local rank, one per node
        self.optimizers: list[DistributedOptimizer] = []  # open ones, in creation order (what join shadows)
        self.jobs: queue.Queue[tuple[Callable[[], Any], Handle] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="mpitrain-api", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            work, handle = job
            try:
                handle._result = work()
            except BaseException as exc:  # noqa: BLE001 - raised by Handle.wait in the caller's thread
                handle._error = exc
            finally:
                handle._done.set()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.cross.close()
        self.comm.close()


_STATE: _State | None = None


class Handle:
    """A queued call (``allreduce_async``); ``wait()`` returns its result or raises its error."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether the call has finished (never blocks)."""
        return self._done.is_set()

    def wait(self) -> Any:
        """Block until the call has finished; its result (the watchdog bounds the wait)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


def init(comm: Any = None, timeout: float = 300.0, checked: bool = True) -> None:
    """Start mpitrain over ``comm`` (an mpi4py communicator; default ``MPI.COMM_WORLD``); collective.

    ``timeout``: seconds any call may wait on other ranks before the job is
    ended with a message. ``checked``: ranks agree on every call's shape,
    dtype and op first (one small all-gather), so a mismatch is an error,
    not a hang. Until ``shutdown``, an exception this process does not catch
    ends the whole job (``sys.excepthook``, chained to the one it replaces).
    A second ``init`` is a no-op; ``shutdown`` first to change.
    """
    global _STATE
    if _STATE is not None:
        return
    _STATE = _State(Communicator(comm, checked=checked, timeout=timeout))
    if sys.excepthook is not _end_job_on_uncaught_exception:
        _PREVIOUS_HOOK[0] = sys.excepthook
        sys.excepthook = _end_job_on_uncaught_exception
    atexit.register(shutdown)


def shutdown() -> None:
    """Stop the worker and free the communicators (collective); ``init`` may be called again after."""
    global _STATE
    if _STATE is not None:
        state, _STATE = _STATE, None
        if sys.excepthook is _end_job_on_uncaught_exception:
            sys.excepthook = _PREVIOUS_HOOK[0]
        state.close()


_PREVIOUS_HOOK = [sys.excepthook]  # the hook init replaced, restored by shutdown


def _end_job_on_uncaught_exception(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """An exception nobody caught ends the whole job, as ``python -m mpi4py`` does: the traceback (through
    the hook this one replaced), a line naming this rank, then MPI's abort. Otherwise this process would
    wait at exit in ``shutdown``'s collective for ranks that wait in theirs for it, until ``timeout``."""
    _PREVIOUS_HOOK[0](kind, value, tb)
    state = _STATE
    if state is None or state.comm.size == 1:
        return
    print(f"[rank {state.comm.rank}] uncaught {kind.__name__}: ending the whole job", file=sys.stderr, flush=True)
    abort_job(1)


def is_initialized() -> bool:
    """Whether ``init`` has run (and ``shutdown`` has not)."""
    return _STATE is not None


def _state() -> _State:
    if _STATE is None:
        raise RuntimeError("mpitrain is not initialised: call mpitrain.init() first (on every rank)")
    return _STATE


def communicator() -> Communicator:
    """The Communicator every call here uses (for the collectives' options, point-to-point, ``split``)."""
    return _state().comm


def rank() -> int:
    """This process's rank."""
    return _state().comm.rank


def size() -> int:
    """The number of ranks."""
    return _state().comm.size


def local_rank() -> int:
    """This process's rank among those on its node (pick a GPU by it)."""
    return _state().comm.local_rank


def local_size() -> int:
    """The number of ranks on this node."""
    return _state().comm.local_size


def cross_rank() -> int:
    """This node's index among the nodes (the rank among processes with this ``local_rank``)."""
    return _state().cross.rank


def cross_size() -> int:
    """The number of nodes (processes with this ``local_rank``)."""
    return _state().cross.size


def _submit(name: str, work: Callable[[], Any]) -> Handle:
    handle = Handle(name)
    _state().jobs.put((work, handle))
    return handle


def _own_copy(array: Any) -> Any:
    """A C-ordered copy of ``array`` where it lives: a device array stays on its device."""
    if backend.is_device_array(array):
        return backend.device_module().array(array, order="C", copy=True)
    if not isinstance(array, np.ndarray):
        array = np.asarray(array)
    return np.array(array, order="C", copy=True)


def _on_device_of(array: Any, work: Callable[[], Any]) -> Callable[[], Any]:
    """``work`` run on ``array``'s GPU (the worker thread would use its own default device otherwise)."""

    def scoped() -> Any:
        with backend.device_scope(array):
            return work()

    return scoped


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")


def allreduce_async(array: Any, op: str = "mean", algorithm: str = "auto") -> Handle:
    """Start reducing a copy of ``array`` over every rank with ``op`` ("mean", "sum", "max", "min"); the
    Handle's ``wait()`` returns the result. Same shape and dtype on every rank."""
    _check_op(op)
    buf = _own_copy(array)
    comm = _state().comm
    return _submit("allreduce", _on_device_of(buf, lambda: comm.allreduce(buf, op=op, algorithm=algorithm)))


def allreduce(array: Any, op: str = "mean", algorithm: str = "auto") -> np.ndarray:
    """``array`` reduced over every rank (a new array): the mean by default, as ``hvd.allreduce``."""
    return allreduce_async(array, op, algorithm).wait()


def grouped_allreduce(arrays: Sequence[Any], op: str = "mean", algorithm: str = "auto") -> list[np.ndarray]:
    """Each of ``arrays`` reduced over every rank, as one request: the arrays of each dtype (and place,
    host or device) are packed into one buffer and reduced together, one message stream per group
    instead of one per array, groups in the order their first array appears. Same list on every rank."""
    _check_op(op)
    parts = [_own_copy(a) for a in arrays]
    groups: dict[tuple[bool, str], list[int]] = {}
    for index, part in enumerate(parts):
        groups.setdefault((backend.is_device_array(part), str(part.dtype)), []).append(index)
    packed = [
        backend.array_module_of(parts[g[0]]).concatenate([parts[i].reshape(-1) for i in g]) for g in groups.values()
    ]
    comm = _state().comm

    def work() -> None:
        for buf in packed:
            with backend.device_scope(buf):
                comm.allreduce(buf, op=op, algorithm=algorithm)

    _submit("grouped_allreduce", work).wait()
    out: list[Any] = [None] * len(parts)
    for members, buf in zip(groups.values(), packed, strict=True):
        start = 0
        for i in members:
            out[i] = buf[start : start + parts[i].size].reshape(parts[i].shape)
            start += parts[i].size
    return out


def broadcast(array: Any, root: int = 0) -> np.ndarray:
    """``root``'s ``array`` on every rank (a new array); same shape and dtype on every rank."""
    buf = _own_copy(array)
    comm = _state().comm
    return _submit("broadcast", _on_device_of(buf, lambda: comm.broadcast(buf, root=root))).wait()


def allgather(array: Any) -> np.ndarray:
    """Every rank's ``array`` concatenated along the first axis, in rank order (first dimensions may
    differ between ranks; the others and the dtype must not)."""
    mine = _own_copy(array)
    if mine.ndim == 0:
        mine = mine.reshape(1)
    comm = _state().comm

    def work() -> np.ndarray:
        shapes = comm.allgather_object((mine.shape, str(mine.dtype)))
        tails = {(shape[1:], dtype) for shape, dtype in shapes}
        if len(tails) > 1:
            raise ValueError(f"allgather: ranks disagree on the trailing shape or dtype: {shapes}")
        xp = backend.array_module_of(mine)
        out = xp.empty((sum(shape[0] for shape, _ in shapes), *mine.shape[1:]), mine.dtype)
        start = 0
        for source, (shape, _) in enumerate(shapes):
            part = out[start : start + shape[0]]
            if source == comm.rank:
                part[...] = mine
            if part.size:
                comm.broadcast(part, root=source)
            start += shape[0]
        return out

    return _submit("allgather", _on_device_of(mine, work)).wait()


def broadcast_object(obj: Any, root: int = 0) -> Any:
    """``root``'s picklable ``obj`` on every rank."""
    comm = _state().comm
    return _submit("broadcast_object", lambda: comm.bcast_object(obj, root=root)).wait()


def barrier() -> None:
    """Wait until every rank has called ``barrier``."""
    comm = _state().comm
    _submit("barrier", lambda: comm.allreduce(np.zeros(1, np.int64))).wait()  # checked like every other call


def join() -> int:
    """Say this rank has run out of data, and take part in the others' steps until every rank has joined.

    For uneven data (as ``hvd.join`` and PyTorch's ``Join``): a rank with no
    batch left calls ``join()``; it then shadows the open
    ``DistributedOptimizer``'s steps of the ranks still training, adding zeros
    in place of its gradients and applying the same update, so replicas stay
    identical; each step's gradients are the mean over the ranks that had a
    batch. Returns, on every rank, the rank that joined last (the one that
    took the most steps of its own; -1 when no DistributedOptimizer is open,
    and then ``join`` is a barrier). Other calls made by the ranks still
    training while some have joined are an error naming the ranks (checked
    mode), not a hang. At most one DistributedOptimizer may be open.
    """
    state = _state()
    if len(state.optimizers) > 1:
        raise ValueError(f"join() shadows one DistributedOptimizer's steps; {len(state.optimizers)} are open")
    if not state.optimizers:
        barrier()
        return -1
    optimizer = state.optimizers[0]
    # A rank that took its last step still counted as training in it, so at least one shadow step follows;
    # the first step in which no rank had a batch is the last.
    while optimizer._shadow_step() > 0:
        pass
    steps = allgather_object(optimizer.real_steps)
    optimizer.real_steps = 0
    most = max(steps)
    return max(r for r, n in enumerate(steps) if n == most)


def allgather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (an all-gather of objects)."""
    comm = _state().comm
    return _submit("allgather_object", lambda: comm.allgather_object(obj)).wait()


def broadcast_parameters(model: Module, root: int = 0) -> None:
    """Give every rank ``root``'s parameters (in place), so replicas start the same; the model must be
    initialised (``init_params``)."""
    flat = getattr(model, "flat_params", None)
    for target in [flat] if flat is not None else [p.data for p in model.parameters()]:
        _broadcast_into(target, root, "broadcast_parameters")


def broadcast_optimizer_state(optimizer: Optimizer, root: int = 0) -> None:
    """Give every rank ``root``'s optimizer state (step count and buffers, in place). ``root``'s own
    state is read, never changed: nothing is stepped or re-initialised (unlike ``hvd`` in horovod#2805)."""
    state = optimizer.state_dict()
    steps = broadcast_object(int(state["steps"]), root=root)
    for key in sorted(k for k, v in state.items() if getattr(v, "ndim", 0)):
        _broadcast_into(state[key], root, "broadcast_optimizer_state")
    if _state().comm.rank != root:
        optimizer.steps = steps


def _broadcast_into(target: Any, root: int, name: str) -> None:
    """``root``'s values of ``target`` (host or device) into every other rank's, in place."""
    comm = _state().comm
    host = np.ascontiguousarray(backend.to_host(target))
    _submit(name, lambda: comm.broadcast(host, root=root)).wait()
    if comm.rank != root:
        target[...] = backend.to_device(host, backend.array_module_of(target))


class DistributedOptimizer:
    """Averages ``model``'s gradients over every rank, then steps ``optimizer``: Horovod's
    DistributedOptimizer on the trainer's ``GradientReducer``.

    During the backward pass that completes a step, each bucket of the flat
    gradient is handed to the reducer's worker as soon as its layers are done
    (a ``Sequential``'s ``after_backward``), so averaging overlaps the rest
    of backward; ``step()`` averages what is left, combines the ranks'
    finiteness verdicts and steps only when every rank's averaged gradients
    are finite (returns False otherwise, and counts ``skipped_steps``).

    Args:
        optimizer: an optimizer over ``model.flat_params`` / ``flat_grads``.
        model: an initialised model (its flat buffers are averaged).
        compression: "none", "fp16", "bf16" or "topk:RATIO" on the wire.
        backward_passes_per_step: gradients of this many backward passes
            add up before one average and one step (accumulation); call
            ``zero_grad()`` only after a step.
        op: "mean" (default) or "sum" over the ranks.
        bucket_bytes: gradient bytes per reduction.
        clip_grad_norm: clip the averaged gradients to this global L2 norm
            before each step (0: off); every rank holds the same averaged
            values, so every rank applies the same factor. ``grad_norm`` is
            the last step's norm before clipping.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: Module,
        compression: str = "none",
        backward_passes_per_step: int = 1,
        op: str = "mean",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        clip_grad_norm: float = 0.0,
    ) -> None:
        if not clip_grad_norm >= 0:
            raise ValueError(f"clip_grad_norm must be >= 0 (0: off), got {clip_grad_norm}")
        if op not in ("mean", "sum"):
            raise ValueError(f"DistributedOptimizer averages or sums gradients: op 'mean' or 'sum', not {op!r}")
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be at least 1, got {backward_passes_per_step}")
        if getattr(model, "flat_grads", None) is None:
            raise ValueError("the model has no flat gradient buffer: call model.init_params() first")
        self.optimizer, self.model, self.op = optimizer, model, op
        self.backward_passes_per_step = backward_passes_per_step
        # A communicator of its own: the reducer's thread averages buckets while the caller may queue other
        # calls. Made by the worker, in its place in the order of calls.
        parent = _state().comm
        self.comm = _submit("DistributedOptimizer", lambda: parent.split(0)).wait()
        self.reducer = GradientReducer(
            self.comm, model.flat_grads, model.layout, bucket_bytes=bucket_bytes, compression=compression
        )
        self.passes = 0
        self.skipped_steps = 0
        self.real_steps = 0  # steps this rank took with gradients of its own (not shadowing, see join)
        self.clip, self.grad_norm = clip_grad_norm, 0.0
        _state().optimizers.append(self)
        self._offsets = model.ready_offsets() if isinstance(model, Sequential) else None
        self._hook_installed = False
        self._arm()

    def _arm(self) -> None:
        """Before the pass that completes a step, fire buckets as backward finishes layers."""
        model = self.model
        if self._offsets is None:
            return
        self.reducer.begin()
        previous = model.after_backward
        offsets, reducer = self._offsets, self.reducer

        def hook(index: int) -> None:
            if previous is not None:
                previous(index)
            if self.passes + 1 == self.backward_passes_per_step:
                reducer.ready(offsets[index])
            if index == model.backward_stop():  # this pass is complete
                self.passes += 1

        model.after_backward = hook
        self._hook_installed = True

    def zero_grad(self) -> None:
        """Zero the model's gradients (after a step, before the next pass)."""
        self.model.zero_grad()

    def step(self) -> bool:
        """Average the gradients over every rank and step the optimizer; False (and no step) where any
        rank's averaged gradients are not finite. Call after ``backward_passes_per_step`` passes."""
        if self._offsets is not None and self.passes != self.backward_passes_per_step:
            raise RuntimeError(
                f"step() after {self.passes} backward pass(es); this optimizer steps every "
                f"{self.backward_passes_per_step} (backward_passes_per_step)"
            )
        if self._offsets is None:
            self.reducer.begin()
        self.real_steps += 1
        return self._apply(self.reducer.finish(contributes=True))

    def _apply(self, finite: bool) -> bool:
        """Step with the averaged gradients (the mean over the ranks that had a batch, when some have
        joined); skip where not finite, or where no rank had a batch. True when it stepped."""
        contributors = self.reducer.contributors
        stepped = finite and contributors > 0
        if stepped:
            if self.op == "sum":
                self.model.flat_grads *= self.comm.size
            elif contributors < self.comm.size:  # joined ranks added zeros: average over the others
                self.model.flat_grads *= self.comm.size / contributors
            if self.clip:
                self.grad_norm = clip_grad_norm(self.model.flat_grads, self.clip)
            self.optimizer.step()
        elif contributors > 0:
            self.skipped_steps += 1
        self.passes = 0
        self.reducer.begin()
        return stepped

    def _shadow_step(self) -> int:
        """The step of a rank that has joined: zeros in place of its gradients, the same collectives as
        the ranks still training, and the same update (replicas stay identical); how many ranks had a batch."""
        self.model.flat_grads.fill(0)
        self.reducer.begin()
        self._apply(self.reducer.finish(contributes=False))
        return self.reducer.contributors

    def close(self) -> None:
        """End the reducer's worker (collective) and remove the backward hook."""
        if self in _state().optimizers:
            _state().optimizers.remove(self)
        if self._hook_installed:
            self.model.after_backward = None
            self._hook_installed = False
        self.reducer.close()
        self.comm.close()
