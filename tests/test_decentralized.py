"""Gossip (D-PSGD) and post-local SGD: mean preservation, no global collective in a gossip step,
local SGD's H=1 equivalence and traffic, bit-identical resume."""

from __future__ import annotations

import numpy as np
import pytest

from mpitrain.comm import Communicator
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import SGD
from mpitrain.parallel import Job, strategy_class
from mpitrain.parallel.gossip import mix, peers
from mpitrain.train import train, train_config
from tests.conftest import same_on_every_rank, shared_folder

SMALL = {"epochs": 2, "progress": False, "dtype": "float64", "hidden": (32,), "batch_size": 8}


def _dyadic(comm: Communicator, n: int = 1001) -> np.ndarray:
    return np.random.default_rng([comm.rank, n]).integers(-1024, 1024, n) * 2.0**-7


@pytest.mark.mpi
@pytest.mark.parametrize("topology", ["ring", "exp"])
def test_a_gossip_round_keeps_the_global_mean(comm: Communicator, topology: str) -> None:
    params, received = _dyadic(comm), [np.empty(1001) for _ in range(2)]
    total = comm.allreduce(params.copy())
    for step in range(5):
        pairs = peers(topology, comm.rank, comm.size, step)
        mix(comm, params, received, pairs)
        after = comm.allreduce(params.copy())
        if topology == "exp" or comm.size <= 2:  # weights of 1/2 on dyadic values: exact
            assert after.tobytes() == total.tobytes(), step
        else:  # weights of 1/3: up to round-off
            np.testing.assert_allclose(after, total, rtol=1e-12, atol=1e-9)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("topology", ["ring", "exp"])
def test_repeated_gossip_brings_the_replicas_together(comm: Communicator, topology: str) -> None:
    params, received = _dyadic(comm), [np.empty(1001) for _ in range(2)]
    mean = comm.allreduce(params.copy(), op="mean")
    spread = comm.allreduce(np.array([np.abs(params - mean).max()]), op="max")[0]
    for step in range(60):
        mix(comm, params, received, peers(topology, comm.rank, comm.size, step))
    left = comm.allreduce(np.array([np.abs(params - mean).max()]), op="max")[0]
    assert left < 1e-6 * spread, (spread, left)


def test_peers_rotate_through_powers_of_two_and_rings_have_two_neighbours() -> None:
    assert [peers("exp", 0, 5, s)[0][0] for s in range(4)] == [1, 2, 4, 1]
    assert peers("exp", 0, 5, 1) == [(2, 3)]
    assert peers("ring", 0, 3, 0) == [(1, 2), (2, 1)]
    assert peers("ring", 1, 2, 0) == [(0, 0)] and peers("ring", 0, 1, 0) == [] and peers("exp", 0, 1, 3) == []


def _made(name: str, comm: Communicator, **options):
    """A started strategy on a small MLP with plain SGD."""
    job = Job(lambda: build_model("mlp", (16,), 4, (8,)), lambda p, g, a: SGD(p, g, 0.1), SoftmaxCrossEntropy)
    strategy = strategy_class(name)(job, comm, strategy_class(name).Options(**options))
    strategy.start()
    return strategy


def _batch(comm: Communicator) -> tuple[np.ndarray, np.ndarray]:
    return np.random.default_rng(comm.rank).standard_normal((8, 16)).astype(np.float32), np.arange(8) % 4


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("topology", ["ring", "exp"])
def test_a_gossip_step_calls_no_collective(comm: Communicator, topology: str) -> None:
    strategy, (x, y) = _made("gossip", comm, topology=topology), _batch(comm)
    before, sent = comm.sequence, strategy.sent_bytes
    for _ in range(3):
        strategy.step(x, y)
    assert comm.sequence == before  # point-to-point only: no collective of any kind
    pairs = 1 if topology == "exp" or comm.size == 2 else 2
    assert strategy.sent_bytes - sent == 3 * pairs * strategy.model.flat_params.nbytes
    strategy.sync()
    strategy.check()


@pytest.mark.mpi
def test_local_sgd_averaging_every_step_equals_allreduce(comm: Communicator) -> None:
    plain = {**SMALL, "momentum": 0.0}
    reference = train(train_config(**plain), comm).model.flat_params.copy()
    local = train(train_config(**plain, strategy="local-sgd", sync_every=1), comm).strategy
    np.testing.assert_allclose(local.consensus_model.flat_params, reference, rtol=1e-9, atol=1e-12)
    assert same_on_every_rank(local.model.flat_params)


@pytest.mark.mpi(min_size=2)
def test_local_sgd_sends_a_period_s_share_of_the_bytes(comm: Communicator) -> None:
    x, y = _batch(comm)
    sent = {}
    for h in (1, 4):
        strategy = _made("local-sgd", comm, sync_every=h)
        before = strategy.sent_bytes
        for _ in range(12):
            strategy.step(x, y)
        sent[h] = strategy.sent_bytes - before
    assert sent[1] == 4 * sent[4] == 12 * (2 * (comm.size - 1) * strategy.model.flat_params.nbytes // comm.size)


@pytest.mark.mpi
@pytest.mark.parametrize(
    "strategy,options",
    [
        ("local-sgd", {"sync_every": 4, "local_warmup": 9}),  # stopped inside the warm-up, then inside a period
        ("local-sgd", {"sync_every": 5, "dropout": 0.2}),
        ("gossip", {"topology": "exp"}),
        ("gossip", {"topology": "ring", "optimizer": "adamw", "lr": 0.003}),
    ],
)
def test_resume_is_bit_identical(comm: Communicator, tmp_path, strategy: str, options: dict) -> None:
    folder = shared_folder(tmp_path)
    base = {**SMALL, "strategy": strategy, **options}
    whole = train(train_config(**base), comm).strategy
    train(train_config(**base, checkpoint_dir=folder, checkpoint_every=7, max_steps=13), comm)
    resumed = train(train_config(**base, checkpoint_dir=folder, resume=folder), comm).strategy
    assert resumed.model.flat_params.tobytes() == whole.model.flat_params.tobytes()  # this rank's replica
    assert resumed.consensus_model.flat_params.tobytes() == whole.consensus_model.flat_params.tobytes()


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("gossip", {"topology": "torus"}, "unknown --topology 'torus'; expected one of ring, exp"),
        ("local-sgd", {"sync_every": 0}, "--sync-every must be >= 1 and --local-warmup >= 0, got 0 and 0"),
        ("local-sgd", {"local_warmup": -2}, "got 8 and -2"),
    ],
)
def test_bad_options_name_the_flag(name: str, options: dict, message: str) -> None:
    cls = strategy_class(name)
    with pytest.raises(ValueError, match=message):
        cls.validate(cls.Options(**options), 32, 4)
