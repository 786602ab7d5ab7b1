"""A saved model on its own: evaluate and predict rebuild it from the architecture --save records, and
agree with the training run and with the model computed directly."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from mpitrain import inference
from mpitrain.comm import Communicator, raised_on_all_ranks
from mpitrain.data import load_dataset
from mpitrain.train import train, train_config
from tests.conftest import run_mpitrain, shared_folder


@pytest.mark.mpi
def test_evaluate_agrees_with_the_last_epoch_and_counts_every_sample_once(comm: Communicator, tmp_path) -> None:
    path = os.path.join(shared_folder(tmp_path), "model.npz")
    history = train(train_config(epochs=2, progress=False, hidden=(24,), dropout=0.1, save=path), comm).history
    comm.allreduce(np.zeros(1))  # rank 0 has written the file
    result = inference.evaluate(comm, path, "digits")
    if comm.rank == 0:
        assert result["samples"] == 360 and result["confusion"].sum() == 360
        assert result["accuracy"] == pytest.approx(history[-1]["test_acc"], abs=1e-12)
        assert result["loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-6)
        saved = inference.load(path)
        assert saved.spec["hidden"] == [24] and saved.spec["dropout"] == 0.1 and saved.spec["config"]["epochs"] == 2
    with pytest.raises(ValueError, match=r"the model takes samples shaped \(1, 8, 8\); synthetic's test split") as e:
        inference.evaluate(comm, path, "synthetic")
    assert raised_on_all_ranks(e.value)


@pytest.mark.mpi
def test_predict_writes_the_models_labels_in_sample_order(comm: Communicator, tmp_path) -> None:
    folder = shared_folder(tmp_path)
    model_file, inputs, output = (os.path.join(folder, n) for n in ("model.npz", "x.npz", "labels.npy"))
    train(train_config(epochs=1, progress=False, save=model_file), comm)
    x = load_dataset("digits").x_test[:77]  # not divisible by most world sizes
    if comm.rank == 0:
        np.savez(inputs, x=x)
    comm.allreduce(np.zeros(1))
    assert inference.predict(comm, model_file, inputs, output) == 77
    comm.allreduce(np.zeros(1))
    expected = inference.load(model_file).model.forward(x).argmax(axis=1)
    np.testing.assert_array_equal(np.load(output), expected)


def test_the_commands_need_no_model_flags(tmp_path) -> None:
    model_file = str(tmp_path / "cnn.npz")
    done = run_mpitrain(2, "--model", "cnn", "--hidden", "16", "--epochs", "1", "--no-progress", "--save", model_file)
    assert done.returncode == 0, done.stderr
    final = float(re.findall(r"test_acc (\S+)", done.stdout)[-1].rstrip(","))
    evaluated = run_mpitrain(2, "evaluate", "--model-file", model_file)
    assert evaluated.returncode == 0, evaluated.stderr
    assert float(re.search(r"accuracy (\S+)", evaluated.stdout).group(1)) == pytest.approx(final, abs=1e-4)
    assert evaluated.stdout.count("confusion (rows: true class") == 1
    plain = str(tmp_path / "plain.npz")
    np.savez(plain, w=np.zeros(3))
    refused = run_mpitrain(2, "evaluate", "--model-file", plain)
    assert refused.returncode == 1 and refused.stderr.count("holds no architecture") == 1


def test_plot_draws_the_runs_of_metrics_files(tmp_path) -> None:
    runs = [str(tmp_path / name) for name in ("a.jsonl", "b.jsonl")]
    for path, strategy in zip(runs, ("allreduce", "local-sgd"), strict=True):
        done = run_mpitrain(2, "--epochs", "2", "--no-progress", "--strategy", strategy, "--metrics", path)
        assert done.returncode == 0, done.stderr
    image = str(tmp_path / "curves.png")
    done = run_mpitrain(1, "plot", *runs, "-o", image)
    assert done.returncode == 0 and "2 run(s) drawn" in done.stdout, done.stderr
    with open(image, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 1, "loss": 0.5}\nnot json\n')
    refused = run_mpitrain(1, "plot", str(bad), "-o", image)
    assert refused.returncode == 1 and "bad.jsonl line 2: not an epoch record" in refused.stderr
