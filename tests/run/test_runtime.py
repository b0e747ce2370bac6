"""A fit leaves its process as it found it: environment variables and torch's denormal handling are the same
after an in-process fit as before, whether it succeeds, stops on a non-finite loss or fails with an exception;
drawing component images keeps the caller's matplotlib backend."""

from __future__ import annotations

import os

import matplotlib
import pytest
import torch

from implicit_em.models import implicit_em as module_lib
from implicit_em.run.app import fit_run, main
from implicit_em.run.runtime import flushes_denormals, training_process
from tests.conftest import DEFAULT_CONFIG, QUIET

ONE_EPOCH = [*QUIET, "--trainer.max_epochs", "1", "--model.n_components", "8"]
#: phi = z^2 with lr 1e30: the second step's distances overflow, the run stops on a non-finite loss
DIVERGES = ["--model.lr", "1e30", "--model.net.activation", "square"]


@pytest.fixture(params=[False, True], ids=["denormals-kept", "denormals-flushed"])
def process_state(request):
    """The process before the fit (denormal handling set both ways); restored after the test whatever happens."""
    before = flushes_denormals()
    torch.set_flush_denormal(request.param)
    environ = dict(os.environ)
    try:
        yield {"environ": environ, "denormals": request.param}
    finally:
        torch.set_flush_denormal(before)


def assert_unchanged(state: dict) -> None:
    changed = {k for k in set(state["environ"]) | set(os.environ) if state["environ"].get(k) != os.environ.get(k)}
    changed.discard("PYTEST_CURRENT_TEST")  # pytest's own, set per test phase
    assert not changed, {k: (state["environ"].get(k), os.environ.get(k)) for k in changed}
    assert flushes_denormals() == state["denormals"]
    assert float(torch.tensor([1e-39]) * 1.0) == (0.0 if state["denormals"] else pytest.approx(1e-39, rel=1e-3))


def test_fit_run_leaves_the_process_as_it_found_it(tmp_path, process_state):
    path = fit_run(["--trainer.default_root_dir", str(tmp_path), *ONE_EPOCH], [DEFAULT_CONFIG])
    assert path.is_file()  # it ran and wrote its results
    assert_unchanged(process_state)


@pytest.fixture
def svg_backend():
    """The caller's matplotlib backend is svg (non-interactive, like Agg, but not Agg); restored afterwards."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        yield
    finally:
        matplotlib.use(before)


def test_a_fit_that_draws_component_images_keeps_the_callers_matplotlib_backend(tmp_path, svg_backend):
    path = fit_run(
        ["--trainer.default_root_dir", str(tmp_path), *ONE_EPOCH, "--components.every_n_epochs", "1"], [DEFAULT_CONFIG]
    )
    assert (path.parent / "components.png").is_file() and (path.parent / "components" / "epoch_0001.png").is_file()
    assert matplotlib.get_backend().lower() == "svg"


def test_a_run_stopped_by_a_non_finite_loss_leaves_the_process_as_it_found_it(tmp_path, process_state, capsys):
    code = main(["--trainer.default_root_dir", str(tmp_path), *ONE_EPOCH, *DIVERGES], [DEFAULT_CONFIG])
    assert code == 3, capsys.readouterr().err[-2000:]
    assert_unchanged(process_state)


def test_a_run_failing_with_a_bug_leaves_the_process_as_it_found_it(tmp_path, process_state, monkeypatch):
    def broken(*args, **kwargs):
        assert flushes_denormals() and os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"  # the run's settings
        raise RuntimeError("a bug inside the objective")

    monkeypatch.setattr(module_lib, "implicit_em_objective", broken)
    with pytest.raises(RuntimeError, match="a bug inside the objective"):  # not a user error: raised again
        main(["--trainer.default_root_dir", str(tmp_path), *ONE_EPOCH], [DEFAULT_CONFIG])
    assert_unchanged(process_state)
    with pytest.raises(RuntimeError, match="a bug inside the objective"):
        fit_run(["--trainer.default_root_dir", str(tmp_path / "again"), *ONE_EPOCH], [DEFAULT_CONFIG])
    assert_unchanged(process_state)


def test_training_process_applies_its_settings_and_undoes_them(process_state, monkeypatch):
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    environ = dict(os.environ)
    with pytest.raises(KeyError), training_process():
        assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0" and flushes_denormals()
        os.environ["IEM_RUN_VERSION"] = "version_7"  # what a run sets for its DDP workers
        del os.environ["PATH"]
        raise KeyError("interrupted")
    assert dict(os.environ) == environ and flushes_denormals() == process_state["denormals"]


def test_threads_limits_torch_and_numpys_blas_during_the_fit_and_restores_both(tmp_path):
    """``--threads 1`` in a process whose pools were raised to 2 threads (as many as this BLAS takes): torch and
    numpy's BLAS (the probes' and KMeans' matrix products) run on one thread during the fit, and hold what they
    held before after it."""
    import lightning as L
    from threadpoolctl import threadpool_info, threadpool_limits

    from tests.conftest import fit_in_process

    def blas_threads() -> set[int]:
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    seen = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            seen.append((torch.get_num_threads(), blas_threads()))

    threads = torch.get_num_threads()
    limits = threadpool_limits(2, user_api="blas")  # a BLAS built for one core stays at 1
    try:
        torch.set_num_threads(2)
        before = blas_threads()
        assert before, f"numpy has no BLAS that threadpoolctl sees: {threadpool_info()}"
        fit_in_process(tmp_path, *ONE_EPOCH, "--threads", "1", callbacks=[Record()])
        assert seen == [(1, {1})]
        assert torch.get_num_threads() == 2 and blas_threads() == before
    finally:
        limits.restore_original_limits()
        torch.set_num_threads(threads)
