"""Parameter servers: ps-sync equals allreduce, ssp K=0 equals ps-sync, the ssp bound, the async
conservation law and ticket handout, resume, and bad options."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from mpitrain import faults
from mpitrain.cli import UsageError, parse
from mpitrain.comm import Communicator
from mpitrain.data import ShardedBatches
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import SGD
from mpitrain.parallel import AsynchronousParameterServer, Job, Sums, strategy_class
from mpitrain.parallel.param_server import AsyncOptions, server_ranges
from mpitrain.train import train, train_config
from tests.conftest import same_on_every_rank, shared_folder

SMALL = {"epochs": 2, "progress": False, "dtype": "float64", "hidden": (32,), "batch_size": 8}
OPTIMIZERS = [
    {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.01, "schedule": "cosine", "warmup_steps": 3},
]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("options", OPTIMIZERS)
def test_ps_sync_equals_allreduce_over_the_workers(comm: Communicator, servers: int, options: dict) -> None:
    if servers >= comm.size:
        pytest.skip(f"{servers} servers need more than {comm.size} ranks")
    workers = comm.size - servers
    with comm.split(int(comm.rank >= workers)) as group:
        reference = None
        if comm.rank < workers:
            reference = train(train_config(**SMALL, **options), group).model.flat_params.copy()
    ps = train(train_config(**SMALL, **options, strategy="ps-sync", servers=servers), comm).model.flat_params
    assert same_on_every_rank(ps)  # the servers' copies too, after the epoch's sync
    if reference is not None:
        np.testing.assert_allclose(ps, reference, rtol=1e-9, atol=1e-12)
        assert not np.array_equal(ps, build_model("mlp", (1, 8, 8), 10, (32,)).init_params().flat_params)


@pytest.mark.mpi(min_size=2)
def test_ssp_with_zero_staleness_is_bit_identical_to_ps_sync(comm: Communicator) -> None:
    sync = train(train_config(**SMALL, strategy="ps-sync"), comm).model.flat_params.copy()
    ssp = train(train_config(**SMALL, strategy="ps-ssp", staleness=0), comm).model.flat_params
    assert ssp.tobytes() == sync.tobytes()


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("staleness", [1, 3])
def test_ssp_never_lets_a_worker_lead_by_more_than_k(comm: Communicator, monkeypatch, staleness: int) -> None:
    monkeypatch.setenv(faults.VARIABLE, "pause:0.3:4:1")  # every worker pauses at random
    faults.planned.cache_clear()
    faults._straggler.cache_clear()
    try:
        history = train(train_config(**{**SMALL, "epochs": 1}, strategy="ps-ssp", staleness=staleness), comm).history
    finally:
        faults.planned.cache_clear()
        faults._straggler.cache_clear()
    spread = history[-1]["max_clock_spread"]
    assert 1 <= spread <= staleness, spread  # the bound holds, and workers did run ahead (not lock-step)


def _dyadic_job(workers: int) -> Job:
    # Plain SGD at a per-push rate of 2**-6 (see PushSchedule: the rate of a push is lr / workers).
    lr = workers * 2.0**-6
    return Job(
        lambda: build_model("mlp", (64,), 10, (8,)),
        lambda params, grads, allocate: SGD(params, grads, lr),
        SoftmaxCrossEntropy,
        dtype=np.dtype(np.float64),
    )


@pytest.mark.mpi(min_size=2)
def test_async_applies_every_pushed_gradient_once_in_any_order(comm: Communicator) -> None:
    workers, rounds = comm.size - 1, 7
    strategy = AsynchronousParameterServer(_dyadic_job(workers), comm, AsyncOptions())
    model, rng = strategy.model, np.random.default_rng(comm.rank)
    model.flat_params[...] = 0.25  # dyadic, so every sum below is exact whatever the order
    strategy.start()
    pushed, tickets = np.zeros(model.num_parameters()), []

    def parameter_free_gradients(x, y, after_backward=None) -> Sums:
        model.flat_grads[...] = rng.integers(-64, 64, model.num_parameters()) * 2.0**-5
        pushed[...] += model.flat_grads
        tickets.append(strategy.ticket)
        time.sleep(rng.random() * 0.003 * (1 + 3 * (comm.rank == 0)))  # rank 0 slow: uneven arrivals
        return Sums(0.0, 0, len(y))

    strategy.local.gradients = parameter_free_gradients
    sampler = ShardedBatches(200, 4, comm.rank, workers, 0) if strategy.shard is not None else None
    for idx in strategy.batches(sampler, 0, 0, rounds):
        strategy.step(idx, idx)
    strategy.sync()
    total = comm.allreduce(pushed.copy())
    expected = 0.25 - 2.0**-6 * total
    taken = sorted(t for part in comm.allgather_object(tickets) for t in part)
    assert model.flat_params.tobytes() == expected.tobytes()
    assert taken == list(range(rounds * workers))  # each of the rounds' batches taken exactly once
    strategy.check()


@pytest.mark.mpi(min_size=3)
def test_staleness_lr_scales_each_push_by_the_updates_it_missed(comm: Communicator) -> None:
    workers = comm.size - 1
    strategy = AsynchronousParameterServer(_dyadic_job(workers), comm, AsyncOptions(staleness_lr=True))
    model, rng = strategy.model, np.random.default_rng(comm.rank)
    model.flat_params[...] = 0.25
    strategy.start()
    expected, pending = np.zeros(model.num_parameters()), []

    def parameter_free_gradients(x, y, after_backward=None) -> Sums:
        model.flat_grads[...] = rng.integers(-64, 64, model.num_parameters()) * 2.0**-5
        pending.append((model.flat_grads.copy(), int(strategy.versions[0])))  # the version it was computed on
        time.sleep(rng.random() * 0.003)
        return Sums(0.0, 0, len(y))

    strategy.local.gradients = parameter_free_gradients
    sampler = ShardedBatches(200, 4, comm.rank, workers, 0) if strategy.shard is not None else None
    stale = 0
    for idx in strategy.batches(sampler, 0, 0, 7):
        strategy.step(idx, idx)
        if pending:  # a worker's push (a server's step pushes nothing)
            gradient, read = pending.pop()
            missed = int(strategy.versions[0]) - 1 - read  # the answer carries the version after this push
            stale = max(stale, missed)
            expected += gradient / (1 + missed)
    strategy.sync()
    total = comm.allreduce(expected)
    stale = comm.allreduce(np.array([stale]), op="max")[0]
    np.testing.assert_allclose(model.flat_params, 0.25 - 2.0**-6 * total, rtol=0, atol=1e-13)
    assert stale >= 1  # some pushes were stale, so the scaling was exercised


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strategy", ["ps-sync", "ps-ssp", "ps-async"])
def test_resume(comm: Communicator, tmp_path, strategy: str) -> None:
    folder = shared_folder(tmp_path)
    base = {**SMALL, "strategy": strategy, "checkpoint_dir": folder}
    stopped = train(train_config(**base, checkpoint_every=5, max_steps=13), comm)
    resumed = train(train_config(**base, resume=folder), comm)
    assert stopped.history == [] and resumed.history[-1]["epoch"] == SMALL["epochs"]
    assert same_on_every_rank(resumed.model.flat_params)
    if strategy == "ps-sync":  # synchronous: bit-identical to a run that was never stopped
        whole = train(train_config(**{**base, "checkpoint_dir": None}), comm).model.flat_params
        assert resumed.model.flat_params.tobytes() == whole.tobytes()


@pytest.mark.parametrize("name", ["ps-sync", "ps-async", "ps-ssp"])
def test_bad_server_counts_name_the_range(name: str) -> None:
    cls = strategy_class(name)
    options = cls.Options(servers=4)
    with pytest.raises(ValueError, match="--servers 4 needs at least one worker besides: a world of 4 rank"):
        cls.validate(options, 32, 4)
    with pytest.raises(ValueError, match="needs at least 2 ranks"):
        cls.validate(cls.Options(), 32, 1)
    cls.validate(options, 32, 5)


def test_server_ranges_cover_the_vector_in_order() -> None:
    for count, servers in [(10, 3), (2, 3), (0, 1), (7, 1)]:
        ranges = server_ranges(count, servers)
        assert ranges[0][0] == 0 and ranges[-1][1] == count and len(ranges) == servers
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--strategy", "ps-sync", "--shard-optimizer"], "--shard-optimizer belong.* to --strategy allreduce"),
        (["--strategy", "ps-sync", "--staleness", "2"], "--staleness belong.* to --strategy ps-ssp"),
        (["--strategy", "ps-ssp", "--staleness-lr"], "--staleness-lr belong.* to --strategy ps-async"),
        (["--strategy", "ps-ssp", "--staleness", "-1"], "--staleness: '-1': expected an integer >= 0"),
        (["--strategy", "ps-async", "--servers", "0"], "--servers: '0': expected an integer >= 1"),
    ],
)
def test_bad_flags_are_one_usage_error(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(argv)
