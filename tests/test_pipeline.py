"""Pipeline parallelism: schedules proved sound before they run (and broken ones refused by name), one
step equal to one process for every (P, schedule, M) and the 2 x 2 hybrid, live activations per stage,
training, resume, save / --init-from interop with data parallelism, and bad options."""

from __future__ import annotations

import itertools
import os
import re

import numpy as np
import pytest

from mpitrain import checkpoint
from mpitrain.cli import UsageError, parse
from mpitrain.comm import Communicator, raised_on_all_ranks
from mpitrain.inference import ARCHITECTURE
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import SGD
from mpitrain.parallel import AllReduce, Job, Pipeline
from mpitrain.parallel.data_parallel import AllReduceOptions
from mpitrain.parallel.local_step import LocalStep
from mpitrain.parallel.pipeline import PipelineOptions
from mpitrain.parallel.schedules import (
    BACKWARD,
    FORWARD,
    RECV_GRAD,
    SCHEDULES,
    SEND_ACT,
    Action,
    ScheduleError,
    build,
    ideal_bubble,
    simulate,
)
from mpitrain.parallel.stages import balanced_split, check_split
from mpitrain.train import train, train_config
from tests.conftest import run_mpitrain, shared_folder

HIDDEN = (24, 16, 12)  # Flatten + 3 x (Linear, ReLU) + Linear: 8 layers, enough for 4 stages x 2 chunks
BATCH = 16


def _grid():
    for kind in SCHEDULES:
        for ranks in range(1, 6):
            for micro in [*range(1, 10), 12, 16]:
                for chunks in (1, 2, 3) if kind == "interleaved" else (1,):
                    if kind != "interleaved" or ranks > 1:
                        yield kind, ranks, micro, chunks


def test_every_generated_schedule_passes_the_check_and_meets_the_published_numbers() -> None:
    for kind, ranks, micro, chunks in _grid():
        schedule = build(kind, ranks, micro, chunks)  # raises ScheduleError if unsound
        simulation = simulate(schedule, micro, chunks, cost=lambda op, k, v=chunks: (1.0 if op == FORWARD else 2.0) / v)
        where = (kind, ranks, micro, chunks)
        for stage, peak in simulation.peak_live.items():
            if kind == "gpipe":
                assert peak == micro, where
            elif kind == "1f1b":
                assert peak == min(ranks - stage, micro), where
        if kind != "interleaved" or micro % ranks == 0:  # equal stages: the formula is exact
            assert simulation.bubble() == pytest.approx(ideal_bubble(kind, ranks, micro, chunks), abs=1e-12), where
        computes = [a for actions in schedule for a in actions if a.op in (FORWARD, BACKWARD)]
        assert len(computes) == 2 * micro * ranks * chunks, where


def test_interleaved_keeps_megatrons_warm_up_when_micro_batches_fill_the_groups() -> None:
    ranks, chunks, micro = 4, 2, 8
    schedule = build("interleaved", ranks, micro, chunks)
    for rank, actions in enumerate(schedule):
        ops = [a.op for a in actions if a.op in (FORWARD, BACKWARD)]
        assert ops.index(BACKWARD) == min((ranks - rank - 1) * 2 + (chunks - 1) * ranks + 1, micro * chunks)


def _broken(kind: str = "1f1b", ranks: int = 2, micro: int = 2) -> list[list[Action]]:
    return [list(actions) for actions in build(kind, ranks, micro)]


