"""Synchronous data-parallel training: equivalence with one process, determinism, replica checks."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import Communicator, raised_on_all_ranks
from mpitrain.comm.compress import build_compressor
from mpitrain.data import ShardedBatches
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import SGD
from mpitrain.parallel import DataParallel
from mpitrain.parallel.local_step import MICRO_BATCH_BYTES
from mpitrain.parallel.reducer import finite as _finite
from mpitrain.train import train
from mpitrain.train import train_config as TrainConfig
from tests.conftest import WORLD, OneBranch, same_on_every_rank

LOSS = SoftmaxCrossEntropy()
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
    dp = DataParallel(model, SGD(model.flat_params, model.flat_grads, 0.1), comm, loss=LOSS)
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


def _train(comm: Communicator, **options) -> np.ndarray:
    config = {"epochs": 1, "progress": False, "hidden": (32,), "batch_size": 16, **options}
    return train(TrainConfig(**config), comm).model.flat_params.copy()


@pytest.mark.mpi
@pytest.mark.parametrize("compression", ["none", "fp16", "topk:0.05"])
def test_overlapped_buckets_are_bit_identical_to_reducing_after_backward(comm: Communicator, compression: str) -> None:
    small = {"bucket_mb": 0.004, "compression": compression, "model": "cnn"}  # several buckets per step
    overlapped = _train(comm, overlap=True, **small)
    after = _train(comm, overlap=False, **small)
    assert overlapped.tobytes() == after.tobytes()


@pytest.mark.mpi
def test_accumulation_equals_a_k_times_larger_batch(comm: Communicator) -> None:
    accumulated = _train(comm, dtype="float64", batch_size=24, accumulate=3)
    whole = _train(comm, dtype="float64", batch_size=24)
    np.testing.assert_allclose(accumulated, whole, rtol=1e-10, atol=1e-13)


@pytest.mark.mpi
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_layer_without_backward_gets_zero_gradients(comm: Communicator, accumulate: int) -> None:
    net = OneBranch(64, 10).init_params(seed=1, dtype=np.float64, allocate=comm.allocate)
    dp = DataParallel(
        net, SGD(net.flat_params, net.flat_grads, 0.1, momentum=0.9), comm, loss=LOSS, accumulate=accumulate
    )
    before = net.unused.weight.data.copy()
    x = np.random.default_rng(comm.rank).standard_normal((8, 64))
    for _ in range(2):
        net.flat_grads[...] = np.nan  # the step's zeroing must not leave old values where no backward writes
        dp.train_step(x, np.arange(8) % 10)
    identical = same_on_every_rank(net.flat_params)  # collective: before any assertion that one rank may fail
    np.testing.assert_array_equal(net.unused.weight.data, before)
    assert np.isfinite(net.flat_params).all() and identical


@pytest.mark.mpi
@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.01, "hidden": (256, 32)},
    ],
)
def test_sharded_optimizer_is_bit_identical_to_the_all_reduce(comm: Communicator, options: dict) -> None:
    sharded = _train(comm, algorithm="shm", shard_optimizer=True, bucket_mb=0.05, **options)
    whole = _train(comm, algorithm="shm", shard_optimizer=False, bucket_mb=0.05, **options)
    np.testing.assert_array_equal(sharded, whole)
    assert same_on_every_rank(sharded)


@pytest.mark.mpi
def test_sharded_optimizer_over_private_buffers_uses_the_ring(comm: Communicator) -> None:
    results = []
    x = np.random.default_rng(comm.rank).standard_normal((16, 64)).astype(np.float32)
    y = np.arange(16) % 10
    for shard in (True, False):
        net = build_model("mlp", (64,), 10, (40,)).init_params(seed=2)  # private memory: no allocate
        sgd = SGD(net.flat_params, net.flat_grads, 0.1, momentum=0.9)
        dp = DataParallel(net, sgd, comm, loss=LOSS, algorithm="ring",
                          bucket_bytes=4096, shard_optimizer=shard)  # fmt: skip
        assert dp.shard == ("ring" if shard else None)
        for _ in range(3):
            dp.train_step(x, y)
        dp.consolidate_optimizer_state()
        results.append((net.flat_params.copy(), dp.optimizer.buf.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])  # the consolidated state is whole
    with pytest.raises(ValueError, match="uncompressed"):
        DataParallel(net, dp.optimizer, comm, loss=LOSS, compression="fp16", shard_optimizer=True)
    shared = build_model("mlp", (64,), 10, (40,)).init_params(allocate=comm.allocate)
    sgd = SGD(shared.flat_params, shared.flat_grads, 0.1, momentum=0.9, allocate=comm.allocate)
    assert (
        DataParallel(shared, sgd, comm, loss=LOSS, shard_optimizer=True).shard == "shm"
    )  # every buffer is node-shared
    assert DataParallel(shared, sgd, comm, loss=LOSS).shard is None


@pytest.mark.mpi
def test_micro_batches_equal_the_whole_batch(comm: Communicator) -> None:
    split = _train(comm, dtype="float64", model="cnn", batch_size=24, micro_batch=5)
    whole = _train(comm, dtype="float64", model="cnn", batch_size=24, micro_batch=24)
    np.testing.assert_allclose(split, whole, rtol=1e-10, atol=1e-13)


@pytest.mark.mpi
def test_automatic_micro_batches_split_activation_heavy_models_only(comm: Communicator) -> None:
    x = np.zeros((128, 1, 28, 28), np.float32)
    plans = {}
    for name, hidden in (("mlp", (1024, 1024)), ("cnn", ())):
        net = build_model(name, (1, 28, 28), 10, hidden).init_params()
        opt = SGD(net.flat_params, net.flat_grads, 0.1)
        per_sample = net.output_bytes_per_sample(x[:1])
        plans[name] = DataParallel(net, opt, comm, loss=LOSS).local.pieces(x), per_sample
        assert DataParallel(net, opt, comm, loss=LOSS, micro_batch=16).local.pieces(x) == 8
        assert DataParallel(net, opt, comm, loss=LOSS, micro_batch=1000, accumulate=3).local.pieces(x) == 3
    # An MLP re-reads its weights per micro-batch, so it stays whole; the CNN's outputs are split to MICRO_BATCH_BYTES.
    assert plans["mlp"][0] == 1
    assert plans["cnn"][0] == -(-128 // (MICRO_BATCH_BYTES // plans["cnn"][1])) > 1
    with pytest.raises(ValueError, match="micro_batch"):
        DataParallel(net, opt, comm, loss=LOSS, micro_batch=-1)


@pytest.mark.mpi
@pytest.mark.parametrize("compression", ["fp16", "bf16", "topk:0.3"])
def test_compressed_training_converges_on_digits(comm: Communicator, compression: str) -> None:
    history = train(TrainConfig(progress=False, compression=compression), comm).history
    baseline = train(TrainConfig(progress=False), comm).history
    tolerance = 0.005 if compression == "fp16" else 0.03
    assert history[-1]["test_acc"] >= baseline[-1]["test_acc"] - tolerance, (history[-1], baseline[-1])


@pytest.mark.mpi(min_size=2)
# 1e-6: subnormal in float16 unless scaled; 1e-36: a power of two that large overflows float32, 2**126 is used
@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e3, 1e-36])
@pytest.mark.parametrize("compression", ["fp16", "bf16", "topk:0.25"])
def test_compressed_allreduce_round_trip(comm: Communicator, compression: str, scale: float) -> None:
    n = 1000
    compressor = build_compressor(compression, comm, n)
    grads = comm.allocate(n, np.float32)
    local = (np.random.default_rng([3, comm.rank]).standard_normal(n) * scale).astype(np.float32)
    grads[...] = local
    exact = local.astype(np.float64)
    WORLD.Allreduce(MPI.IN_PLACE, exact, op=MPI.SUM)
    exact /= comm.size
    compressor.reduce_mean(comm, grads, 0, n, "auto")
    identical = len(set(WORLD.allgather(grads.tobytes()))) == 1
    if compression == "fp16":  # float16's relative precision, whatever the magnitude
        assert np.abs(grads - exact).max() <= 2e-3 * np.abs(exact).max()
    elif compression == "bf16":
        assert np.abs(grads - exact).max() <= comm.size * 2**-7 * 4 * scale
    else:
        sent = np.count_nonzero(compressor.residual == 0)
        assert sent == 250  # the sent entries leave the residual
        kept = grads != 0
        assert kept.sum() <= 250 * comm.size
    assert identical


def test_finiteness_check() -> None:
    values = np.ones(1000, np.float32)
    assert _finite(values)
    values[7] = 1e20  # finite, though its square overflows float32
    assert _finite(values)
    for bad in (np.nan, np.inf, -np.inf):
        values[500] = bad
        assert not _finite(values)


def test_bad_compression_and_accumulation_values() -> None:
    comm = Communicator(MPI.COMM_SELF)
    with pytest.raises(ValueError, match="topk:RATIO"):
        build_compressor("topk:2", comm, 10)
    with pytest.raises(ValueError, match="unknown compression"):
        build_compressor("zip", comm, 10)
    model = build_model("mlp", (4,), 2, (3,)).init_params()
    opt = SGD(model.flat_params, model.flat_grads, 0.1)
    with pytest.raises(ValueError, match="accumulate"):
        DataParallel(model, opt, comm, loss=LOSS, accumulate=0)
    with pytest.raises(ValueError, match="micro-batches"):
        DataParallel(model, opt, comm, loss=LOSS, accumulate=4).train_step(
            np.zeros((2, 4), np.float32), np.zeros(2, int)
        )


@pytest.mark.mpi
@pytest.mark.parametrize("name,hidden", [("mlp", (1024, 1024)), ("cnn", (64,))])
@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_steady_state_step_allocates_no_large_arrays(
    comm: Communicator, name: str, hidden: tuple, compression: str
) -> None:
    net = build_model(name, (1, 28, 28), 10, hidden).init_params(allocate=comm.allocate)
    dp = DataParallel(
        net, SGD(net.flat_params, net.flat_grads, 0.01, momentum=0.9), comm, loss=LOSS, compression=compression
    )
    x = np.random.default_rng(comm.rank).standard_normal((128, 1, 28, 28), dtype=np.float32)
    y = np.arange(128) % 10
    for _ in range(2):
        dp.train_step(x, y)
    tracemalloc.start()
    dp.train_step(x, y)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # Every activation here is at least 512 KiB (mlp, model 7 MiB); the cnn (model 0.4 MiB) runs micro-batches
    # of 32 whose activations are 0.4-1.6 MiB.
    assert peak < 256 * 1024, f"a steady-state step allocated {peak / 1024:.0f} KiB at its peak"


@pytest.mark.mpi
def test_scale_lr_multiplies_by_the_data_parallel_ranks_after_a_five_epoch_warm_up(comm: Communicator) -> None:
    history = train(TrainConfig(epochs=7, progress=False, batch_size=64, scale_lr=True), comm).history
    lrs = [record["lr"] for record in history]
    scaled = 0.05 * comm.size  # allreduce: one data shard per rank
    assert all(a < b for a, b in itertools.pairwise(lrs[:5])), lrs  # warming up over 5 epochs
    assert lrs[4:] == pytest.approx([scaled] * 3), lrs
