"""Synchronous data-parallel training: equivalence with one process, determinism, replica checks."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import Communicator, raised_on_all_ranks
from mpitrain.data import ShardedBatches
from mpitrain.nn import build_model
from mpitrain.optim import SGD
from mpitrain.parallel import DataParallel
from mpitrain.train import TrainConfig, train
from tests.conftest import WORLD

SMALL = {"epochs": 2, "progress": False, "dtype": "float64", "hidden": (32,)}


@pytest.mark.mpi
@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.01, "schedule": "cosine", "warmup_steps": 3},
        {"model": "cnn", "optimizer": "sgd", "momentum": 0.5, "epochs": 1},
    ],
)
def test_n_ranks_equal_one_process_with_n_times_the_batch(comm: Communicator, options: dict) -> None:
    batch = 8
    parallel = train(TrainConfig(**{**SMALL, **options, "batch_size": batch}), comm).model.flat_params
    single = train(
        TrainConfig(**{**SMALL, **options, "batch_size": batch * comm.size}), Communicator(MPI.COMM_SELF)
    ).model.flat_params
    np.testing.assert_allclose(parallel, single, rtol=1e-9, atol=1e-12)
    assert not np.array_equal(parallel, build_model("mlp", (1, 8, 8), 10, (32,)).init_params().flat_params)


@pytest.mark.mpi
def test_same_seed_same_world_is_bit_identical(comm: Communicator) -> None:
    config = TrainConfig(epochs=2, progress=False, batch_size=16)
    first = train(config, comm).model.flat_params.copy()
    second = train(config, comm).model.flat_params
    other_seed = train(TrainConfig(epochs=2, progress=False, batch_size=16, seed=1), comm).model.flat_params
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other_seed.tobytes()


@pytest.mark.mpi
def test_default_job_reaches_95_percent(comm: Communicator) -> None:
    history = train(TrainConfig(progress=False), comm).history
    assert history[-1]["test_acc"] >= 0.95, history[-1]
    assert {"epoch", "loss", "train_acc", "test_acc", "samples_per_s", "time_s"} <= set(history[-1])


@pytest.mark.mpi(min_size=2)
def test_replica_check_names_the_rank_that_diverged(comm: Communicator) -> None:
    model = build_model("mlp", (4,), 2, (3,)).init_params(seed=comm.rank)  # different on every rank
    dp = DataParallel(model, SGD(model.flat_params, model.flat_grads, 0.1), comm)
    dp.broadcast_parameters()
    dp.check_replicas()
    if comm.rank == comm.size - 1:
        model.flat_params[0] += 1e-7
    with pytest.raises(RuntimeError) as info:
        dp.check_replicas()
    assert f"ranks [{comm.size - 1}]" in str(info.value) and raised_on_all_ranks(info.value)


@pytest.mark.mpi
def test_setup_error_on_one_rank_is_raised_on_every_rank(comm: Communicator) -> None:
    dataset = "digits" if comm.rank < comm.size - 1 else "/nonexistent/data.npz"
    with pytest.raises(FileNotFoundError) as info:
        train(TrainConfig(dataset=dataset, progress=False), comm)
    assert f"rank {comm.size - 1}: /nonexistent/data.npz: no such file" in str(info.value)


@pytest.mark.mpi
def test_every_rank_gets_the_same_number_of_steps() -> None:
    steps = [ShardedBatches(1437, 32, r, WORLD.Get_size(), 0).steps_per_epoch for r in range(WORLD.Get_size())]
    counts = WORLD.allgather(len(list(ShardedBatches(1437, 32, WORLD.Get_rank(), WORLD.Get_size(), 0).batches(0))))
    assert len(set(counts)) == 1 and counts[0] == steps[0]