def test_broken_schedules_are_refused_naming_the_first_bad_action() -> None:
    missing_send = _broken()
    missing_send[0] = [a for a in missing_send[0] if not (a.op == SEND_ACT and a.micro == 1)]
    with pytest.raises(
        ScheduleError,
        match=r"rank 1, action \d+ \(recv_act micro 1 stage 1 from rank 0\): waits forever: rank 0 never sends it",
    ):
        simulate(missing_send, 2)

    crossed = _broken()  # rank 0 waits for a gradient before it sent the activation that would produce it
    first_recv = next(i for i, a in enumerate(crossed[0]) if a.op == RECV_GRAD)
    crossed[0].insert(0, crossed[0].pop(first_recv))
    with pytest.raises(
        ScheduleError,
        match=r"rank 0, action 0 \(recv_grad micro 0 stage 0 from rank 1\): waits forever: ranks wait on each other",
    ):
        simulate(crossed, 2)

    early = _broken(ranks=1)
    early[0][0], early[0][1] = early[0][1], early[0][0]  # F0 B0 ... -> B0 F0
    with pytest.raises(ScheduleError, match=r"action 0 \(backward micro 0 stage 0\): runs before the forward"):
        simulate(early, 2)

    wrong_peer = _broken(ranks=3)
    i = next(i for i, a in enumerate(wrong_peer[0]) if a.op == SEND_ACT)
    wrong_peer[0][i] = wrong_peer[0][i]._replace(peer=2)
    with pytest.raises(ScheduleError, match=r"stage 1 is on rank 1"):
        simulate(wrong_peer, 2)

    twice = _broken(kind="gpipe", ranks=1)
    twice[0].append(Action(FORWARD, 0, 0))
    with pytest.raises(ScheduleError, match="computes it twice"):
        simulate(twice, 2)


def test_balanced_split_minimises_the_costliest_stage() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        costs = list(rng.integers(1, 20, size=int(rng.integers(1, 9))).astype(float))
        for parts in range(1, len(costs) + 1):
            cuts = balanced_split(costs, parts)
            check_split(tuple(cuts), len(costs), parts)
            bounds = [0, *cuts, len(costs)]
            worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
            best = min(  # brute force over every cut
                max(sum(costs[a:b]) for a, b in itertools.pairwise([0, *c, len(costs)]))
                for c in itertools.combinations(range(1, len(costs)), parts - 1)
            )
            assert worst == best


def _job(batch: int = BATCH) -> Job:
    return Job(
        lambda: build_model("mlp", (1, 8, 8), 10, HIDDEN),
        lambda params, grads, allocate: SGD(params, grads, 0.1, momentum=0.9, allocate=allocate),
        SoftmaxCrossEntropy,
        seed=3,
        dtype=np.dtype(np.float64),
        sample_shape=(1, 8, 8),
        batch_size=batch,
    )


def _batch(pipelines: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(pipelines * BATCH, 1, 8, 8)), rng.integers(0, 10, pipelines * BATCH)


def _one_process(job: Job, x: np.ndarray, y: np.ndarray, micro: int, pipelines: int, steps: int) -> dict:
    """The reference: one process, each pipeline's block of the batch cut into the same micro-batches,
    the blocks' gradients averaged."""
    model = job.build_model().init_params(seed=job.seed, dtype=job.dtype)
    optimizer = job.build_optimizer(model.flat_params, model.flat_grads, None)
    local = LocalStep(model, job.loss(), accumulate=micro, micro_batch=BATCH)
    for _ in range(steps):
        total = np.zeros_like(model.flat_grads)
        for d in range(pipelines):
            local.gradients(x[d * BATCH : (d + 1) * BATCH], y[d * BATCH : (d + 1) * BATCH])
            total += model.flat_grads
        model.flat_grads[...] = total / pipelines
        optimizer.step()
    return {name: p.data.copy() for name, p in model.named_parameters()}


CASES = [(p, 1, kind, m) for p in (2, 3, 4) for kind in SCHEDULES for m in (1, 2, 4, 8)]
CASES += [(2, 2, kind, m) for kind in SCHEDULES for m in (1, 4)]  # the hybrid: 2 pipelines of 2 stages


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stages,pipelines,kind,micro", CASES)
def test_steps_equal_one_process(comm: Communicator, stages: int, pipelines: int, kind: str, micro: int) -> None:
    ranks = stages * pipelines
    if ranks > comm.size:
        pytest.skip(f"{stages} x {pipelines} needs {ranks} ranks")
    job = _job()
    x, y = _batch(pipelines)
    options = PipelineOptions(stages, micro, kind, 2 if kind == "interleaved" else 1)
    with comm.split(int(comm.rank >= ranks)) as group:
        if comm.rank < ranks:
            pipeline = Pipeline(job, group, options)
            pipeline.start()
            d = group.rank // stages
            mine = slice(d * BATCH, (d + 1) * BATCH)
            for _ in range(2):
                fed = pipeline.shard is not None
                pipeline.step(x[mine] if fed else None, y[mine] if fed else None)
            exported = pipeline.export()
            pipeline.close()
            if group.rank == 0:
                expected = _one_process(job, x, y, micro, pipelines, steps=2)
                assert exported.keys() == expected.keys()
                for name in expected:
                    np.testing.assert_allclose(exported[name], expected[name], rtol=1e-10, atol=1e-13, err_msg=name)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", SCHEDULES)
