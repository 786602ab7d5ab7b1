"""Every strategy behind --strategy: the default job reaches its accuracy target; same seed, same result
for the deterministic ones."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mpitrain.comm import Communicator
from mpitrain.data import load_dataset
from mpitrain.nn import build_model
from mpitrain.parallel import STRATEGIES
from mpitrain.train import train, train_config
from tests.conftest import shared_folder

# The accuracy each strategy's default job must reach on digits; asynchronous updates and gossip (whose
# replicas never quite agree) are allowed less, as the issue that added them set.
TARGETS = {"ps-async": 0.93, "gossip": 0.93}
ASYNCHRONOUS = ("ps-async", "ps-ssp")  # timing decides their course: judged by the best epoch
NEEDS_SERVER = ("ps-sync", "ps-async", "ps-ssp")


def _job(name: str, size: int) -> dict:
    """``--strategy name`` in a world of ``size``: a pipeline of 2 stages where the world is even (the 2 x 2
    hybrid at 4 ranks), else of one stage per rank."""
    if name == "pipeline":
        return {"strategy": name, "pipeline_stages": 2 if size % 2 == 0 else size}
    return {"strategy": name}


@pytest.mark.mpi
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_default_job_reaches_the_target(comm: Communicator, name: str) -> None:
    if name in NEEDS_SERVER and comm.size < 2:
        pytest.skip("a parameter server needs a worker and a server")
    history = train(train_config(progress=False, **_job(name, comm.size)), comm).history
    accuracy = [record["test_acc"] for record in history]
    reached = max(accuracy) if name in ASYNCHRONOUS else accuracy[-1]
    assert reached >= TARGETS.get(name, 0.95), accuracy


@pytest.mark.mpi
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ASYNCHRONOUS])
def test_same_seed_same_world_is_bit_identical(comm: Communicator, name: str) -> None:
    if name in NEEDS_SERVER and comm.size < 2:
        pytest.skip("a parameter server needs a worker and a server")
    config = {"epochs": 1, "progress": False, "batch_size": 16, **_job(name, comm.size)}
    first = train(train_config(**config), comm).model.flat_params.copy()
    second = train(train_config(**config), comm).model.flat_params
    other = train(train_config(**config, seed=1), comm).model.flat_params
    assert first.tobytes() == second.tobytes() and first.tobytes() != other.tobytes()


@pytest.mark.mpi
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_epoch_evaluates_the_model_that_is_saved(comm: Communicator, tmp_path, name: str) -> None:
    if name in NEEDS_SERVER and comm.size < 2:
        pytest.skip("a parameter server needs a worker and a server")
    path = os.path.join(shared_folder(tmp_path), "model.npz")
    history = train(train_config(epochs=2, progress=False, save=path, **_job(name, comm.size)), comm).history
    comm.allreduce(np.zeros(1))  # rank 0 has written the file
    model = build_model("mlp", (1, 8, 8), 10).init_params()
    with np.load(path) as saved:
        for parameter_name, parameter in model.named_parameters():
            parameter.data[...] = saved[parameter_name]
    data = load_dataset("digits")
    predicted = model.eval().forward(data.x_test.astype(np.float32)).argmax(axis=1)
    assert np.mean(predicted == data.y_test) == pytest.approx(history[-1]["test_acc"], abs=1e-12)
