"""Shared by every test file: tiny models run on one thread, and a run's plots are drawn only where they are tested."""

import itertools
import os
import sys

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread: threads only add overhead, and on a busy 2-core CPU they
    thrash (backprop through 100 tokens took 9-20 s on two threads beside another process, 0.6 s on one).
    $OMP_NUM_THREADS keeps train(), pretrain(), retest() and bench() on it too (set_cpu_threads would
    otherwise take half the cores: 8 threads in each of 4 workers on a 16-core GPU machine, where the
    suite took 111-134 s before this and 48.5 s after (its six real-data tests skipped there), against
    43-54 s here)."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = omp


STAND_INS = itertools.count(1)  # each stand-in plot's content differs from every other's


@pytest.fixture(autouse=True)
def plots_drawn_only_where_tested(request, monkeypatch):
    """A run's plots (learning_curve.png, modulation.png) took most of a tiny test run's time (0.27 of 0.36 s
    for the learning curve alone), and 160 plots were drawn: with them the suite took 65-70 s on two cores,
    without them 48-51 s (side by side). Tests marked `plots` draw them (the plots' own tests, and every task and
    rule end to end, whose PNGs are checked, and the command line run in a subprocess, which a fixture cannot
    reach); elsewhere each plot is a stand-in file of its name holding a count of the stand-ins written, so a
    test of resuming, refusing or recording still finds every file a run writes, and sees a rewritten one
    change. Only once train.py is imported (this file never imports it): a test of the model or the tasks
    alone neither waits on it nor fails with it half-written."""
    train = sys.modules.get("train")
    if train is None or request.node.get_closest_marker("plots"):
        return

    def stand_in(name):
        def write(run_dir, *args):
            with open(os.path.join(run_dir, name), "w") as file:
                file.write(f"stand-in {next(STAND_INS)}\n")
        return write
    monkeypatch.setattr(train, "plot_learning_curve", stand_in("learning_curve.png"))
    monkeypatch.setattr(train, "plot_modulation_trace", stand_in("modulation.png"))