def test_live_activations_per_stage_are_counted(comm: Communicator, kind: str) -> None:
    stages, micro = comm.size, 8
    job = _job()
    x, y = _batch(1)
    pipeline = Pipeline(job, comm, PipelineOptions(stages, micro, kind, 2 if kind == "interleaved" else 1))
    pipeline.start()
    fed = pipeline.shard is not None
    pipeline.step(x if fed else None, y if fed else None)
    peaks, held, rank_peak = (pipeline.stats[k] for k in ("peak_live", "activation_bytes", "peak_live_rank"))
    pipeline.close()
    s = comm.rank
    if kind == "gpipe":
        assert peaks == [micro]
    elif kind == "1f1b":
        assert peaks == [min(stages - s, micro)]
        assert held[0] <= stages * pipeline._bytes_per_sample[s] * BATCH // micro  # at most P micro-batches' worth
    else:  # Megatron's interleaved warm-up: 2 (P - s - 1) + (V - 1) P forwards, plus the one in steady state
        assert rank_peak == min(2 * (stages - s - 1) + stages + 1, 2 * micro)
    assert all(
        h == p * pipeline._bytes_per_sample[k] * BATCH // micro
        for h, p, k in zip(held, peaks, pipeline.stages, strict=True)
    )


def _world_options(size: int) -> dict:
    """A pipeline for any world: 2 stages where the world is even (a hybrid at 4), else one per rank."""
    return {"strategy": "pipeline", "pipeline_stages": 2 if size % 2 == 0 else size}


@pytest.mark.mpi
def test_resume_is_bit_identical(comm: Communicator, tmp_path) -> None:
    folder = shared_folder(tmp_path)
    base = {"epochs": 2, "progress": False, "batch_size": 16, "dropout": 0.1, **_world_options(comm.size)}
    base |= {"optimizer": "adamw", "lr": 0.003, "micro_batches": 3}
    whole = train(train_config(**base), comm).model.flat_params
    train(train_config(**base, checkpoint_dir=folder, checkpoint_every=20, max_steps=50), comm)
    resumed = train(train_config(**base, checkpoint_dir=folder, resume=folder), comm).model.flat_params
    assert resumed.tobytes() == whole.tobytes()


@pytest.mark.mpi
def test_saved_pipeline_loads_into_data_parallel_and_back(comm: Communicator, tmp_path) -> None:
    folder = shared_folder(tmp_path)
    saved, checkpoints = os.path.join(folder, "pipeline.npz"), os.path.join(folder, "dp")
    small = {"epochs": 1, "progress": False, "hidden": HIDDEN}
    train(train_config(**small, **_world_options(comm.size), save=saved), comm)
    allreduce = train(train_config(**small, checkpoint_dir=checkpoints), comm)
    comm.allreduce(np.zeros(1))  # rank 0 has written the files
    model = build_model("mlp", (1, 8, 8), 10, HIDDEN)
    job = _job(32)
    job.dtype = np.dtype(np.float32)

    dp = AllReduce(job, comm, AllReduceOptions())  # a pipeline's --save into data parallelism
    dp.load_parameters(checkpoint.read_parameters(saved, model))
    dp_params = dp.export()
    dp.close()

    options = PipelineOptions(2 if comm.size % 2 == 0 else comm.size, 2)
    pipeline = Pipeline(job, comm, options)  # a data-parallel checkpoint into a pipeline
    pipeline.load_parameters(checkpoint.read_parameters(checkpoints, model))
    pipeline_params = pipeline.export()
    pipeline.close()
    if comm.rank == 0:
        with np.load(saved) as f:
            names = [name for name in f.files if name != ARCHITECTURE]
            assert all(np.array_equal(dp_params[name], f[name]) for name in names) and len(names) == 8
        final = {name: p.data for name, p in allreduce.model.named_parameters()}
        assert all(np.array_equal(pipeline_params[name], final[name]) for name in final)


@pytest.mark.mpi(min_size=4)
def test_hybrid_replicas_of_a_stage_stay_bit_identical(comm: Communicator) -> None:
    result = train(train_config(epochs=1, progress=False, **_world_options(comm.size)), comm)
    stage = result.model.flat_params
    with comm.split(comm.rank % result.strategy.P) as replicas:
        digests = replicas.allgather_object(stage.tobytes())
    assert len(digests) == comm.size // 2 and all(d == digests[0] for d in digests)


@pytest.mark.parametrize(
    "options,world,message",
    [
        ({"pipeline_stages": 3}, 2, "--pipeline-stages 3 exceeds the 2 ranks"),
        ({"pipeline_stages": 3}, 4, "the world of 4 ranks is not divisible by --pipeline-stages 3"),
        ({"micro_batches": 64}, 2, "--micro-batches 64 exceeds the per-pipeline batch size 32"),
        ({"virtual_stages": 2}, 2, "--virtual-stages 2 needs --schedule-pp interleaved"),
        ({"pipeline_stages": 1, "schedule_pp": "interleaved", "virtual_stages": 2}, 1, "needs --pipeline-stages of"),
    ],
)
def test_bad_options_name_the_flags(options: dict, world: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pipeline.validate(PipelineOptions(**options), 32, world)


@pytest.mark.mpi
def test_a_split_of_the_wrong_length_is_one_error_on_every_rank(comm: Communicator) -> None:
    split = tuple(range(1, comm.size + 1))  # one index too many for P = world stages
    message = f"--split needs {comm.size - 1} layer indices for {comm.size} stages, got {comm.size}"
    with pytest.raises(ValueError, match=message) as caught:
        train(train_config(progress=False, strategy="pipeline", pipeline_stages=comm.size, split=split), comm)
    assert raised_on_all_ranks(caught.value)


@pytest.mark.mpi(min_size=2)
def test_splits_that_do_not_cover_the_model_in_order_are_refused(comm: Communicator) -> None:
    for split, layers in [((0,), 6), ((6,), 6), ((3, 2), 6)]:
        with pytest.raises(ValueError, match="does not cut the 6 layers into non-empty stages in order"):
            check_split(split, layers, len(split) + 1)
    with pytest.raises(ValueError, match="stages exceed the model's 8 layers") as caught:
        Pipeline(_job(), comm, PipelineOptions(comm.size, 2, "interleaved", 9 // comm.size + 1))
    assert raised_on_all_ranks(caught.value)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--micro-batches", "4"], "--micro-batches belong.* to --strategy pipeline"),
        (["--strategy", "pipeline", "--split", "2,x"], "expected layer indices like 2,4"),
        (["--strategy", "pipeline", "--schedule-pp", "zigzag"], "invalid choice: 'zigzag'"),
        (["--strategy", "pipeline", "--pipeline-stages", "0"], "--pipeline-stages: '0': expected an integer >= 1"),
    ],
)
def test_bad_pipeline_flags_are_one_usage_error(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(argv)


def test_the_command_line_moves_a_model_between_strategies(tmp_path) -> None:
    saved = str(tmp_path / "allreduce.npz")
    done = run_mpitrain(2, "--epochs", "2", "--no-progress", "--save", saved)
    assert done.returncode == 0, done.stderr
    first = run_mpitrain(
        2, "--strategy", "pipeline", "--epochs", "1", "--no-progress", "--lr", "1e-9", "--init-from", saved
    )
    assert first.returncode == 0, first.stderr
    accuracy = float(re.search(r"test_acc (\S+)", first.stdout).group(1))
    assert accuracy > 0.8  # the trained model's, not a fresh one's (the rate is too small to learn)
    missing = run_mpitrain(2, "--strategy", "pipeline", "--init-from", str(tmp_path / "nothing.npz"))
    assert missing.returncode == 1 and missing.stderr.count("no such file or checkpoint folder") == 1
