"""
Tests of train.py: every task and rule end to end, learning, checkpoints and resume, errors, the CLI.

    pytest test_train.py            # about 25 s on a 2-core CPU
    pytest -m train                 # the training loop, checkpoints, resume, outputs
    pytest -m cli                   # the command line

Tiny models (d_model 16, 2 blocks) train a few steps on the CPU. The few-shot tasks run on a small
synthetic image set built here (tasks.FewShot over random arrays), so no test needs the real data
or the network.
"""

import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import tasks
import train
from plastic import Config, PlasticGPT
from tasks import TaskConfig
from train import RunConfig, TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_FILES = ("config.json", "checkpoint.pt", "best.pt", "log.jsonl", "results.json", "learning_curve.png")
TRACE_FILES = ("modulation.csv", "modulation.png")  # plastic rules only
TINY_TASKS = {  # options that make every task a few tokens long
    "copy": dict(seq_len=2, delay=1),
    "regression": dict(n_train=3, n_test=2, x_dim=3),
    "cue_reward": dict(n_cues=2, cue_dim=3, trial_len=4),
    "omniglot": dict(way=3, shot=1, query=1),
    "cifar_fs": dict(way=3, shot=1, query=1),
}


def synthetic_few_shot(cfg: TaskConfig, seed: int = 0):
    """tasks.FewShot over noisy 16x16 images (8 train, 4 val, 4 test classes of 4 images each; with
    train_on_val, 12 train), standing in for Omniglot (1 channel) and CIFAR-FS (3 channels); other tasks are
    the real ones. Another seed gives other images of the same counts, as another split does."""
    if cfg.name not in ("omniglot", "cifar_fs"):
        return tasks.make_task_from_config(cfg)
    channels = 1 if cfg.name == "omniglot" else 3
    rng = np.random.default_rng(seed)
    sizes = dict(train=8, val=4, test=4)
    splits = {}
    for split, n in sizes.items():  # a random pattern per class, each image of it with its own noise
        pattern = rng.uniform(0, 255, (n, 1, channels, 16, 16))
        splits[split] = np.clip(pattern + rng.normal(0, 40, (n, 4, channels, 16, 16)), 0, 255).astype(np.uint8)
    names = {split: [f"{split} class {i}" for i in range(n)] for split, n in sizes.items()}
    if cfg.train_on_val:  # the validation classes train too, as tasks.omniglot_splits and cifar_fs_splits do
        splits["train"], names["train"] = np.concatenate([splits["train"], splits["val"]]), names["train"] + names["val"]
    return tasks.FewShot(cfg, splits, names, mean=(0.5,) * channels, std=(0.25,) * channels)


@pytest.fixture
def no_network(monkeypatch):
    """A download attempt fails as it does without network."""
    def download(url, path):
        raise OSError("no network in tests")
    monkeypatch.setattr(tasks, "download", download)


@pytest.fixture
def offline(monkeypatch, no_network):
    """Few-shot tasks on synthetic images, and no network."""
    monkeypatch.setattr(train, "make_task_from_config", synthetic_few_shot)


def tiny(out_dir, task="copy", rule="hebbian", model=None, **options) -> RunConfig:
    """A run of 4 steps of 4 sequences with a tiny model; `options` override TrainConfig fields."""
    train_options = dict(rule=rule, steps=4, batch_size=4, log_interval=2, eval_interval=2, eval_episodes=4,
                         test_episodes=8, device="cpu", out_dir=str(out_dir)) | options
    model_options = dict(n_layer=2, n_head=2, d_model=16, encoder_channels=8) | (model or {})
    return RunConfig(train=TrainConfig(**train_options), model=Config(**model_options),
                     task=TaskConfig(name=task, **TINY_TASKS[task]))


def assert_drawn_plot(path, run):
    """A plot matplotlib drew (a PNG of at least 300 pixels a side), not conftest.py's stand-in."""
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 300, f"{run}: {path.name} is not a drawn plot: {image.format} {image.size}"


# ----------------------------------------------------------------------------------------------
# Every task and rule, end to end


@pytest.mark.train
@pytest.mark.plots
@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("rule", train.RULES)
def test_every_task_and_rule_trains_and_writes_every_output(tmp_path, offline, task, rule):
    results = train.train(tiny(tmp_path, task, rule))
    run_dir = tmp_path / f"{task}-{rule}"
    expected = RUN_FILES + (TRACE_FILES if rule != "none" else ())
    missing = [name for name in expected if not (run_dir / name).is_file()]
    assert not missing, f"{task}/{rule}: the run folder lacks {missing}"
    for name in (n for n in expected if n.endswith(".png")):
        assert_drawn_plot(run_dir / name, f"{task}/{rule}")
    assert results == json.loads((run_dir / "results.json").read_text()), "train() should return results.json"
    assert results["test_episodes"] == 8 and np.isfinite(results["test_mean"]), f"bad test result {results}"
    assert results["torch"] == torch.__version__, f"results.json should name the PyTorch it ran, got {results.get('torch')!r}"
    assert (results["knockout_mean"] is None) == (rule == "none"), "the knock-out belongs to the plastic rules only"
    scored = [v for v in results["by_position"] if v is not None]
    if task in ("omniglot", "cifar_fs"):  # every episode scores the same positions, the queries
        assert abs(np.mean(scored) - results["test_mean"]) < 1e-5, \
            f"{task}/{rule}: the accuracy per query position {scored} should average to the test's {results['test_mean']}"
    assert results["params"] == train.count_params(Config(**results["config"]["model"])), \
        "the parameter count should be that of the model config.json describes"
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "step", "config", "rng"} <= checkpoint.keys() and checkpoint["step"] == 4, \
        f"checkpoint.pt should hold model, optimizer, step 4, config and RNG states, has {sorted(checkpoint)}"
    log = train.read_log(run_dir)
    assert [r["step"] for r in log if r["split"] == "train"] == [1, 2, 4], "a log line after step 1, then one per interval"
    assert [r["step"] for r in log if r["split"] == "val"] == [2, 4], "one validation per eval interval"
    if rule != "none":
        rows = (run_dir / "modulation.csv").read_text().splitlines()
        length = synthetic_few_shot(TaskConfig(task, **TINY_TASKS[task])).seq_len
        assert rows[0].startswith("position,eta") and len(rows) == 1 + length, \
            f"modulation.csv should have a header and one row per token position, got {len(rows)} lines"


@pytest.mark.train
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; run on a GPU machine")
def test_a_cuda_graph_trains_as_the_eager_steps_do(tmp_path, offline, monkeypatch):
    """On CUDA, 8 steps with the step recorded as a CUDA graph (3 eager warm-up steps on a side stream, the
    recording at step 4, then a replay at steps 4 to 8) against the same 8 steps run eagerly: the loss of
    every step within 1e-4 (each logged before its step's update, so the updates of steps 1 to 7 are
    checked). On an H200 the two agreed within 4e-6 (relative), while a replay that kept the recorded batch,
    or a learning rate assigned rather than filled in place, changed the loss of step 5 or 6 by 0.2% to
    30 times, with every task and rule here. Without CUDA it skips: it has to run on a GPU machine.
    The weights are not compared element by element: a gradient that is zero in exact arithmetic (a key
    bias, a bias before batch norm) is float noise, which AdamW turns into steps of the learning rate's
    size, so such weights differ between any two orders of summation."""
    record, recorded = train.record_cuda_graph, []
    monkeypatch.setattr(train, "record_cuda_graph", lambda step, batch: recorded.append(1) or record(step, batch))
    wrong = []
    for task in ("copy", "omniglot"):
        for rule in train.RULES:
            losses = {}
            for graphed in (True, False):
                out_dir = tmp_path / f"{task}-{rule}-{'graphed' if graphed else 'eager'}"
                recorded.clear()
                train.train(tiny(out_dir, task, rule, device="cuda", steps=8, warmup=4, log_interval=1, cuda_graph=graphed))
                assert len(recorded) == (1 if graphed else 0), f"{task}/{rule}: {len(recorded)} CUDA graphs recorded with cuda_graph={graphed}"
                losses[graphed] = [r["loss"] for r in train.read_log(out_dir / f"{task}-{rule}") if r["split"] == "train"]
            assert len(losses[True]) == len(losses[False]) == 8, f"{task}/{rule}: the log should hold a loss per step"
            wrong += [f"{task}/{rule} step {step}: graphed {got}, eager {want}"
                      for step, (got, want) in enumerate(zip(losses[True], losses[False]), 1) if got != pytest.approx(want, rel=1e-4)]
    assert not wrong, ("the graphed runs' losses are not the eager runs': " + "; ".join(wrong) + ". See record_cuda_graph's "
                       "replay (each new batch copied into the recorded inputs) and set_learning_rate (the rate filled in place) in train.py")


@pytest.mark.train
def test_compare_trains_three_rules_and_matches_parameters(tmp_path):
    out = train.compare(tiny(tmp_path, "copy", "all", steps=2))
    params = {r["rule"]: r["params"] for r in out["runs"]}
    assert tuple(params) == train.RULES, f"compare() should train every rule, {train.RULES}, got {tuple(params)}"
    assert abs(params["none"] - params["hebbian"]) / params["hebbian"] < 0.1, \
        f"the static baseline should have about the Hebbian model's parameters: {params}"
    for rule in params:
        assert rule in out["table"] and f"{params[rule]:,}" in out["table"], f"the table lacks {rule}'s row:\n{out['table']}"
    assert (tmp_path / "copy-comparison.txt").read_text().strip() == out["table"]
    where = f"; on {train.device_name(train.pick_device('cpu'))}, PyTorch {torch.__version__}"
    assert out["table"].splitlines()[0].endswith(where), f"the table's first line should end {where!r}: {out['table']}"
    again = train.compare(tiny(tmp_path, "copy", "all", steps=2, resume=True))
    assert again["runs"] == out["runs"], "--rule all --resume reuses finished runs of the same options as they are"
    for options, name in ((dict(model=dict(d_model=32)), "the width --match-params matched"), (dict(seed=1), "--seed"), (dict(test_episodes=16), "--test-episodes")):
        with pytest.raises(train.UsageError, match=f"{name}.*reuse it with the run's own"):
            train.compare(tiny(tmp_path, "copy", "all", steps=2, resume=True, **options))
    assert (tmp_path / "copy-comparison.txt").read_text().strip() == out["table"], "a refused reuse rewrites no table"
    saved = tmp_path / "copy-gradient" / "results.json"  # as if run on another machine, before torch was recorded
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "torch"} | dict(device="a GPU")))
    first = train.compare(tiny(tmp_path, "copy", "all", steps=2, resume=True))["table"].splitlines()[0]
    here = where.removeprefix("; on ")
    assert first.endswith(f"; on none {here}; hebbian {here}; gradient a GPU"), f"where each rule ran, when not all ran alike: {first}"


@pytest.mark.train
def test_matched_static_width_is_the_closest_multiple_of_n_head():
    model = Config(d_in=3, d_out=1, n_layer=2, n_head=4, d_model=64, rule="none")
    width = train.matched_static_width(model)
    target = train.count_params(Config(d_in=3, d_out=1, n_layer=2, n_head=4, d_model=64, rule="hebbian"))
    count = train.count_params(Config(d_in=3, d_out=1, n_layer=2, n_head=4, d_model=width, rule="none"))
    neighbours = [train.count_params(Config(d_in=3, d_out=1, n_layer=2, n_head=4, d_model=w, rule="none"))
                  for w in (width - 4, width + 4)]
    assert width % 4 == 0 and width > 64, f"the static model should be widened to a multiple of n_head, got {width}"
    assert all(abs(count - target) <= abs(n - target) for n in neighbours), \
        f"d_model {width} ({count} parameters) is not the closest to the Hebbian model's {target}"


# ----------------------------------------------------------------------------------------------
# Learning


@pytest.mark.train
def test_tiny_hebbian_model_learns_to_copy_through_its_fast_weights(tmp_path):
    # Attention sees only the current token (window 1), so the stored value can reach the recall
    # step one token later only through the fast weights: chance MSE is 1/3 (values in [-1, 1]).
    cfg = tiny(tmp_path, "copy", "hebbian", model=dict(attn_window=1, eta=1.0, max_norm=10.0), steps=100,
               batch_size=32, lr=3e-3, log_interval=50, eval_interval=100, eval_episodes=64, test_episodes=256)
    cfg.task = TaskConfig("copy", seq_len=1, delay=1)
    results = train.train(cfg)
    assert results["test_mean"] < 0.03, f"after 100 steps the test MSE is {results['test_mean']:.4f}; chance is 0.33"
    assert results["knockout_mean"] > 0.2, \
        f"with eta = 0 the model cannot remember, yet its MSE is {results['knockout_mean']:.4f} (chance 0.33)"


@pytest.mark.train
def test_learning_rate_warms_up_then_decays_by_cosine():
    tc = TrainConfig(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    rates = [train.learning_rate(step, tc) for step in range(1, 101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3), "linear warm-up to lr at step 10"
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])), "the rate should only decay after the warm-up"
    assert rates[-1] == pytest.approx(1e-4), "the cosine should end at lr * min_lr_ratio"


@pytest.mark.train
def test_task_defaults_fill_only_what_was_not_given(tmp_path):
    task = tasks.make_task("copy")
    cfg = train.resolve(RunConfig(train=TrainConfig(steps=700), task=TaskConfig("copy")), task)
    defaults = train.TASK_DEFAULTS["copy"]
    assert cfg.train.steps == 700, "an explicit value must win over the task's default"
    assert (cfg.train.batch_size, cfg.train.lr) == (defaults["batch_size"], defaults["lr"])
    assert (cfg.model.d_in, cfg.model.d_out, cfg.model.max_len) == (task.d_in, task.d_out, task.seq_len)


@pytest.mark.train
def test_the_rules_own_rate_is_written_into_the_config():
    """--eta left unset: the run's config (config.json, results.json) says the rate the rule used."""
    task = tasks.make_task("copy")
    for rule, given, expected in (("hebbian", None, 1.0), ("gradient", None, 0.1), ("gradient", 0.3, 0.3)):
        cfg = RunConfig(train=TrainConfig(rule=rule, steps=700), model=Config(eta=given), task=TaskConfig("copy"))
        assert train.resolve(cfg, task).model.eta == expected, f"{rule} with --eta {given}: the config should record {expected}"


# ----------------------------------------------------------------------------------------------
# Checkpoints, resume, divergence


def test_a_failed_write_keeps_the_file_it_would_replace_and_leaves_no_tmp(tmp_path):
    """write_json and save_checkpoint write a .tmp and rename it: a write that fails midway (an object JSON
    cannot hold, a state torch cannot pickle) leaves the earlier file whole and no .tmp beside it."""
    path = tmp_path / "results.json"
    train.write_json(str(path), dict(test_mean=0.5))
    with pytest.raises(TypeError):
        train.write_json(str(path), dict(test_mean=0.9, model=object()))  # fails after '{"test_mean": 0.9, '
    assert json.loads(path.read_text()) == dict(test_mean=0.5), "a failed write should leave the earlier file whole"
    checkpoint = tmp_path / "best.pt"
    train.save_checkpoint(str(checkpoint), dict(step=1))
    with pytest.raises(Exception):
        train.save_checkpoint(str(checkpoint), dict(step=2, hook=lambda: None))  # a lambda cannot be pickled
    assert torch.load(checkpoint, weights_only=True) == dict(step=1), "a failed save should leave the earlier checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "results.json"], \
        f"a failed write should leave no .tmp: {sorted(p.name for p in tmp_path.iterdir())}"


class Interrupted(Exception):
    pass


def kill_at_step(monkeypatch, step: int):
    """From now on the process 'dies' (Interrupted) as step `step` begins, with no chance to save; returns
    the function that brings train.learning_rate back, for the resume."""
    learning_rate = train.learning_rate

    def killed(at, tc):
        if at == step:
            raise Interrupted
        return learning_rate(at, tc)
    monkeypatch.setattr(train, "learning_rate", killed)
    return lambda: monkeypatch.setattr(train, "learning_rate", learning_rate)


@pytest.mark.train
def test_resume_reaches_the_same_parameters_as_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = tiny(tmp_path / "straight", "copy", "hebbian", steps=6, eval_interval=3, log_interval=1)
    train.train(straight)

    revive = kill_at_step(monkeypatch, 5)  # the process dies after the step-3 checkpoint, having logged step 4
    interrupted = tiny(tmp_path / "resumed", "copy", "hebbian", steps=6, eval_interval=3, log_interval=1)
    with pytest.raises(Interrupted):
        train.train(interrupted)
    revive()
    interrupted.train.resume = True
    resumed = train.train(interrupted)

    a = torch.load(tmp_path / "straight/copy-hebbian/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/copy-hebbian/checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    different = [name for name in a["model"] if not torch.equal(a["model"][name], b["model"][name])]
    assert not different, f"3 steps + resume + 3 steps differ from 6 straight steps in {different}"
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    assert [r["step"] for r in train.read_log(tmp_path / "resumed/copy-hebbian") if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert resumed["best_step"] == json.loads((tmp_path / "straight/copy-hebbian/results.json").read_text())["best_step"]


@pytest.mark.train
def test_corrupted_checkpoint_gives_a_clear_error(tmp_path):
    run_dir = tmp_path / "copy-hebbian"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train.UsageError, match="not a readable checkpoint"):
        train.train(tiny(tmp_path, resume=True))
    train.train(tiny(tmp_path, rule="none", steps=2))
    whole = torch.load(tmp_path / "copy-none/checkpoint.pt", weights_only=True)
    for foreign in ({"weights": torch.zeros(2)}, [whole], {k: v for k, v in whole.items() if k != "rng"},
                    whole | dict(config={"train": {}})):  # readable, but not what train.py saves
        torch.save(foreign, run_dir / "checkpoint.pt")
        with pytest.raises(train.UsageError, match="is not a checkpoint train.py wrote"):
            train.train(tiny(tmp_path, resume=True))


@pytest.mark.train
def test_resume_without_a_checkpoint_or_with_other_options_is_refused(tmp_path):
    with pytest.raises(train.UsageError, match="no checkpoint"):
        train.train(tiny(tmp_path, resume=True))
    train.train(tiny(tmp_path, steps=2))
    with pytest.raises(train.UsageError, match="was trained with --d-model 16, not 32; resume with the run's own options"):
        train.train(tiny(tmp_path, resume=True, model=dict(d_model=32)))
    for option, value in (("seed", 3), ("batch_size", 8), ("eval_episodes", 6)):
        with pytest.raises(train.UsageError, match=f"--{option.replace('_', '-')} .*, not {value}; resume with the run's own"):
            train.train(tiny(tmp_path, resume=True, **{option: value}))
    with pytest.raises(train.UsageError, match="trained without --deterministic; resume with the run's own"):
        train.train(tiny(tmp_path, resume=True, deterministic=True))


@pytest.mark.train
@pytest.mark.parametrize("name, kind", [("cpu", "cpu"), ("cpu:0", None), ("mps", None), ("meta", None), ("gpu", None)])
def test_only_cpu_and_cuda_devices_are_accepted(name, kind):
    """A checkpoint saved from cpu:0 does not load again, and mps or meta tensors are not what this code runs on."""
    if kind:
        assert train.pick_device(name).type == kind
    else:
        with pytest.raises(train.UsageError, match="use auto, cpu, cuda or cuda:N"):
            train.pick_device(name)


@pytest.mark.train
def test_cpu_threads_are_the_options_else_omp_num_threads_else_half_the_cores(monkeypatch):
    """--threads decides; without it a positive $OMP_NUM_THREADS stands (torch read it at import); without
    both, or with one OpenMP cannot read, half the cores, at least one; on CUDA nothing changes."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cases = [  # (--threads, $OMP_NUM_THREADS, device, the threads torch should have after)
        (3, "1", cpu, 3), (None, "2", cpu, 2), (None, None, cpu, 8), (None, "", cpu, 8), (None, "abc", cpu, 8),
        (None, "0", cpu, 8), (5, None, cuda, 2)]
    try:
        for threads, omp, device, want in cases:
            torch.set_num_threads(2)  # as torch would have read a set $OMP_NUM_THREADS at import, and otherwise
            if omp is None:
                monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            else:
                monkeypatch.setenv("OMP_NUM_THREADS", omp)
            train.set_cpu_threads(TrainConfig(threads=threads), device)
            assert torch.get_num_threads() == want, (
                f"--threads {threads}, OMP_NUM_THREADS={omp!r}, {device.type} on 16 cores: {torch.get_num_threads()} "
                f"threads, want {want}")
        monkeypatch.setattr(os, "cpu_count", lambda: 1)
        train.set_cpu_threads(TrainConfig(), cpu)
        assert torch.get_num_threads() == 1, "half of one core should be one thread"
    finally:
        torch.set_num_threads(1)  # the suite's one thread (conftest)


@pytest.mark.train
@pytest.mark.cli
def test_a_cuda_device_beyond_the_machines_is_refused_in_one_sentence(monkeypatch):
    """On a one-GPU machine --device cuda:7 passes torch.device and would fail deep in the first CUDA call."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert train.pick_device("cuda:0") == torch.device("cuda:0")
    assert train.pick_device("cuda") == torch.device("cuda")
    with pytest.raises(train.UsageError, match=r"'cuda:7' was asked for but this machine has 1 CUDA device \(cuda:0\); use"):
        train.pick_device("cuda:7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(train.UsageError, match=r"has 4 CUDA devices \(cuda:0 to cuda:3\); use"):
        train.pick_device("cuda:4")


@pytest.mark.train
def test_a_log_line_cut_short_is_left_out_and_a_damaged_one_named(tmp_path):
    """A run killed while writing log.jsonl leaves half a line at its end: read_log keeps the whole lines (so
    --resume goes on); a damaged line before the end is one sentence naming the file."""
    (tmp_path / "log.jsonl").write_text('{"split": "train", "step": 1}\n{"split": "train", "st')
    assert train.read_log(tmp_path) == [{"split": "train", "step": 1}]
    (tmp_path / "log.jsonl").write_text('{"split": "train", "st\n{"split": "train", "step": 2}\n')
    with pytest.raises(train.UsageError, match="log.jsonl is damaged at line 1"):
        train.read_log(tmp_path)
    for line in ('[1, 2]', '{"split": "train"}', '"step"'):  # JSON, but not a record of a step
        (tmp_path / "log.jsonl").write_text('{"split": "train", "step": 1}\n' + line + '\n')
        with pytest.raises(train.UsageError, match="log.jsonl is damaged at line 2 \\(not a record with a step\\)"):
            train.read_log(tmp_path)
    train.train(tiny(tmp_path / "run", steps=2))
    run_dir = tmp_path / "run" / "copy-hebbian"
    (run_dir / "log.jsonl").write_text('[1, 2]\n' + (run_dir / "log.jsonl").read_text())
    before = {name: (run_dir / name).read_bytes() for name in RUN_FILES}
    with pytest.raises(train.UsageError, match="log.jsonl is damaged at line 1"):
        train.train(tiny(tmp_path / "run", steps=4, resume=True))
    assert all((run_dir / name).read_bytes() == data for name, data in before.items()), "a refused resume must change no file"


@pytest.mark.train
def test_a_run_saved_before_the_kept_training_options_resumes_at_their_old_values(tmp_path):
    """Checkpoints saved before --encoder-lr-scale and --deterministic trained at scale 1 and not
    deterministic (KEPT_ON_RESUME's defaults): they resume with those values, recorded as no change, and are
    refused with others, naming the option."""
    current = json.loads(json.dumps(dataclasses.asdict(tiny(tmp_path))))  # as config.json holds it
    saved = json.loads(json.dumps(current))
    for option in ("encoder_lr_scale", "deterministic"):
        del saved["train"][option]
    train.check_same_config(saved, current, "old")
    assert train.resumed_record(saved, current, 2, "old", steps_left=True) == [], "the old values are no change to record"
    changed = lambda **options: current | dict(train=current["train"] | options)
    with pytest.raises(train.UsageError, match="old was trained without --deterministic; resume"):
        train.check_same_config(saved, changed(deterministic=True), "old")
    with pytest.raises(train.UsageError, match="old was trained with --encoder-lr-scale 1.0, not 0.1; resume"):
        train.check_same_config(saved, changed(encoder_lr_scale=0.1), "old")


@pytest.mark.cli
def test_a_static_run_resumes_only_as_parameter_matched_as_it_was_trained(tmp_path, capsys):
    """--match-params sets the static model's width (d_model, which the user never gave), and --rule all always
    gives it: a static run resumed with it otherwise is refused in one sentence naming --match-params, and a
    static run trained alone without it is refused by --rule all --resume (finished or not) with the fix that
    works there (alone, with --rule none), leaving every file as it was. A plastic run's width ignores it. The
    static run of --rule all resumes alone without the fast-weight options --rule all gave it, but for those that
    set the parameter count --match-params matched (--plastic-blocks), which are named. --rule all --resume with none of its runs in --out-dir is refused too, rather than training all three."""
    def refused(argv, message, folder):
        before = {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()}
        assert train.main(argv) == 2, f"{argv}: should be refused"
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, f"{argv}: one sentence with {message!r}, got {err!r}"
        assert {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()} == before, f"{argv}: a refusal changes no file"
    matched = tmp_path / "matched"
    assert train.main(tiny_argv(matched, "--steps", "2", "--match-params")) == 0
    refused(tiny_argv(matched, "--steps", "3", "--resume"), "was trained with --match-params (as --rule all does); "
            "resume it with that option", matched)
    assert train.main(tiny_argv(matched, "--steps", "3", "--resume", "--match-params")) == 0, "resumed as it was trained"
    alone = tmp_path / "alone"
    assert train.main(tiny_argv(alone, "--steps", "2")) == 0
    for state in ("finished", "unfinished"):
        if state == "unfinished":
            (alone / "copy-none" / "results.json").unlink()
        refused(tiny_argv(alone, "--steps", "2", "--resume", "--rule", "all"), "was trained without --match-params, "
                "which --rule all always gives; resume it alone with --rule none", alone)
    plastic = tmp_path / "plastic"
    assert train.main(tiny_argv(plastic, "--steps", "2", "--rule", "hebbian", "--match-params")) == 0
    assert train.main(tiny_argv(plastic, "--steps", "3", "--rule", "hebbian", "--resume")) == 0, "a plastic run resumes"
    three = tmp_path / "three"  # --rule all gives its static run the fast-weight options, of which --match-params
    assert train.main(tiny_argv(three, "--steps", "1", "--rule", "all", "--eta", "0.05", "--plastic-blocks", "1")) == 0
    for options, message in ((["--eta", "0.05"], "--eta sets the fast weights, and the static model (--rule none) has "
                              "none (with --match-params it would not change the parameter count the width matches)"),
                             ([], "was matched (--match-params) to a plastic model with --plastic-blocks 1, whose "
                              "parameter count sets its width"),
                             (["--eta", "0.5", "--d-model", "24"], "--eta sets the fast weights")):
        refused(tiny_argv(three, "--steps", "2", "--rule", "none", "--resume", "--match-params", *options), message, three)
    refused(tiny_argv(three, "--steps", "2", "--rule", "none", "--resume", "--match-params", "--plastic-blocks", "1",
                      "--d-model", "24"), "was trained at the width --match-params matched, 18, and these options match 28; resume it with the "
            "run's own --d-model", three)  # its own option, not a fast weight's
    assert train.main(tiny_argv(three, "--steps", "2", "--resume", "--match-params", "--plastic-blocks", "1")) == 0, \
        "the static run of --rule all resumes alone with the option that set its width, without the one that did not"
    (tmp_path / "empty").mkdir()
    refused(tiny_argv(tmp_path / "empty", "--steps", "2", "--resume", "--rule", "all"), "there is no run to resume in",
            tmp_path / "empty")


@pytest.mark.train
def test_a_run_saved_before_the_split_and_augmentation_options_resumes_as_it_was_trained():
    """Runs saved before --split, --augment, --train-way, --positions, --isolate-queries, --train-shot,
    --encoder-widths and --train-on-val trained on Lake's split without augmentation, on as many classes and
    shots as they tested, with position embeddings, with queries that saw each other, with encoder_channels
    in every block and without the validation classes: they resume with those options, and are refused with
    the new defaults, naming the option; an option of another task is no reason to refuse."""
    def configs(name, positions=True, encoder_widths=None, **task):
        current = json.loads(json.dumps(dataclasses.asdict(RunConfig(  # as config.json holds it
            model=Config(positions=positions, encoder_widths=encoder_widths), task=TaskConfig(name=name, **task)))))
        saved = json.loads(json.dumps(current))
        for option in ("omniglot_split", "augment", "train_way", "isolate_queries", "train_shot", "train_on_val"):
            del saved["task"][option]
        for option in ("positions", "encoder_widths"):
            del saved["model"][option]
        return saved, current
    old = dict(isolate_queries=False)
    train.check_same_config(*configs("omniglot", omniglot_split="lake", augment=False, **old), "old")
    with pytest.raises(train.UsageError, match="old was trained without --isolate-queries; resume"):
        train.check_same_config(*configs("omniglot", omniglot_split="lake", augment=False), "old")
    with pytest.raises(train.UsageError, match="was trained with --split lake, not vinyals; resume"):
        train.check_same_config(*configs("omniglot", augment=False, **old), "old")
    with pytest.raises(train.UsageError, match="was trained without --augment; resume"):
        train.check_same_config(*configs("omniglot", omniglot_split="lake", **old), "old")
    train.check_same_config(*configs("cifar_fs", augment=False, **old), "old")
    saved, current = configs("cifar_fs", augment=False, **old)
    saved["task"]["omniglot_split"] = "lake"  # what --split lake did to CIFAR-FS before it was refused: nothing
    train.check_same_config(saved, current, "old")
    with pytest.raises(train.UsageError, match="was trained without --augment; resume"):
        train.check_same_config(*configs("cifar_fs", **old), "old")
    train.check_same_config(*configs("copy"), "old")
    with pytest.raises(train.UsageError, match="was trained with --positions; resume"):
        train.check_same_config(*configs("copy", positions=False), "old")
    with pytest.raises(train.UsageError, match="was trained without --train-way, not with --train-way 10; resume"):
        train.check_same_config(*configs("cifar_fs", augment=False, train_way=10, **old), "old")
    with pytest.raises(train.UsageError, match="old was trained with --train-shot 5, not 1; resume"):  # saved without it: trained at shot
        train.check_same_config(*configs("cifar_fs", augment=False, shot=5, train_shot=1, **old), "old")
    train.check_same_config(*configs("cifar_fs", augment=False, train_shot=1, **old), "old")  # 1-shot either way
    with pytest.raises(train.UsageError, match="was trained without --encoder-widths, not with --encoder-widths 96 192 384 512; resume"):
        train.check_same_config(*configs("cifar_fs", augment=False, encoder_widths=(96, 192, 384, 512), **old), "old")
    train.check_same_config(*configs("copy", encoder_widths=(96, 192, 384, 512)), "old")  # no images: no encoder
    with pytest.raises(train.UsageError, match="was trained without --train-on-val; resume"):
        train.check_same_config(*configs("omniglot", omniglot_split="lake", augment=False, train_on_val=True, **old), "old")


@pytest.mark.train
def test_a_run_saved_with_train_shot_none_resumes_under_a_default_of_the_same_shots():
    """train_shot None trains at shot: a 1-shot Omniglot run saved with None resumes under the task's
    default of one training shot, and a 5-shot one, which trained at 5, is refused under it."""
    def config(shot, train_shot):
        return dataclasses.asdict(RunConfig(task=TaskConfig(name="omniglot", shot=shot, train_shot=train_shot)))
    train.check_same_config(config(1, None), config(1, 1), "old")
    with pytest.raises(train.UsageError, match="old was trained with --train-shot 5, not 1; resume"):
        train.check_same_config(config(5, None), config(5, 1), "old")
    train.check_same_config(config(5, None), config(5, 5), "old")


@pytest.mark.train
def test_a_refused_resume_names_the_task_option_not_the_model_size_that_follows_from_it():
    """A 5-shot run saved with ten training classes (before more shots trained way-way) differs in the task's
    train_way and in the model's d_in (one label per training class): the refusal names --train-way's field."""
    def config(train_way):
        return dataclasses.asdict(RunConfig(model=Config(d_in=train_way), task=TaskConfig(name="omniglot", shot=5, train_way=train_way)))
    with pytest.raises(train.UsageError, match="old was trained with --train-way 10, not 5; resume"):
        train.check_same_config(config(10), config(5), "old")


@pytest.mark.train
def test_init_encoder_refuses_an_encoder_trained_on_the_other_omniglot_split(tmp_path):
    """Vinyals's training characters include Lake's test characters, Lake's Vinyals's validation ones: an
    encoder is read only into a run of the split it learnt (config.json beside best.pt says which; train.py's
    runs saved before --split trained on Lake's), and one without a config.json is not refused."""
    model_cfg = Config(image_shape=(1, 28, 28))
    encoder = {f"encoder.{k}": v for k, v in train.Conv4(1, model_cfg.conv4_widths()).state_dict().items()}
    saved = {"pretrained": {"task": "omniglot", "split": "vinyals"}, "old run": {"train": {}, "task": {"name": "omniglot"}},
             "bare": None}
    for name, config in saved.items():
        (tmp_path / name).mkdir()
        torch.save({"model": encoder}, tmp_path / name / "best.pt")
        if config:
            (tmp_path / name / "config.json").write_text(json.dumps(config))
    for name, split, refused in (("pretrained", "lake", True), ("pretrained", "vinyals", False),
                                 ("old run", "vinyals", True), ("old run", "lake", False), ("bare", "lake", False)):
        read = lambda: train.read_encoder(str(tmp_path / name), model_cfg, TaskConfig(name="omniglot", omniglot_split=split))
        if refused:
            with pytest.raises(train.UsageError, match=f"trained on Omniglot's .* split, .* of the {split} split"):
                read()
        else:
            assert read().keys() == {k.removeprefix("encoder.") for k in encoder}, f"{name} should load into a {split} run"


@pytest.mark.train
def test_init_encoder_refuses_an_encoder_trained_on_the_validation_classes_for_a_run_that_validates_on_them(tmp_path):
    """A train.py run with --train-on-val learnt the validation classes: its encoder starts only runs that train
    on them too (else their validation would score classes the encoder learnt); pretrain.py's never did."""
    model_cfg = Config(image_shape=(3, 32, 32))
    encoder = {f"encoder.{k}": v for k, v in train.Conv4(3, model_cfg.conv4_widths()).state_dict().items()}
    saved = {"with val": {"train": {}, "task": {"name": "cifar_fs", "train_on_val": True}},
             "without": {"train": {}, "task": {"name": "cifar_fs", "train_on_val": False}},
             "pretrained": {"task": "cifar_fs", "split": "vinyals"}}
    for name, config in saved.items():
        (tmp_path / name).mkdir()
        torch.save({"model": encoder}, tmp_path / name / "best.pt")
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "copied").mkdir()  # a best.pt copied away from its folder: its own config says what it learnt
    torch.save({"model": encoder, "config": saved["with val"]}, tmp_path / "copied" / "best.pt")
    for name, on_val, refused in (("with val", False, True), ("with val", True, False), ("without", False, False),
                                  ("without", True, False), ("pretrained", False, False), ("pretrained", True, False),
                                  ("copied", False, True), ("copied", True, False)):
        read = lambda: train.read_encoder(str(tmp_path / name), model_cfg, TaskConfig(name="cifar_fs", train_on_val=on_val))
        if refused:
            with pytest.raises(train.UsageError, match="trained on the validation classes too .*add --train-on-val"):
                read()
        else:
            assert read().keys() == {k.removeprefix("encoder.") for k in encoder}, \
                f"the encoder of {name!r} should load into a run with train_on_val={on_val}"


@pytest.mark.train
def test_init_encoder_starts_from_another_runs_encoder_and_the_rest_as_without_it(tmp_path, offline):
    """--init-encoder: the encoder's weights and batch-norm statistics are those of the given run's best.pt;
    every other parameter is what the same seed gives without the option."""
    train.train(tiny(tmp_path / "static", "cifar_fs", "none"))
    source_dir = tmp_path / "static" / "cifar_fs-none"
    source = torch.load(source_dir / "best.pt", weights_only=True)["model"]
    task = synthetic_few_shot(TaskConfig(name="cifar_fs", **TINY_TASKS["cifar_fs"]))
    run = train.resolve(tiny(tmp_path, "cifar_fs", "hebbian"), task)
    started = train.build_training(run, task, torch.device("cpu"), train.read_encoder(str(source_dir), run.model, run.task))[0].state_dict()
    fresh = train.build_training(run, task, torch.device("cpu"))[0].state_dict()
    assert any(not torch.equal(source[k], fresh[k]) for k in fresh if k.startswith("encoder.")), "setup: the encoders should differ"
    for name, value in started.items():
        expected = source[name] if name.startswith("encoder.") else fresh[name]
        assert torch.equal(value, expected), f"{name} is not {'the source run' if name.startswith('encoder.') else 'a fresh model'}'s"
    result = train.train(tiny(tmp_path, "cifar_fs", "hebbian", init_encoder=str(source_dir)))
    assert result["config"]["train"]["init_encoder"] == str(source_dir), "config.json should say where the encoder came from"


@pytest.mark.train
def test_init_encoder_refuses_a_missing_damaged_or_mismatched_source_before_writing(tmp_path, offline):
    train.train(tiny(tmp_path / "omniglot", "omniglot", "none"))  # a 1-channel encoder
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    for source, message in [(tmp_path / "nowhere", "there is no"), (damaged, "not a readable checkpoint"),
                            (tmp_path / "omniglot" / "omniglot-none", "no Conv4 encoder for 3-channel images")]:
        with pytest.raises(train.UsageError, match=message):
            train.train(tiny(tmp_path / "out", "cifar_fs", init_encoder=str(source)))
        assert not (tmp_path / "out" / "cifar_fs-hebbian").exists(), f"a refused --init-encoder {source} wrote a run folder"
    with pytest.raises(train.UsageError, match="needs an image task"):
        train.train(tiny(tmp_path / "out", "copy", init_encoder=str(damaged)))


@pytest.mark.train
def test_encoder_lr_scale_steps_the_encoder_at_its_fraction_of_each_steps_rate():
    """--encoder-lr-scale s: the optimizer steps the image encoder as AdamW at s times the scheduled rate,
    and everything else as AdamW at the rate; the reference is two separate AdamW optimizers in float64.
    At s = 1 there is one group of every parameter, as in checkpoints saved before the option."""
    task = synthetic_few_shot(TaskConfig(name="cifar_fs", **TINY_TASKS["cifar_fs"]))
    run = train.resolve(tiny("unused", "cifar_fs", "hebbian", encoder_lr_scale=0.25), task)
    model = PlasticGPT(run.model).double()
    reference = PlasticGPT(run.model).double()
    reference.load_state_dict(model.state_dict())
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = train.make_optimizer(model, run.train, graphed=False)
    is_encoder = lambda name: name.startswith("encoder.")
    by_name = lambda m, encoder: [p for n, p in m.named_parameters() if is_encoder(n) == encoder]
    kwargs = dict(weight_decay=run.train.weight_decay)
    encoder_ref = torch.optim.AdamW(by_name(reference, True), lr=run.train.lr, **kwargs)
    rest_ref = torch.optim.AdamW(by_name(reference, False), lr=run.train.lr, **kwargs)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        rate = train.learning_rate(step, run.train)
        train.set_learning_rate(optimizer, rate)
        encoder_ref.param_groups[0]["lr"], rest_ref.param_groups[0]["lr"] = 0.25 * rate, rate
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            q.grad = p.grad.clone()
        optimizer.step(), encoder_ref.step(), rest_ref.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), \
            f"{name} after 3 steps is not AdamW's at {'0.25 times ' if is_encoder(name) else ''}the rate"
    still = [name for name, p in model.named_parameters() if torch.equal(p, initial[name])]
    assert not still, f"setup: every parameter should have moved, not {still}"
    graphed = train.make_optimizer(model, run.train, graphed=True)  # for a CUDA graph: each group's rate a tensor
    tensors = [group["lr"] for group in graphed.param_groups]
    train.set_learning_rate(graphed, 0.5)
    assert all(group["lr"] is t for group, t in zip(graphed.param_groups, tensors)) and [t.item() for t in tensors] == [0.5, 0.125], \
        "a recorded CUDA graph reads each group's rate tensor: it should be filled in place with the rate times the scale"
    whole = train.make_optimizer(model, dataclasses.replace(run.train, encoder_lr_scale=1.0), graphed=False)
    assert len(whole.param_groups) == 1 and len(whole.param_groups[0]["params"]) == len(list(model.parameters())), \
        "at scale 1 the optimizer should hold one group of every parameter, as checkpoints from before the option do"


@pytest.mark.train
def test_encoder_lr_scale_0_trains_the_rest_as_a_model_whose_encoder_takes_no_gradient():
    """At --encoder-lr-scale 0 the rest of the model steps as it would with the encoder frozen
    (requires_grad False, one optimizer group): the kept encoder's gradients must not enter the clipping
    norm. The clip is small, so that every step is clipped, and three steps, since Adam's first step does
    not depend on the gradient's scale."""
    task = synthetic_few_shot(TaskConfig(name="cifar_fs", **TINY_TASKS["cifar_fs"]))
    run = train.resolve(tiny("unused", "cifar_fs", "hebbian", encoder_lr_scale=0.0, grad_clip=1e-3), task)
    frozen_run = dataclasses.replace(run.train, encoder_lr_scale=1.0)
    torch.manual_seed(0)
    model, reference = PlasticGPT(run.model), PlasticGPT(run.model)
    reference.load_state_dict(model.state_dict())
    reference.encoder.requires_grad_(False)
    cpu = torch.device("cpu")
    step = train.make_train_step(model, train.make_optimizer(model, run.train, graphed=False), task, run.train, cpu)
    reference_step = train.make_train_step(reference, train.make_optimizer(reference, frozen_run, graphed=False),
                                           task, frozen_run, cpu)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = task.sample(4, "train", "cpu", generator)
        step(batch), reference_step(batch)
        assert any(p.grad is not None and p.grad.norm() > 0 for p in model.encoder.parameters()), \
            "setup: the kept encoder should have gradients, for the clipping to leave out"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), \
            f"{name} at --encoder-lr-scale 0 differs from its value with the encoder frozen by " \
            f"{(p - q).abs().max():.2e}: the kept encoder's gradients shrank the clipped step"


@pytest.mark.train
def test_encoder_lr_scale_0_keeps_an_init_encoders_weights_and_refuses_a_resume_at_another_scale(tmp_path, offline):
    """At 0 the encoder's weights stay those of --init-encoder's source to the last bit while the rest trains
    (its batch-norm statistics follow the training images); a run resumes only at its own scale, since the
    scale decides the optimizer's groups; a task without images refuses the option."""
    train.train(tiny(tmp_path / "source", "cifar_fs", "none"))
    source_dir = tmp_path / "source" / "cifar_fs-none"
    source = torch.load(source_dir / "best.pt", weights_only=True)["model"]
    train.train(tiny(tmp_path, "cifar_fs", "hebbian", init_encoder=str(source_dir), encoder_lr_scale=0.0, eval_interval=4))
    trained = torch.load(tmp_path / "cifar_fs-hebbian" / "best.pt", weights_only=True)["model"]
    weights = [k for k in source if k.startswith("encoder.") and not k.split(".")[-1].startswith(("running_", "num_batches"))]
    changed = [k for k in weights if not torch.equal(source[k], trained[k])]
    assert weights and not changed, f"at --encoder-lr-scale 0 the encoder's weights changed: {changed}"
    assert not torch.equal(source["encoder.net.1.running_mean"], trained["encoder.net.1.running_mean"]), \
        "the encoder's batch-norm statistics should follow the training images"
    with pytest.raises(train.UsageError, match="trained with --encoder-lr-scale 0.0, not 1.0"):
        train.train(tiny(tmp_path, "cifar_fs", "hebbian", init_encoder=str(source_dir), resume=True))
    for init_encoder, trained_with in ((None, f"with --init-encoder {source_dir}; resume"),
                                       (str(tmp_path / "source"), f"with --init-encoder {source_dir}, not")):
        with pytest.raises(train.UsageError, match=trained_with):  # a resume would ignore it, and config.json record it
            train.train(tiny(tmp_path, "cifar_fs", "hebbian", init_encoder=init_encoder, encoder_lr_scale=0.0, resume=True))
    with pytest.raises(train.UsageError, match="cifar_fs-none/checkpoint.pt was trained without --init-encoder, not with --init-encoder "):
        train.train(tiny(tmp_path / "source", "cifar_fs", "none", init_encoder=str(source_dir), resume=True))
    (source_dir / "best.pt").rename(source_dir / "moved.pt")  # a resume starts from its checkpoint, not the source again
    again = train.train(tiny(tmp_path, "cifar_fs", "hebbian", init_encoder=str(source_dir), encoder_lr_scale=0.0,
                             eval_interval=4, steps=6, resume=True))  # its own options: it goes on
    assert again["config"]["train"]["init_encoder"] == str(source_dir) and again["config"]["train"]["steps"] == 6
    with pytest.raises(train.UsageError, match="copy has no images; drop it"):
        train.train(tiny(tmp_path / "copy", "copy", encoder_lr_scale=0.5))
    assert not (tmp_path / "copy").exists(), "a refused --encoder-lr-scale wrote a run folder"


@pytest.mark.train
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    def task_whose_loss_breaks_at_step_5(cfg):
        task = tasks.make_task_from_config(cfg)
        loss, calls = task.loss, []

        def broken(out, batch):
            calls.append(1)
            return loss(out, batch) * (float("nan") if len(calls) >= 5 else 1.0)
        task.loss = broken
        return task

    monkeypatch.setattr(train, "make_task_from_config", task_whose_loss_breaks_at_step_5)
    with pytest.raises(train.Diverged, match=r"at step 5; lower --eta .* --max-norm") as error:
        train.train(tiny(tmp_path, "copy", "gradient", steps=8))
    assert "checkpoint" in str(error.value), "the message should say where the last good checkpoint is"
    checkpoint = torch.load(tmp_path / "copy-gradient/checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4 and all(torch.isfinite(p).all() for p in checkpoint["model"].values()), \
        "the checkpoint before the divergence (step 4) should stay, with finite parameters"


# ----------------------------------------------------------------------------------------------
# The protocol: which split when, with which seed, which model is tested


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Every batch task.sample draws in a tiny run (4 steps, validation at 2 and 4), in order:
    (split, the batch's first sequence)."""
    calls = []

    def recording_task(cfg):
        task = tasks.make_task_from_config(cfg)
        sample = task.sample

        def recording_sample(batch_size, split="train", device="cpu", generator=None):
            batch = sample(batch_size, split, device, generator)
            calls.append((split, batch.x[0].clone()))
            return batch
        task.sample = recording_sample
        return task

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "make_task_from_config", recording_task)
        train.train(tiny(tmp_path_factory.mktemp("sampled"), "copy", "none"))
    return calls


@pytest.mark.train
def test_splits_are_train_then_validation_and_test_only_at_the_end(sampled):
    order = [split for i, (split, _) in enumerate(sampled) if i == 0 or split != sampled[i - 1][0]]
    assert order == ["train", "val", "train", "val", "test"], \
        f"4 steps validated at 2 and 4 should sample train, val, train, val, then test; sampled {order}"


@pytest.mark.train
def test_each_logged_training_record_is_its_intervals_own(tmp_path, monkeypatch):
    """With a clock that advances 5 ms per training step and 1 s per validation, every training record of
    log.jsonl reads 5 ms/step and 4 sequences per 5 ms (validation left out of the interval), and its loss
    and metric are the means of the steps since the record before."""
    now, steps, build_training, evaluate = [0.0], [], train.build_training, train.evaluate

    def timed(run, task, device, encoder=None):
        model, optimizer, train_step, graphed = build_training(run, task, device, encoder)

        def step(batch):
            now[0] += 0.005
            loss, out = train_step(batch)
            steps.append((loss.item(), task.metric(out.float(), batch).mean().item()))
            return loss, out
        return model, optimizer, step, graphed

    def slow(*args, **kwargs):
        now[0] += 1.0
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(train, "build_training", timed)
    monkeypatch.setattr(train, "evaluate", slow)
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    train.train(tiny(tmp_path, "copy", "none", steps=6, log_interval=3, eval_interval=2))
    records = [r for r in train.read_log(tmp_path / "copy-none") if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 6], "a record at step 1, each validation and each log_interval"
    for record, first in zip(records, [0, 1, 2, 3, 4]):
        interval = steps[first:record["step"]]
        assert record["ms_per_step"] == pytest.approx(5.0) and record["per_second"] == pytest.approx(4 / 0.005), \
            f"step {record['step']}: {record['ms_per_step']} ms/step, {record['per_second']}/s; expected 5 and 800"
        for i, key in enumerate(("loss", "metric")):
            want = np.mean([values[i] for values in interval])
            assert record[key] == pytest.approx(want, rel=1e-5), f"step {record['step']}: {key} {record[key]} is not its interval's mean {want}"


@pytest.mark.train
def test_every_validation_scores_the_same_episodes(sampled):
    """The best checkpoint is chosen among validations of the same episodes (seed + 1 each time)."""
    validations = [sequence for split, sequence in sampled if split == "val"]
    assert len(validations) == 2 and torch.equal(validations[0], validations[1]), \
        "the validations at steps 2 and 4 should draw the same first episode"


@pytest.mark.train
def test_training_validation_and_test_episodes_have_their_own_seeds(sampled):
    first = {}
    for split, sequence in sampled:
        first.setdefault(split, sequence)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not torch.equal(first[a], first[b]), f"the first {a} and {b} sequences are the same: their seeds must differ"


def scripted_validation(monkeypatch, scores):
    """train.evaluate returns `scores` in turn for the validations and runs the real evaluation for the
    test. Returns the list that receives the state dict of every model the test evaluates."""
    evaluate, scores, tested = train.evaluate, iter(scores), []

    def scripted(model, task, split, *args, **kwargs):
        if split == "val":
            return torch.full((4,), next(scores)), {}
        tested.append({name: value.clone() for name, value in model.state_dict().items()})
        return evaluate(model, task, split, *args, **kwargs)
    monkeypatch.setattr(train, "evaluate", scripted)
    return tested


@pytest.mark.train
@pytest.mark.parametrize("task, best_step", [("copy", 4), ("omniglot", 6)], ids=["mse-lower", "accuracy-higher"])
def test_best_step_has_the_best_validation_score_in_the_tasks_direction(tmp_path, monkeypatch, offline, task, best_step):
    """Validation scores 0.5, 0.1, 0.9 at steps 2, 4, 6: the best MSE is at step 4, the best accuracy at step 6."""
    scripted_validation(monkeypatch, [0.5, 0.1, 0.9])
    results = train.train(tiny(tmp_path, task, "none", steps=6))
    saved = torch.load(tmp_path / f"{task}-none" / "best.pt", weights_only=True)
    assert results["best_step"] == saved["step"] == best_step, \
        f"{task}: the best of the scores 0.5, 0.1, 0.9 is at step {best_step}, not {results['best_step']} (best.pt: {saved['step']})"


@pytest.mark.train
def test_train_on_val_keeps_and_tests_the_last_model_whatever_validation_says(tmp_path, monkeypatch, offline):
    """With --train-on-val validation scores classes the model trains on, so it chooses nothing: accuracies
    0.9, 0.5, 0.1 at steps 2, 4, 6 (the run killed at step 5 and resumed from step 4's checkpoint, whose best
    is step 4's) keep the step-6 model as best.pt, flag every validation, and test that model."""
    tested = scripted_validation(monkeypatch, [0.9, 0.5, 0.1])
    cfg = tiny(tmp_path, "omniglot", "none", steps=6)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, train_on_val=True))
    revive = kill_at_step(monkeypatch, 5)
    with pytest.raises(Interrupted):
        train.train(cfg)
    revive()
    results = train.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True)))
    best = torch.load(tmp_path / "omniglot-none" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "omniglot-none" / "checkpoint.pt", weights_only=True)
    assert results["best_step"] == best["step"] == last["step"] == 6, \
        f"the last model (step 6) is kept, not the step-{results['best_step']} one of the best validation"
    assert results["best_val"] == pytest.approx(0.1), f"best_val is the kept model's validation, 0.1, not {results['best_val']}"
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"]), "best.pt must be the last model"
    assert tested and all(torch.equal(state[k], last["model"][k]) for state in tested for k in state), \
        "the final test must run on the last model"
    flagged = [r["step"] for r in train.read_log(tmp_path / "omniglot-none") if r["split"] == "val" and r["best"]]
    assert flagged == [2, 4, 6], f"log.jsonl should flag every validation's model as kept, flagged {flagged}"


@pytest.mark.train
def test_final_test_uses_the_weights_of_best_pt(tmp_path, monkeypatch):
    """MSE validation scores 0.1 at step 2 and 0.5 at step 4: the test must run on the step-2 model, not the last."""
    tested = scripted_validation(monkeypatch, [0.1, 0.5])
    train.train(tiny(tmp_path, "copy", "none"))
    best = torch.load(tmp_path / "copy-none" / "best.pt", weights_only=True)["model"]
    last = torch.load(tmp_path / "copy-none" / "checkpoint.pt", weights_only=True)["model"]
    assert any(not torch.equal(best[name], last[name]) for name in best), "setup: the best and the last model should differ"
    assert tested, "the final test never called evaluate()"
    for state in tested:
        different = [name for name in best if not torch.equal(state[name], best[name])]
        assert not different, f"the final test ran on weights other than best.pt's: {different}"


@pytest.mark.train
@pytest.mark.parametrize("task", ["copy", "omniglot"], ids=["mse-lower", "accuracy-higher"])
def test_only_a_strictly_better_validation_replaces_the_best_and_best_val_is_its_score(tmp_path, monkeypatch, offline, task):
    """Validation scores 0.3, 0.3, 0.2 at steps 2, 4, 6 (copy: 0.3 is worse than 0.2; omniglot: better): a tie
    keeps the earlier best, and results.json's best_val is the best score, not the last."""
    scripted_validation(monkeypatch, [0.3, 0.3, 0.2])
    results = train.train(tiny(tmp_path, task, "none", steps=6))
    best_step, best_val = (6, 0.2) if task == "copy" else (2, 0.3)
    saved = torch.load(tmp_path / f"{task}-none" / "best.pt", weights_only=True)
    assert results["best_step"] == saved["step"] == best_step, \
        f"{task}: a tie is no improvement, so the best of 0.3, 0.3, 0.2 is at step {best_step}, not {results['best_step']}"
    assert results["best_val"] == pytest.approx(best_val), f"{task}: best_val should be {best_val}, the best step's score, not {results['best_val']}"
    flagged = [r["step"] for r in train.read_log(tmp_path / f"{task}-none") if r["split"] == "val" and r["best"]]
    assert flagged == ([2, 6] if task == "copy" else [2]), f"{task}: log.jsonl should flag only strict improvements, flagged {flagged}"


@pytest.mark.train
def test_validation_scores_eval_episodes_of_seed_plus_one(tmp_path, monkeypatch):
    """Every validation evaluates --eval-episodes episodes of the validation split with seed + 1 (the episodes
    pretrain.py validates on too), and the test --test-episodes of seed + 2."""
    calls, evaluate = [], train.evaluate

    def recorded(model, task, split, episodes, batch_size, device, seed, **kwargs):
        calls.append((split, episodes, seed, kwargs.get("eta")))
        return evaluate(model, task, split, episodes, batch_size, device, seed, **kwargs)
    monkeypatch.setattr(train, "evaluate", recorded)
    train.train(tiny(tmp_path, "copy", "none", seed=5, eval_episodes=3, test_episodes=6))
    want = [("val", 3, 6, None), ("val", 3, 6, None), ("test", 6, 7, None)]
    assert calls == want, f"validations at steps 2 and 4 on 3 episodes of seed 6, the test on 6 of seed 7: want {want}, got {calls}"
    rates = {r["step"]: r["lr"] for r in train.read_log(tmp_path / "copy-none") if r["split"] == "train"}
    want_rates = {step: 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 4))) for step in (1, 2, 4)}  # no warm-up: 4 // 20
    assert rates == pytest.approx(want_rates), f"log.jsonl's lr should be each step's scheduled rate {want_rates}, got {rates}"


@pytest.mark.train
def test_a_resume_keeps_the_best_so_far_and_the_training_time_before_it(tmp_path, monkeypatch):
    """MSE validations 0.1 (step 2), 0.5 (step 4), killed at step 5, resumed from the step-4 checkpoint, 0.3 at
    step 6: the best stays step 2's (the checkpoint carries it), and train_time_s counts the steps before the
    resume too. A clock that advances 10 s per training step: 6 steps, 60 s."""
    now, build_training = [0.0], train.build_training

    def timed(run, task, device, encoder=None):
        model, optimizer, train_step, graphed = build_training(run, task, device, encoder)

        def step(batch):
            now[0] += 10.0
            return train_step(batch)
        return model, optimizer, step, graphed

    scripted_validation(monkeypatch, [0.1, 0.5, 0.3])
    monkeypatch.setattr(train, "build_training", timed)
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    revive = kill_at_step(monkeypatch, 5)
    cfg = tiny(tmp_path, "copy", "none", steps=6)
    with pytest.raises(Interrupted):
        train.train(cfg)
    revive()
    cfg.train.resume = True
    results = train.train(cfg)
    saved = torch.load(tmp_path / "copy-none" / "best.pt", weights_only=True)
    assert (results["best_step"], saved["step"]) == (2, 2) and results["best_val"] == pytest.approx(0.1), \
        f"after the resume the best should stay step 2's 0.1, got step {results['best_step']} ({results['best_val']}), best.pt step {saved['step']}"
    assert results["train_time_s"] == pytest.approx(60.0), \
        f"6 steps of 10 s, 4 before the resume: train_time_s should be 60, got {results['train_time_s']}"


@pytest.mark.train
def test_only_match_params_widens_the_static_model():
    task = tasks.make_task("copy")
    for rule, match, widened in (("none", False, False), ("none", True, True), ("hebbian", True, False)):
        cfg = RunConfig(train=TrainConfig(rule=rule, steps=700, match_params=match), model=Config(d_model=64, n_layer=2),
                        task=TaskConfig("copy"))
        d_model = train.resolve(cfg, task).model.d_model
        assert (d_model != 64) == widened, f"rule {rule}, match_params={match}: d_model should {'' if widened else 'not '}change, got {d_model}"


@pytest.mark.train
def test_compare_checks_every_rules_folder_before_training_any(tmp_path):
    (tmp_path / "copy-gradient").mkdir()
    (tmp_path / "copy-gradient" / "config.json").write_text("{}")
    with pytest.raises(train.UsageError, match="copy-gradient holds an unfinished run already; it has no checkpoint.pt to "
                       "resume from: replace it with --overwrite"):  # not --resume, which would fail for want of one
        train.compare(tiny(tmp_path, "copy", "all", steps=2))
    assert sorted(os.listdir(tmp_path)) == ["copy-gradient"], \
        f"a refused --rule all should train nothing, yet wrote {sorted(os.listdir(tmp_path))}"


@pytest.mark.train
def test_a_warmup_of_0_is_allowed_and_starts_at_the_full_rate():
    task = tasks.make_task("copy")
    tc = train.resolve(RunConfig(train=TrainConfig(steps=700, warmup=0), task=TaskConfig("copy")), task).train
    assert tc.warmup == 0, f"--warmup 0 should stay 0, got {tc.warmup}"
    assert train.learning_rate(1, tc) == pytest.approx(tc.lr, rel=1e-4), "without warm-up step 1 runs at about the peak rate"


@pytest.mark.train
def test_resume_with_dropout_restores_the_global_rng_and_reaches_the_same_parameters(tmp_path, monkeypatch):
    """Dropout draws from torch's global generator: a resume must restore it from the checkpoint, as it does the
    sequences' generator, so that 2 steps + resume + 2 steps give the parameters of 4 straight steps."""
    options = dict(model=dict(dropout=0.5), steps=4, eval_interval=2)
    train.train(tiny(tmp_path / "straight", "copy", "none", **options))
    revive = kill_at_step(monkeypatch, 3)
    cfg = tiny(tmp_path / "resumed", "copy", "none", **options)
    with pytest.raises(Interrupted):
        train.train(cfg)
    revive()
    torch.manual_seed(1234)  # the resumed process's global generator is wherever it happens to be
    cfg.train.resume = True
    train.train(cfg)
    a = torch.load(tmp_path / "straight/copy-none/checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/copy-none/checkpoint.pt", weights_only=True)["model"]
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"with dropout, 2 steps + resume + 2 steps differ from 4 straight steps in {different}"


@pytest.mark.train
def test_rule_all_resume_reuses_a_finished_rule_and_starts_the_ones_not_started(tmp_path):
    """--rule all --resume reuses a finished run only as it is: another --lr at the same --steps is refused as a
    single rule's resume refuses it (no file changed), and more --steps trains all three on, each recording the
    resume; a plastic run resumed alone after --rule all does not record --match-params, which it never read."""
    first = train.train(tiny(tmp_path, "copy", "none", steps=2, match_params=True))
    out = train.compare(tiny(tmp_path, "copy", "all", steps=2, resume=True))
    assert tuple(r["rule"] for r in out["runs"]) == train.RULES, "every rule should have its results"
    assert out["runs"][0] == first, "the finished static run should be reused as it is"
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    with pytest.raises(train.UsageError, match="has trained all its 2 steps, so --lr 0.0005 would change nothing"):
        train.compare(tiny(tmp_path, "copy", "all", steps=2, lr=5e-4, resume=True))
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before, "a refusal changes no file"
    with pytest.raises(train.UsageError, match="trained 2 steps, past --steps 1; resume with --steps 2 or more"):
        train.compare(tiny(tmp_path, "copy", "all", steps=1, resume=True))
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before, "a refusal changes no file"
    train.compare(tiny(tmp_path, "copy", "all", steps=3, lr=5e-4, resume=True))
    for rule in train.RULES:
        config = json.loads((tmp_path / f"copy-{rule}" / "config.json").read_text())
        assert config["train"]["steps"] == 3 and config.get("resumed") == [dict(step=2, steps=[2, 3], lr=[1e-3, 5e-4])], \
            f"{rule}: trained on to step 3 with the resume recorded, got {config['train']['steps']}, {config.get('resumed')}"
    saved = json.loads((tmp_path / "copy-hebbian" / "config.json").read_text())
    alone = saved | dict(train=saved["train"] | dict(match_params=False))
    assert train.resumed_record(saved, alone, 3, "run", steps_left=True) == saved["resumed"], \
        "--match-params, which a plastic run never reads, is no change to record"


@pytest.mark.train
def test_a_resume_that_would_relabel_or_retest_a_finished_run_is_refused_and_changes_no_file(tmp_path):
    """--steps below the checkpoint's step would train nothing and record the fewer steps in config.json; other
    --test-episodes would replace a finished run's results.json with a test of other episodes."""
    train.train(tiny(tmp_path, steps=4))
    run_dir = tmp_path / "copy-hebbian"
    before = {name: (run_dir / name).read_bytes() for name in RUN_FILES}
    with pytest.raises(train.UsageError, match="is at step 4, past --steps 2; resume with --steps 4 or more"):
        train.train(tiny(tmp_path, steps=2, resume=True))
    with pytest.raises(train.UsageError, match="was trained with --test-episodes 8, not 16; resume with the run's own options, or start it again with --overwrite"):
        train.train(tiny(tmp_path, test_episodes=16, resume=True))
    assert all((run_dir / name).read_bytes() == data for name, data in before.items()), "a refused resume must change no file"


@pytest.mark.train
def test_a_resume_records_the_training_options_it_changed_and_a_trained_run_refuses_idle_ones(tmp_path):
    """A resume that trains on with another --steps and --lr: config.json, results.json's config and the
    checkpoint (so a later resume keeps it) record under "resumed" the step it resumed at and each option it
    changed, [before, after], while the options themselves are the new ones; a second resume adds its own entry,
    one that changes nothing adds none. A run with every step trained refuses another --lr or --weight-decay (each
    would change nothing but config.json) in one sentence naming both values, and changes no file."""
    train.train(tiny(tmp_path, rule="none", steps=2))
    run_dir = tmp_path / "copy-none"
    train.train(tiny(tmp_path, rule="none", steps=4, lr=5e-4, resume=True))
    first = dict(step=2, steps=[2, 4], lr=[1e-3, 5e-4])
    for name in ("config.json", "results.json"):
        saved = json.loads((run_dir / name).read_text())
        config = saved if name == "config.json" else saved["config"]
        assert config["train"]["lr"] == 5e-4 and config.get("resumed") == [first], \
            f"{name}: the new lr, and the resume at step 2 with what it changed; got {config.get('resumed')}"
    train.train(tiny(tmp_path, rule="none", steps=6, lr=5e-4, resume=True))
    assert json.loads((run_dir / "config.json").read_text())["resumed"] == [first, dict(step=4, steps=[4, 6])], \
        "a second resume keeps the first's record and adds its own"
    train.train(tiny(tmp_path, rule="none", steps=6, lr=5e-4, resume=True))  # every step trained: tested again
    assert len(json.loads((run_dir / "config.json").read_text())["resumed"]) == 2, "a resume that changes nothing adds nothing"
    before = {name: (run_dir / name).read_bytes() for name in RUN_FILES}
    for option, value, was in (("lr", 1e-3, 5e-4), ("weight_decay", 0.5, 0.01)):
        with pytest.raises(train.UsageError, match=f"has trained all its 6 steps, so --{option.replace('_', '-')} {value} "
                                                   f"would change nothing but its config.json; give the run's own "
                                                   f"--{option.replace('_', '-')} {was} to test it again"):
            train.train(tiny(tmp_path, rule="none", steps=6, resume=True, **dict(lr=5e-4) | {option: value}))
    assert all((run_dir / name).read_bytes() == data for name, data in before.items()), "a refused resume must change no file"


@pytest.mark.train
def test_a_checkpoint_lacking_a_part_train_py_writes_is_refused_naming_only_that_part(tmp_path):
    """Each of the seven entries train_rule's save() writes is needed to resume (the optimizer's moments, the
    best score, the random states, ...): a checkpoint without one is refused in one sentence that names just it,
    and one whose config lacks its train, model or task section is refused as well, before anything reads it."""
    train.train(tiny(tmp_path, rule="none", steps=2))
    path = tmp_path / "copy-none" / "checkpoint.pt"
    whole = torch.load(path, weights_only=True)
    keys = ("model", "step", "config", "optimizer", "best", "train_time", "rng")
    assert set(whole) == set(keys), f"save() writes {sorted(whole)}, and this test checks {sorted(keys)}"
    for key in keys:
        torch.save({k: v for k, v in whole.items() if k != key}, path)
        with pytest.raises(train.UsageError) as refused:
            train.load_checkpoint(str(path))
        assert f"(it lacks {key}); start the run again with --overwrite" in str(refused.value), \
            f"a checkpoint without {key} should be refused naming {key} alone: {refused.value}"
    for section in ("train", "model", "task"):
        torch.save(whole | dict(config={k: v for k, v in whole["config"].items() if k != section}), path)
        with pytest.raises(train.UsageError, match="it lacks a config of train, model and task"):
            train.load_checkpoint(str(path))


@pytest.mark.train
def test_a_finished_run_without_checkpoint_pt_is_refused_naming_resume_as_rule_all_reuses_it(tmp_path):
    """A finished run is resumable whether or not checkpoint.pt is still there: --rule all --resume reuses its
    results.json as it is, so its refusal keeps --resume (only an unfinished run without one drops it)."""
    train.train(tiny(tmp_path, "copy", "none", steps=2, match_params=True))
    (tmp_path / "copy-none" / "checkpoint.pt").unlink()
    with pytest.raises(train.UsageError) as refused:
        train.train(tiny(tmp_path, "copy", "none", steps=2, match_params=True))
    assert "holds a finished run already; continue it with --resume, replace it with --overwrite" in str(refused.value), \
        f"a finished run without checkpoint.pt should still be offered --resume: {refused.value}"


@pytest.mark.train
def test_a_resume_records_no_option_of_where_and_how_often_it_writes(tmp_path):
    """A resume from a moved folder, with other --threads, --log-interval, --log-seconds, --checkpoint-minutes and
    --no-cuda-graph (the same steps, run another way), trains the same steps: config.json's "resumed" list records
    the steps it trained on to, and none of these; a finished run tested again with --no-cuda-graph records
    nothing."""
    train.train(tiny(tmp_path / "a", rule="none", steps=2))
    os.rename(tmp_path / "a", tmp_path / "b")
    train.train(tiny(tmp_path / "b", rule="none", steps=3, resume=True, threads=1, log_interval=1, log_seconds=5.0,
                     checkpoint_minutes=5.0, cuda_graph=False))
    config = tmp_path / "b" / "copy-none" / "config.json"
    resumed = json.loads(config.read_text()).get("resumed")
    assert resumed == [dict(step=2, steps=[2, 3])], f"only the change of --steps is the run's to record, got {resumed}"
    train.train(tiny(tmp_path / "b", rule="none", steps=3, resume=True, cuda_graph=True))
    resumed = json.loads(config.read_text()).get("resumed")
    assert resumed == [dict(step=2, steps=[2, 3])], f"a finished run tested again trains no step to record, got {resumed}"


@pytest.mark.train
def test_a_run_with_every_step_trained_refuses_each_option_of_the_training_steps(tmp_path):
    """Each of these acts only on training steps (the rate's schedule, the optimizer, when to validate): a
    finished run resumed at its own --steps with another value would change nothing but config.json."""
    train.train(tiny(tmp_path, rule="none", steps=2))
    for option, was, value in (("lr", 0.001, 5e-4), ("warmup", 0, 1), ("min_lr_ratio", 0.1, 0.5), ("weight_decay", 0.01, 0.5),
                               ("grad_clip", 1.0, 0.5), ("eval_interval", 2, 1)):
        flag = "--" + option.replace("_", "-")
        with pytest.raises(train.UsageError) as refused:
            train.train(tiny(tmp_path, rule="none", steps=2, resume=True, **{option: value}))
        assert str(refused.value).endswith(f"has trained all its 2 steps, so {flag} {value} would change nothing but its "
                                           f"config.json; give the run's own {flag} {was} to test it again, or --steps above "
                                           f"2 to train on with {flag} {value}."), f"{flag}: {refused.value}"


@pytest.mark.train
def test_a_refusal_says_reuse_for_rule_all_and_names_a_changed_list_option_as_the_command_line_gives_it(tmp_path):
    """--rule all --resume reuses a finished run as it is (reuse=True), so its refusals say 'reuse it', a resume's
    'resume'; a list option such as --plastic-blocks is named as it is typed ('1', 'not 0 1'), not as a Python list."""
    def config(rule, seed=0, **model):
        cfg = tiny(tmp_path, "copy", rule, match_params=True, seed=seed, model=model)
        return json.loads(json.dumps(dataclasses.asdict(train.resolve(cfg, train.load_task(cfg.task)))))
    def refusal(saved, current, **how):
        with pytest.raises(train.UsageError) as refused:
            train.check_same_config(saved, current, "old", **how)
        return str(refused.value)
    for reuse, verb in ((False, "resume it"), (True, "reuse it")):
        got = refusal(config("none", plastic_blocks=(1,)), config("none"), finished=True, reuse=reuse)
        assert got == (f"old was matched (--match-params) to a plastic model with --plastic-blocks 1, whose parameter count "
                       f"sets its width; {verb} with the options it was trained with."), f"reuse={reuse}: {got}"
    for reuse, verb in ((False, "resume"), (True, "reuse it")):
        got = refusal(config("none"), config("none", seed=1), finished=True, reuse=reuse)
        assert got == (f"old was trained with --seed 0, not 1; {verb} with the run's own options, or start it again with "
                       f"--overwrite."), f"reuse={reuse}: {got}"
    got = refusal(config("hebbian", plastic_blocks=(1,)), config("hebbian", plastic_blocks=(0, 1)))
    assert got == "old was trained with --plastic-blocks 1, not 0 1; resume with the run's own options.", got


@pytest.mark.train
def test_matched_static_width_is_closest_to_the_hebbian_models_count_of_every_width():
    """With one head every width is a candidate, so the matched width's count is the closest of all to the Hebbian
    model's (for n_layer 1 and d_model 8: 9; the gradient rule's slightly larger count would give 10)."""
    model = Config(d_in=3, d_out=1, n_layer=1, n_head=1, d_model=8, rule="none")
    target = train.count_params(dataclasses.replace(model, rule="hebbian"))
    gap = {w: abs(train.count_params(dataclasses.replace(model, d_model=w)) - target) for w in range(1, 4 * 8 + 1)}
    width = train.matched_static_width(model)
    assert gap[width] == min(gap.values()), \
        f"d_model {width} is {gap[width]} parameters from the Hebbian model's {target}; {min(gap, key=gap.get)} is {min(gap.values())}"

@pytest.mark.train
def test_rule_all_refuses_a_damaged_results_json_or_a_file_for_a_folder_before_training_anything(tmp_path):
    train.train(tiny(tmp_path, "copy", "none", steps=2, match_params=True))
    results = tmp_path / "copy-none/results.json"
    finished = json.loads(results.read_text())
    for damaged in (results.read_text()[:30], json.dumps(finished | dict(config=finished["config"] | dict(
            train={k: v for k, v in finished["config"]["train"].items() if k != "steps"})))):  # cut short; no steps
        results.write_text(damaged)
        with pytest.raises(train.UsageError, match="copy-none/results.json is damaged .*move it away .* --resume"):
            train.compare(tiny(tmp_path, "copy", "all", steps=2, resume=True))
    assert not (tmp_path / "copy-hebbian").exists(), "nothing may train before every folder is checked"
    (tmp_path / "b").mkdir()
    (tmp_path / "b/copy-gradient").write_text("notes")
    with pytest.raises(train.UsageError, match="copy-gradient is a file, not a run folder; move it"):
        train.compare(tiny(tmp_path / "b", "copy", "all", steps=2))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["copy-gradient"], "nothing may train before every folder is checked"


@pytest.mark.cli
def test_the_resume_command_drops_overwrite_and_adds_resume_once():
    assert train.resume_command(["--task", "copy", "--overwrite"]) == "python train.py --task copy --resume", \
        "--overwrite with --resume is refused, so the printed command must drop it"
    assert train.resume_command(["--task", "copy", "--resume"]) == "python train.py --task copy --resume"


@pytest.mark.train
def test_results_json_holds_the_modulation_trace_of_modulation_csv(tmp_path):
    """A plastic run's results.json keeps the test's trace per token position (the README's analyses read it),
    the same numbers as modulation.csv; the static model has none."""
    results = train.train(tiny(tmp_path, "copy", "hebbian"))
    rows = [line.split(",") for line in (tmp_path / "copy-hebbian" / "modulation.csv").read_text().splitlines()]
    columns = rows[0][1:]
    assert "trace" in results and set(results["trace"]) == {"eta", "step", "update_norm", "fast_norm", "scored"}, \
        f"results.json should hold the trace of eta, step, update_norm, fast_norm and scored, has {results.get('trace', {}).keys()}"
    for i, column in enumerate(columns):
        csv = [float(row[1 + i]) for row in rows[1:]]
        assert results["trace"][column] == pytest.approx(csv, rel=1e-5, abs=1e-6), \
            f"results.json's {column} trace {results['trace'][column]} is not modulation.csv's {csv}"


@pytest.mark.train
def test_a_resume_may_find_the_data_in_another_folder(tmp_path, offline):
    """--data-dir says where the files are, not what the run trains on: a resume from another folder is not refused."""
    train.train(tiny(tmp_path, "omniglot", "none", steps=2))
    cfg = tiny(tmp_path, "omniglot", "none", steps=2, resume=True)
    cfg.task = dataclasses.replace(cfg.task, data_dir=str(tmp_path / "moved"))
    results = train.train(cfg)
    assert results["best_step"] == 2, f"the resumed run should finish as it was, got {results}"


@pytest.mark.train
def test_default_warmup_is_five_percent_of_the_steps(tmp_path, monkeypatch):
    """80 steps: the rate rises linearly to lr over the first 4, then decays."""
    rates, set_learning_rate = [], train.set_learning_rate

    def recorded(optimizer, value):
        rates.append(value)
        if len(rates) > 5:
            raise Interrupted
        set_learning_rate(optimizer, value)
    monkeypatch.setattr(train, "set_learning_rate", recorded)
    with pytest.raises(Interrupted):
        train.train(tiny(tmp_path, "copy", "none", steps=80, lr=1e-3))
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]), f"4 steps of linear warm-up to 1e-3 expected, got {rates[:4]}"
    assert rates[4] < 1e-3, f"the rate should decay after the warm-up, got {rates[4]} at step 5"


@pytest.mark.train
@pytest.mark.parametrize("grad_clip", [1e-3, 0.0])
def test_gradients_are_clipped_before_every_optimizer_step(tmp_path, monkeypatch, grad_clip):
    """With grad_clip = 1e-3 (far below the gradients of an untrained model) every step sees a gradient of norm 1e-3;
    --grad-clip 0 means no clipping: the full gradient (far from 0), not one scaled to a norm of 0."""
    norms, make_optimizer = [], train.make_optimizer

    def recording_optimizer(model, tc, graphed):
        optimizer = make_optimizer(model, tc, graphed)
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())
            return step(*args, **kwargs)
        optimizer.step = recorded_step
        return optimizer
    monkeypatch.setattr(train, "make_optimizer", recording_optimizer)
    train.train(tiny(tmp_path, "copy", "none", grad_clip=grad_clip))
    assert len(norms) == 4, f"expected one optimizer step per training step (4), got {len(norms)}"
    if grad_clip:
        assert norms == pytest.approx([1e-3] * 4, rel=1e-3), f"every step's gradient norm should be clipped to 1e-3, got {norms}"
    else:
        assert all(n > 1e-3 for n in norms), f"with --grad-clip 0 the gradients should not be clipped, norms {norms}"


# ----------------------------------------------------------------------------------------------
# The command line


@pytest.mark.cli
def test_cli_is_built_from_the_dataclasses():
    parser = train.build_parser()
    help_text = parser.format_help()
    for flag in ("--rule", "--task", "--steps", "--batch-size", "--lr", "--d-model", "--plastic-blocks",
                 "--attn-window", "--way", "--shot", "--query", "--delay", "--seq-len", "--eta", "--decay",
                 "--max-norm", "--no-modulation", "--seed", "--device", "--data-dir", "--out-dir",
                 "--eval-interval", "--eval-episodes", "--compile", "--amp", "--resume", "--match-params"):
        assert flag in help_text, f"--help lacks {flag}"
    assert "--d-in" not in help_text and "--image-shape" not in help_text, "sizes the task sets are not options"
    cfg = train.config_from_args(parser.parse_args(
        "--task cue_reward --rule gradient --steps 7 --n-layer 4 --plastic-blocks 1 3 --no-modulation --attn-window 4 --n-cues 3".split()))
    assert (cfg.task.name, cfg.train.rule, cfg.train.steps, cfg.train.batch_size) == ("cue_reward", "gradient", 7, None)
    assert (cfg.model.plastic_blocks, cfg.model.modulation, cfg.model.attn_window, cfg.task.n_cues) == ((1, 3), False, 4, 3)


@pytest.mark.cli
@pytest.mark.parametrize("argv, message", [
    ("--task nope", "invalid choice"),
    ("--rule nope", "invalid choice"),
    ("--steps many", "invalid int"),
])
def test_cli_rejects_bad_arguments_with_exit_code_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        train.main(argv.split())
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message in error and "\n" not in error, f"expected one line with {message!r}: {error!r}"


@pytest.mark.cli
@pytest.mark.parametrize("argv, message", [
    ("--task omniglot --shot 3 --query 2 --train-way 5", "--shot 3 and --query 2 need 5 images of a class, and omniglot has 4; lower --shot or --query."),
    ("--task omniglot --way 6 --train-way 6", "--way 6 exceeds the 4 classes of the omniglot val split; lower --way."),
    ("--task omniglot", "--train-way 10 exceeds the 8 classes of the omniglot train split; lower --train-way."),
    ("--task copy --d-model 15 --n-head 2", "divisible by n_head (2): choose n_head (--n-head) from 1, 3, 5, 15, or another d_model (--d-model)."),
    ("--task copy --device cuda:7", "device 'cuda:7' was asked for but"),
    ("--task copy --device gpu", "unknown device 'gpu'"),
    ("--task copy --plastic-blocks 5", "of the n_layer = 2 blocks: name blocks below 2 (--plastic-blocks), or more layers (--n-layer)."),
    ("--task cifar_fs --split lake", "--split lake chooses Omniglot's classes and does nothing for cifar_fs; drop --split."),
    ("--task copy --shot 5", "--shot 5 does nothing for copy: only the few-shot tasks (omniglot, cifar_fs) read it; drop it."),
    ("--task copy --no-isolate-queries", "--no-isolate-queries does nothing for copy: only the few-shot tasks"),
    ("--task omniglot --delay 50", "--delay 50 does nothing for omniglot: only the copy task reads it; drop it."),
    ("--task cifar_fs --no-rotations", "--no-rotations does nothing for cifar_fs: only the omniglot task reads it; drop it."),
    ("--task copy --rule none --eta 0.5", "--eta sets the fast weights, and the static model (--rule none) has none; drop it"),
    ("--task copy --rule none --decay 0.1", "--decay sets the fast weights, and the static model (--rule none) has none"),
    ("--task copy --steps 50 --warmup 50", "--warmup 50 is not below --steps 50"),
    ("--task copy --decay 0.7", "decay must lie in [0, 0.5]"),
    ("--task copy --rule gradient --compile", "--compile cannot run the gradient rule"),
    ("--task copy --rule all --compile", "--compile cannot run the gradient rule"),
    ("--task copy --bench --compile", "--compile cannot run the gradient rule"),
])
def test_cli_bad_options_exit_2_with_one_sentence(tmp_path, capsys, offline, argv, message):
    if "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code = train.main(argv.split() + ["--n-layer", "2", "--out-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error, f"expected exit 2 and one line with {message!r}: {error!r}"


@pytest.mark.cli
def test_cli_missing_data_and_unwritable_out_dir_exit_2(tmp_path, capsys, no_network):
    assert train.main(["--task", "omniglot", "--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path)]) == 2
    assert "could not be downloaded" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert train.main(["--task", "copy", "--out-dir", str(tmp_path / "a_file" / "runs")]) == 2
    assert "cannot write the run folder" in capsys.readouterr().err


@pytest.mark.cli
@pytest.mark.plots
def test_cli_runs_end_to_end_in_a_subprocess(tmp_path):
    command = [sys.executable, "train.py", "--task", "copy", "--rule", "hebbian", "--seq-len", "2", "--delay", "1",
               "--n-layer", "2", "--n-head", "2", "--d-model", "16", "--steps", "4", "--batch-size", "4",
               "--log-interval", "2", "--eval-interval", "2", "--eval-episodes", "4", "--test-episodes", "8",
               "--device", "cpu", "--out-dir", str(tmp_path)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"train.py failed:\n{done.stdout}\n{done.stderr}"
    assert "step 4/4 | loss" in done.stdout and "ms/step" in done.stdout and "test mse" in done.stdout, done.stdout
    assert all((tmp_path / "copy-hebbian" / name).is_file() for name in RUN_FILES + TRACE_FILES)
    for name in ("learning_curve.png", "modulation.png"):
        assert_drawn_plot(tmp_path / "copy-hebbian" / name, "train.py run alone")


@pytest.mark.cli
def test_importing_a_module_runs_nothing(tmp_path, monkeypatch, capfd):
    """Each of the project's modules, executed afresh as an import executes it (in a folder of its own, with
    a command line it would refuse), prints nothing, writes nothing, reads no command line and leaves
    torch's threads and default dtype as they were."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["python", "--no-such-option"])
    state = torch.get_num_threads(), torch.get_default_dtype()
    modules = sorted(name for name in os.listdir(HERE) if name.endswith(".py") and not name.startswith("test_")
                     and name != "conftest.py")
    assert "train.py" in modules and "plastic.py" in modules, modules
    for name in modules:
        spec = importlib.util.spec_from_file_location(f"fresh_{name[:-3]}", os.path.join(HERE, name))
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        out, err = capfd.readouterr()
        assert out == err == "", f"importing {name} should print nothing, got {out + err!r}"
        assert not any(tmp_path.iterdir()), f"importing {name} should write nothing, found {list(tmp_path.iterdir())}"
        assert (torch.get_num_threads(), torch.get_default_dtype()) == state, f"importing {name} changed torch's settings"


def deterministic_state() -> dict:
    """The process-wide settings --deterministic changes."""
    return dict(algorithms=torch.are_deterministic_algorithms_enabled(), cudnn=torch.backends.cudnn.deterministic,
                benchmark=torch.backends.cudnn.benchmark, workspace=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


DETERMINISTIC = dict(algorithms=True, cudnn=True, benchmark=False, workspace=":4096:8", warn_only=False)


def record_deterministic_state(monkeypatch, module) -> list[dict]:
    """Patches module.build_training to note deterministic_state() (and warn-only) each time it is called."""
    during, build_training = [], module.build_training

    def build_and_record(*args, **kwargs):
        during.append(deterministic_state() | dict(warn_only=torch.is_deterministic_algorithms_warn_only_enabled()))
        return build_training(*args, **kwargs)
    monkeypatch.setattr(module, "build_training", build_and_record)
    return during


@pytest.mark.cli
@pytest.mark.parametrize("entry", ["command line", "python"])
def test_deterministic_is_on_during_the_run_and_the_previous_settings_come_back(tmp_path, monkeypatch, entry):
    """--deterministic holds while the run trains (error mode, not a warning), from main() and from train()
    alike, and the process is left as it was found: later tests in this process would otherwise run
    deterministic."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # a previous setting other than the default
    before, during = deterministic_state(), record_deterministic_state(monkeypatch, train)
    if entry == "command line":
        assert train.main(tiny_argv(tmp_path, "--steps", "2", "--deterministic")) == 0
    else:
        train.train(tiny(tmp_path, rule="none", steps=2, deterministic=True))
    assert during == [DETERMINISTIC], \
        f"during the run deterministic algorithms (raising, not warning), cuDNN's and cuBLAS's should be on: {during}"
    assert deterministic_state() == before, f"the run should restore {before}, left {deterministic_state()}"


@pytest.mark.train
def test_deterministic_keeps_a_cublas_workspace_already_set_and_restores_everything_after_an_error(monkeypatch):
    """A workspace the user chose stays; leaving, by an error too (a refused run), puts back every setting it
    found, warn-only mode included; without the option nothing changes."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other setting cuBLAS documents as deterministic
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    torch.use_deterministic_algorithms(False, warn_only=True)  # a previous state other than the default
    try:
        before = deterministic_state() | dict(warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
        with pytest.raises(RuntimeError, match="refused"):
            with train.deterministic_algorithms(True):
                assert deterministic_state() | dict(warn_only=torch.is_deterministic_algorithms_warn_only_enabled()) == \
                    DETERMINISTIC | dict(workspace=":16:8"), "a workspace the user chose should be kept, the rest set"
                raise RuntimeError("refused")
        after = deterministic_state() | dict(warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
        assert after == before, f"leaving by an error should restore {before}, left {after}"
        with train.deterministic_algorithms(False):
            assert deterministic_state() | dict(warn_only=torch.is_deterministic_algorithms_warn_only_enabled()) == before, \
                "without the option nothing should change"
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cli
def test_deterministic_is_recorded_in_config_and_results(tmp_path):
    """config.json and results.json say the run was deterministic. (Two CPU runs repeat with or without the
    option; that a GPU run repeats bit for bit with it was measured on an H200: README, Deterministic kernels.)"""
    assert train.main(tiny_argv(tmp_path, "--steps", "2", "--deterministic")) == 0
    config = json.loads((tmp_path / "copy-none" / "config.json").read_text())
    results = json.loads((tmp_path / "copy-none" / "results.json").read_text())
    assert config["train"]["deterministic"] is True and results["config"]["train"]["deterministic"] is True, \
        "config.json and results.json should record --deterministic"


@pytest.mark.train
def test_report_averages_seeds_with_a_t_interval(tmp_path):
    """report.py: runs that differ only by seed become one row, mean ± t(0.975, n-1) * std / sqrt(n)."""
    import report
    for seed, value in enumerate((0.80, 0.90)):
        for rule in ("none", "hebbian"):
            folder = tmp_path / "main" / "default" / f"seed{seed}" / f"omniglot-{rule}"
            folder.mkdir(parents=True)
            knockout = None if rule == "none" else value - 0.1
            (folder / "results.json").write_text(json.dumps(dict(
                task="omniglot", rule=rule, metric="accuracy", test_mean=value, test_ci95=0.01,
                knockout_mean=knockout, knockout_ci95=0.01, params=1000, train_time_s=60.0)))
    table = report.tables(report.load_runs(str(tmp_path)))
    half_width = 12.71 * 0.0707107 / 2 ** 0.5 * 100  # std of (0.8, 0.9) is 0.0707
    assert f"85.00 ± {half_width:.2f}" in table, f"two seeds should give 85.00 ± {half_width:.2f}:\n{table}"
    assert f"knock-out 75.00 ± {half_width:.2f}" in table, f"the knock-out column is averaged the same way:\n{table}"
    assert "| default | omniglot |" in table and table.count("; 2; 1.0 min") == 2, f"one row, two seeds, 1 minute each:\n{table}"


@pytest.mark.train
def test_report_names_the_options_that_the_runs_of_a_row_set_differently(tmp_path):
    """A row averages runs that should differ only by seed; where their configs differ in an option that changes
    what was trained or tested, the cell says which and how. Options of how or where a run went do not count,
    nor a None that stands for the value the run used (the rule's own eta and coef_init, the test's way and
    shot), an encoder's path, the fast weights' options in the static model, or --match-params in a plastic one.
    An option a config saved before it existed does not record is what such runs did (report.OPTIONS_ADDED)."""
    import report
    def config(seed, rule, changes):  # a config.json's sections as results.json keeps them, with changes "section.name"
        sections = dict(train=dict(seed=seed, lr=0.001, out_dir=f"/tmp/runs{seed}", init_encoder=None, match_params=False),
                        model=dict(rule=rule, eta=None, coef_init=None, decay=0.1, attn_window=None),
                        task=dict(name="omniglot", way=5, train_way=None, shot=1, train_shot=None))
        for name, value in changes.items():
            section, option = name.split(".")
            sections[section][option] = value
        return sections
    how_run = {"train.device": ("cpu", "cuda"), "train.threads": (None, 2), "train.resume": (False, True),
               "train.overwrite": (False, True), "train.log_interval": (100, 50), "train.log_seconds": (10.0, 5.0),
               "train.checkpoint_minutes": (10.0, 1.0), "train.bench": (False, True), "train.cuda_graph": (True, False),
               "train.compile": (False, True), "train.amp": (False, True), "train.deterministic": (False, True),
               "task.data_dir": (None, "data"), "model.fast_form": ("factored", "dense")}
    rows = {  # setting: rule, seed 0's changes, seed 1's changes, what the cell should say (None: nothing)
        "same": ("hebbian", {k: v[0] for k, v in how_run.items()}, {k: v[1] for k, v in how_run.items()}, None),
        "rules-own": ("hebbian", {"model.eta": 1.0, "model.coef_init": "positive"}, {}, None),
        "coef": ("hebbian", {"model.coef_init": "negative"}, {}, 'model.coef_init "negative" and "positive"'),
        "eta": ("gradient", {"model.eta": 0.5}, {}, "model.eta 0.1 and 0.5"),
        "way": ("hebbian", {"task.train_way": 5, "task.train_shot": 1}, {}, None),
        "shot": ("hebbian", {"task.train_shot": 5}, {}, "task.train_shot 1 and 5"),
        "encoder-path": ("hebbian", {"train.init_encoder": "a/pretrain"}, {"train.init_encoder": "b/pretrain"}, None),
        "encoder": ("hebbian", {"train.init_encoder": "a/pretrain"}, {}, "train.init_encoder false and true"),
        "older": ("hebbian", {"task.train_on_val": False}, {}, None),  # an option the other config does not record:
        "older-on": ("hebbian", {"task.train_on_val": True}, {}, "task.train_on_val false and true"),  # it was False
        "older-jitter": ("hebbian", {"task.jitter": 0.4}, {}, None),  # it acts on CIFAR-FS only: not compared here
        "lr": ("hebbian", {}, {"train.lr": 0.0005}, "train.lr 0.0005 and 0.001"),
        "way-and-window": ("hebbian", {"task.train_way": 10}, {"model.attn_window": 1},
                           "model.attn_window 1 and null; task.train_way 10 and 5"),
        "static-fast": ("none", {"model.eta": 0.0, "model.decay": 0.2}, {"model.eta": 0.1}, None),
        "static-match": ("none", {"train.match_params": True}, {}, "train.match_params false and true"),
        "plastic-match": ("hebbian", {"train.match_params": True}, {}, None)}
    for setting, (rule, *changes, _) in rows.items():
        for seed in (0, 1):
            folder = tmp_path / "exp" / setting / f"seed{seed}" / f"omniglot-{rule}"
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps(dict(
                task="omniglot", rule=rule, metric="accuracy", test_mean=0.9, test_ci95=0.01, knockout_mean=None,
                knockout_ci95=None, params=1000, train_time_s=60.0, config=config(seed, rule, changes[seed]))))
    table = report.tables(report.load_runs(str(tmp_path)))
    cell = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    for setting, (*_, said) in rows.items():
        if said is None:
            assert "differ" not in cell[setting], f"the runs of {setting!r} differ only in what should not count:\n{table}"
        else:
            assert f"; **runs differ in {said}**" in cell[setting], f"the row {setting!r} should say {said!r}:\n{table}"
    assert cell["lr"].count("90.00 ± 0.00; 0.00M; 2;") == 1, f"the runs are still averaged, the cell says how they differ:\n{table}"
    for setting, steps in (("encoders", 4000), ("longer", 12000)):  # pretrain.py's config: one section
        for seed in (0, 1):
            folder = tmp_path / "pre" / "exp" / setting / f"seed{seed}" / "pretrain-omniglot"
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps(dict(
                task="omniglot", rule="prototypes", metric="accuracy", test_mean=0.9, test_ci95=0.01, params=1000,
                train_time_s=60.0, config=dict(seed=seed, out_dir=f"/tmp/pt{seed}", steps=steps if seed else 4000))))
    table = report.tables(report.load_runs(str(tmp_path / "pre")))
    cell = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "differ" not in cell["encoders"] and "**runs differ in steps 12000 and 4000**" in cell["longer"], \
        f"pretrain.py's runs should be compared by their options too:\n{table}"


@pytest.mark.train
def test_report_puts_each_retest_in_a_row_of_its_own_averaged_over_seeds(tmp_path):
    """report.py: retest.py's retest-*.json beside a run's results.json is a row named after its episodes,
    with the run's parameters and training time and the retest's numbers."""
    import report
    for seed, value in enumerate((0.95, 0.97)):
        folder = tmp_path / "twenty" / f"seed{seed}" / "omniglot-hebbian"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(dict(
            task="omniglot", rule="hebbian", metric="accuracy", test_mean=0.5, test_ci95=0.01, knockout_mean=0.4,
            knockout_ci95=0.01, params=2000, train_time_s=120.0)))
        (folder / "retest-5way-5shot-3query.json").write_text(json.dumps(dict(
            way=5, shot=5, query=3, test_mean=value, test_ci95=0.01, knockout_mean=value - 0.1, knockout_ci95=0.01)))
    table = report.tables(report.load_runs(str(tmp_path)))
    half_width = 12.71 * 0.0141421 / 2 ** 0.5 * 100  # std of (0.95, 0.97) is 0.01414
    row = next((line for line in table.splitlines() if line.startswith("| retested 5-way 5-shot, 3 queries per class |")), "")
    assert f"96.00 ± {half_width:.2f} (knock-out 86.00 ± {half_width:.2f}); 0.00M; 2; 2.0 min" in row, \
        f"the retests should be one row, 96.00 ± {half_width:.2f} over two seeds, the run's size and time:\n{table}"
    assert "| - | omniglot | - | 50.00 ± 0.00 (knock-out 40.00 ± 0.00)" in table, f"the run's own row should stay:\n{table}"


@pytest.mark.train
def test_report_leaves_out_a_retest_of_an_earlier_best_pt(tmp_path, capsys):
    """A run resumed after retest.py ran may have a new best.pt: a retest whose best_step is not the run's is
    left out, with one line naming it; retests kept before best_step are trusted."""
    import report
    folder = tmp_path / "exp" / "omniglot-none"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(dict(
        task="omniglot", rule="none", metric="accuracy", test_mean=0.5, test_ci95=0.01, knockout_mean=None,
        knockout_ci95=None, params=2000, train_time_s=120.0, best_step=8)))
    for shot, best_step in ((5, 4), (2, 8), (3, None), (4, 12)):  # 4-shot: best.pt of a resume not yet finished
        (folder / f"retest-5way-{shot}shot-1query.json").write_text(json.dumps(dict(
            way=5, shot=shot, query=1, test_mean=0.9, test_ci95=0.01, knockout_mean=None, knockout_ci95=None)
            | (dict(best_step=best_step) if best_step else {})))
    table = report.tables(report.load_runs(str(tmp_path)))
    assert "5-way 2-shot" in table and "5-way 3-shot" in table and "5-way 5-shot" not in table, \
        f"only the retest of an earlier best.pt should be left out:\n{table}"
    assert "5-way 4-shot" not in table, f"a retest of a later best.pt than the results' is not theirs either:\n{table}"
    err = capsys.readouterr().err
    assert "retest-5way-5shot-1query.json left out: it tested best.pt of step 4, and the run's best is now step 8" in err, err


@pytest.mark.train
def test_report_pairs_runs_tested_on_the_same_episodes(tmp_path, offline, capsys, monkeypatch):
    """Runs of one seed at other rules and batches share their test episodes (episodes_md5): report.py --paired
    gives A - B episode by episode, mean +- 1.96 std / sqrt(n) against numpy in float64, as a plastic run's
    results.json gives it against its knock-out; runs of other seeds, or without per-episode scores, are
    refused in one sentence. Each run's first line and its learning curve's title name its episodes."""
    import report
    titles = []
    monkeypatch.setattr(train, "plot_learning_curve", lambda run_dir, metric_name, title: titles.append(title))
    static = train.train(tiny(tmp_path / "a", "omniglot", "none", test_episodes=12))
    plastic = train.train(tiny(tmp_path / "b", "omniglot", "hebbian", test_episodes=12, batch_size=3))
    other = train.train(tiny(tmp_path / "c", "omniglot", "none", test_episodes=12, seed=1))
    wider = train.train(dataclasses.replace(cfg := tiny(tmp_path / "d", "omniglot", "none", test_episodes=12),
                                            task=dataclasses.replace(cfg.task, train_way=4)))
    assert static["episodes_md5"] == plastic["episodes_md5"] == wider["episodes_md5"] != other["episodes_md5"], \
        "one seed's test episodes should be the same at any rule, batch and training way, another seed's not"
    opening = [line for line in capsys.readouterr().out.splitlines() if " parameters, 4 steps of " in line]
    assert [line.split(" on cpu")[0].split("episodes ")[-1] for line in opening] == \
        ["(3-way 1-shot; validated and tested 3-way 1-shot)"] * 3 + ["(4-way 1-shot; validated and tested 3-way 1-shot)"], \
        f"each run's first line should name its training and test episodes, whose chance levels differ: {opening}"
    assert titles == [f"omniglot, rule {rule} ({way}-way 1-shot; validated and tested 3-way 1-shot)"
                      for rule, way in (("none", 3), ("hebbian", 3), ("none", 3), ("none", 4))], \
        f"each learning curve's title should name the run's training and test episodes: {titles}"
    assert len(plastic["by_episode"]) == 12 and np.mean(plastic["by_episode"]) == pytest.approx(plastic["test_mean"], abs=1e-6), \
        "by_episode should hold the 12 episodes whose mean is test_mean"
    runs = [str(tmp_path / folder / name) for folder, name in (("a", "omniglot-none"), ("b", "omniglot-hebbian"))]
    for a, b, results in ((runs[1], runs[0], plastic), (str(tmp_path / "d" / "omniglot-none"), runs[0], wider)):
        diffs = np.array(results["by_episode"], np.float64) - np.array(static["by_episode"], np.float64)
        want = f"{100 * diffs.mean():+.2f} ± {100 * 1.96 * diffs.std(ddof=1) / np.sqrt(12):.2f} points"
        assert report.main(["--paired", a, b]) == 0, f"--paired {a} {b} should succeed"
        line = capsys.readouterr().out
        assert want in line and "same 12 test episodes" in line, f"--paired: expected {want!r} in {line!r}"
    assert static["plasticity_mean"] is None and plastic["plasticity_mean"] is not None, \
        "a plastic run pairs itself with its knock-out, the static one has none"
    (tmp_path / "old.json").write_text(json.dumps({k: v for k, v in static.items() if k != "by_episode"}))
    (tmp_path / "list.json").write_text("[]")
    for pair, message in (([runs[0], str(tmp_path / "c" / "omniglot-none")], "were tested on different episodes"),
                          ([str(tmp_path / "old.json"), runs[0]], "keeps no per-episode"),
                          ([str(tmp_path / "nowhere"), runs[0]], "cannot read a final test"),
                          ([runs[0] + "/config.json", runs[0]], "holds no final test"),  # not the results.json beside it
                          ([str(tmp_path / "list.json"), runs[0]], "holds no final test")):
        assert report.main(["--paired", *pair]) == 2, f"--paired {pair} should exit with code 2"
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, f"--paired {pair}: one sentence with {message!r}, got {err!r}"


@pytest.mark.train
def test_images_md5_tells_apart_episodes_that_differ_only_in_which_tokens_count(monkeypatch):
    """images_md5 covers the mask (which tokens are scored queries) as its docstring says: the same targets,
    tokens and images with one query fewer scored are other episodes, with another images_md5."""
    task = synthetic_few_shot(TaskConfig(name="omniglot", **TINY_TASKS["omniglot"]))
    first, sample = train.episodes_fingerprint(task, "test", 12, "cpu", 2), task.sample

    def one_query_fewer(*args, **kwargs):
        batch = sample(*args, **kwargs)
        mask = batch.mask.clone()
        mask[:, mask[0].nonzero()[-1]] = False  # the last query of every episode no longer scored
        return dataclasses.replace(batch, mask=mask)
    monkeypatch.setattr(task, "sample", one_query_fewer)
    fewer = train.episodes_fingerprint(task, "test", 12, "cpu", 2)
    assert fewer["episodes_md5"] == first["episodes_md5"] and fewer["images_md5"] != first["images_md5"], \
        f"the same targets and images under another mask: the same episodes_md5, another images_md5; got {first} and {fewer}"


@pytest.mark.train
def test_the_fingerprint_tells_the_same_targets_on_other_images_apart(tmp_path, capsys):
    """episodes_fingerprint: a seed's episodes drawn again give the same md5s; the same targets drawn from other
    images (another split; here another synthetic dataset of the same counts) the same episodes_md5 but another
    inputs_md5 and images_md5, so report.py --paired refuses to pair them; read by a model trained on more
    classes, another inputs_md5 alone, so it pairs them by images_md5. Runs from before images_md5 are paired
    by inputs_md5, and runs from before inputs_md5 only where their splits agree: the run's config names it,
    and a retest's run's results.json beside it."""
    import report
    cfg = TaskConfig(name="omniglot", **TINY_TASKS["omniglot"])
    task, other = synthetic_few_shot(cfg), synthetic_few_shot(cfg, seed=1)
    first = train.episodes_fingerprint(task, "test", 12, "cpu", 2)
    assert train.episodes_fingerprint(task, "test", 12, "cpu", 2) == first, "the same episodes should give the same md5s"
    moved = train.episodes_fingerprint(other, "test", 12, "cpu", 2)
    assert moved["episodes_md5"] == first["episodes_md5"] and moved["inputs_md5"] != first["inputs_md5"] \
        and moved["images_md5"] != first["images_md5"], \
        f"other images under the same targets: the same episodes_md5, another inputs_md5 and images_md5; got {first} and {moved}"
    wider = train.episodes_fingerprint(synthetic_few_shot(dataclasses.replace(cfg, train_way=5)), "test", 12, "cpu", 2)
    assert wider["inputs_md5"] != first["inputs_md5"] and wider | dict(inputs_md5=None) == first | dict(inputs_md5=None), \
        f"a model trained 5-way reads the 3-way episodes' labels 5 wide: another inputs_md5, the rest alike; got {first} and {wider}"
    copy = train.episodes_fingerprint(tasks.make_task_from_config(TaskConfig(name="copy", **TINY_TASKS["copy"])), "test", 4, "cpu", 2)
    assert copy["images_md5"] is None, f"a task without images keeps no images_md5, got {copy}"
    assert train.episodes_fingerprint(task, "test", 12, "cpu", 3)["episodes_md5"] != first["episodes_md5"]

    def run(name, split, **fingerprint):  # a run folder's results.json and a retest beside it
        folder = tmp_path / name
        folder.mkdir()
        test = dict(task="omniglot", metric="accuracy", test_mean=0.5, test_episodes=4, by_episode=[1.0, 0.0, 1.0, 0.0])
        (folder / "results.json").write_text(json.dumps(test | fingerprint | dict(config=dict(task=dict(omniglot_split=split)))))
        (folder / "retest-5way-5shot-3query.json").write_text(json.dumps(test | fingerprint))
        return str(folder), str(folder / "retest-5way-5shot-3query.json")

    vinyals = run("vinyals", "vinyals", episodes_md5="t", inputs_md5="v")
    lake = run("lake", "lake", episodes_md5="t", inputs_md5="l")
    vinyals_old, lake_old = run("vinyals-old", "vinyals", episodes_md5="t"), run("lake-old", "lake", episodes_md5="t")
    vinyals_old_too = run("vinyals-old-too", "vinyals", episodes_md5="t")  # another run of the same split
    narrow = run("narrow", "vinyals", episodes_md5="t", inputs_md5="v", images_md5="i")  # trained 5-way and 10-way
    wide = run("wide", "vinyals", episodes_md5="t", inputs_md5="w", images_md5="i")
    for a, b, paired in ((vinyals, lake, False), (vinyals_old, lake_old, False), (lake, lake_old, True),
                         (vinyals, vinyals_old, True), (vinyals_old, vinyals_old_too, True), (narrow, wide, True),
                         (narrow, vinyals, True), (wide, vinyals, False)):
        for i in (0, 1):  # the runs, then their retests
            code = report.main(["--paired", a[i], b[i]])
            out, err = capsys.readouterr()
            assert code == (0 if paired else 2), f"--paired {a[i]} {b[i]}: {'paired' if paired else 'refused'}, got {out}{err}"
            assert paired or ("different episodes" in err and err.count("\n") == 1), f"one sentence, got {err!r}"
    report.main(["--paired", wide[0], vinyals[0]])
    assert "python fingerprint.py" in capsys.readouterr().err, "runs of one seed without images_md5: name the fix"
    other_seed = run("other-seed", "vinyals", episodes_md5="u", inputs_md5="v", images_md5="j")
    report.main(["--paired", other_seed[0], vinyals[0]])
    assert "fingerprint.py" not in capsys.readouterr().err, "other targets: no fingerprint would pair them"


@pytest.mark.train
def test_report_averages_pairs_over_seeds(tmp_path, capsys):
    """--paired given once per seed prints each seed's paired line, then the mean of the seeds' A - B with the
    t interval over seeds (t_{0.975, 2} = 4.303), against numpy in float64; pairs of two metrics are refused."""
    import report
    rng = np.random.default_rng(0)
    files, diffs = [], []
    for seed in range(3):
        a, b = rng.integers(0, 2, 40).astype(np.float64), rng.integers(0, 2, 40).astype(np.float64)
        diffs.append(a.mean() - b.mean())
        for name, scores in (("a", a), ("b", b)):
            path = tmp_path / f"{name}{seed}.json"
            path.write_text(json.dumps(dict(metric="accuracy", test_mean=scores.mean(), test_episodes=40,
                                            episodes_md5=f"seed{seed}", by_episode=scores.tolist())))
            files.append(str(path))
    argv = [arg for seed in range(3) for arg in ("--paired", files[2 * seed], files[2 * seed + 1])]
    assert report.main(argv) == 0, "three pairs should succeed"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("A - B: ") for line in lines[:3]), f"three pair lines, then the mean: {lines}"
    half = 4.303 * np.std(diffs, ddof=1) / np.sqrt(3)
    want = f"over the 3 pairs: A - B {100 * np.mean(diffs):+.2f} ± {100 * half:.2f} points"
    assert lines[3].startswith(want), f"expected {want!r}, got {lines[3]!r}"
    assert ", ".join(f"{100 * d:+.2f}" for d in diffs) in lines[3], f"each pair's difference should be listed: {lines[3]}"
    unequal = []  # a pair of 40 episodes (+100 points) and one of 10 (0): each seed counts once, whatever its episodes
    for seed, (n, a, b) in enumerate(((40, 1.0, 0.0), (10, 0.0, 0.0))):
        for name, score in (("a", a), ("b", b)):
            path = tmp_path / f"unequal-{name}{seed}.json"
            path.write_text(json.dumps(dict(metric="accuracy", test_mean=score, test_episodes=n,
                                            episodes_md5=f"other{seed}", by_episode=[score] * n)))
            unequal.append(str(path))
    assert report.main(["--paired", *unequal[:2], "--paired", *unequal[2:]]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("over the 2 pairs: A - B +50.00"), f"the mean of +100 and 0 points, unweighted, got {last!r}"
    mse = [tmp_path / f"mse{i}.json" for i in range(2)]
    for file in mse:
        file.write_text(json.dumps(dict(metric="mse", test_mean=0.5, test_episodes=40, episodes_md5="seed0",
                                        by_episode=[0.5] * 40)))
    assert report.main(argv[:3] + ["--paired", *map(str, mse)]) == 2, "pairs of two metrics should exit with code 2"
    err = capsys.readouterr().err
    assert "different metrics" in err and err.count("\n") == 1, f"one sentence naming the metrics, got {err!r}"
    assert report.main(argv + argv[:3]) == 2, "a pair given twice would count as a fourth seed"
    err = capsys.readouterr().err
    assert "is given twice" in err and err.count("\n") == 1, f"one sentence naming the pair, got {err!r}"


@pytest.mark.train
def test_report_averages_only_one_comparison_over_other_seeds(tmp_path, capsys):
    """--paired prints a mean over the pairs only where each pair is another seed's test of the same comparison:
    two pairs on one seed's episodes (one seed counted twice), or A runs that differ in more than the seed (here
    the rule), print each pair's line and then, in place of the mean, one line saying why (exit code 0: every
    line printed is right). Tests of other numbers of episodes are refused naming both numbers, and a folder of
    runs given as a run is refused as no test rather than as the same test twice."""
    import report
    scores = {0: [1.0, 0.0, 1.0, 1.0], 1: [0.0, 1.0, 1.0, 1.0]}

    def test(rule, seed, episodes=4):
        name = f"{rule}-{seed}-{episodes}"
        config = dict(train=dict(rule=rule, seed=seed), model=dict(rule=rule), task=dict(name="omniglot"))
        write_results(tmp_path / name, task="omniglot", rule=rule, metric="accuracy", test_mean=0.75,
                      test_episodes=episodes, episodes_md5=f"seed{seed}", by_episode=scores[seed][:episodes], config=config)
        return str(tmp_path / name)
    for pairs, want in (([("hebbian", 0), ("none", 0), ("hebbian", 1), ("none", 1)], "over the 2 pairs: A - B"),
                        ([("hebbian", 0), ("none", 0), ("gradient", 0), ("none", 0)],
                         "no mean over the pairs: pairs 1 and 2 were tested on the same episodes (one seed)"),
                        ([("hebbian", 0), ("none", 0), ("gradient", 1), ("none", 1)],
                         "no mean over the pairs: their A runs differ in more than the seed (model.rule, train.rule)")):
        runs = [test(*run) for run in pairs]
        assert report.main(["--paired", *runs[:2], "--paired", *runs[2:]]) == 0, f"{pairs}: each pair's line is right"
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 3 and lines[0].startswith("A - B: ") and lines[1].startswith("A - B: "), lines
        assert lines[2].startswith(want), f"{pairs}: expected {want!r}, got {lines[2]!r}"
    retests = []
    for rule in ("hebbian", "none"):  # seed 0 retested at 5 shots, seed 1 at 1 shot: two questions
        for seed, shot in ((0, 5), (1, 1)):
            test(rule, seed)
            write_results(tmp_path / f"{rule}-{seed}-4", f"retest-3way-{shot}shot-1query.json", task="omniglot", rule=rule,
                          way=3, shot=shot, query=1, metric="accuracy", test_mean=0.75, test_episodes=4,
                          episodes_md5=f"retest{seed}", by_episode=scores[seed])
            retests.append(str(tmp_path / f"{rule}-{seed}-4" / f"retest-3way-{shot}shot-1query.json"))
    b_only = [test("hebbian", 0), test("none", 0), test("hebbian", 1), test("gradient", 1)]
    for argv, want in ((["--paired", retests[0], retests[2], "--paired", retests[1], retests[3]],
                        "their A runs differ in more than the seed (tested.shot)"),
                       (["--paired", *b_only[:2], "--paired", *b_only[2:]], "their B runs differ in more than the seed")):
        assert report.main(argv) == 0, f"{argv}: each pair's line is right"
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith(f"no mean over the pairs: {want}"), f"expected {want!r}, got {last!r}"
    assert report.main(["--paired", test("hebbian", 0, episodes=3), test("none", 0)]) == 2, "3 and 4 episodes cannot pair"
    err = capsys.readouterr().err
    assert "3 and 4 of them" in err and "--test-episodes" in err and err.count("\n") == 1, f"name both numbers: {err!r}"
    assert report.main(["--paired", str(tmp_path), str(tmp_path)]) == 2, "a folder of runs is no test"
    err = capsys.readouterr().err
    assert "cannot read a final test" in err and "same test" not in err, f"say it is no test: {err!r}"


@pytest.mark.train
@pytest.mark.parametrize("n, t", [(2, 12.706), (11, 2.228), (20, 2.093), (31, 2.042), (32, 2.0395), (41, 2.0211),
                                  (121, 1.9799), (1001, 1.9623)])
def test_t_95_is_students_quantile_for_any_number_of_seeds(n, t):
    """t(0.975, n - 1) from a table of Student's t (scipy.stats.t.ppf gives the same to the digits shown):
    the table to 31 values, the expansion beyond it; not the normal 1.96, up to 12% narrower at 11 seeds."""
    import report
    assert report.t_95(n) == pytest.approx(t, abs=5e-3 if n <= 31 else 2e-4), f"t(0.975, {n - 1}) is {t}, got {report.t_95(n)}"


def students_t_975(df: int) -> float:
    """t(0.975, df) from Student's distribution function in closed form for an integer df (Abramowitz and Stegun
    26.7.3 and 26.7.4: finite sums in theta = atan(t / sqrt(df))), solved by bisection: a reference that shares
    nothing with report.py's table or its expansion (it agrees with scipy.stats.t.ppf to 1e-13)."""
    def inside(t):  # P(|T| < t)
        theta = math.atan(t / math.sqrt(df))
        c = math.cos(theta)
        term, total, first = (c, c if df > 1 else 0.0, 3) if df % 2 else (1.0, 1.0, 2)
        for k in range(first, df - 1, 2):
            term *= (k - 1) / k * c * c
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * total) if df % 2 else math.sin(theta) * total
    low, high = 1.0, 20.0
    for _ in range(60):
        low, high = ((low + high) / 2, high) if inside((low + high) / 2) < 0.95 else (low, (low + high) / 2)
    return (low + high) / 2


@pytest.mark.train
def test_t_95_is_students_quantile_at_every_number_of_seeds_to_the_digits_it_shows():
    """Every n from 2 to 201, against the closed form: each table entry is Student's t rounded to the digits it
    shows (12.71 to two, the rest to three: a wrong digit at 5 seeds moves every 5-seed interval), and the
    expansion beyond the table is within 2e-4 of it, as its docstring says."""
    import report
    for n in range(2, 202):
        want, got = students_t_975(n - 1), report.t_95(n)
        if n in report.T_95:
            shown = round(want, 2 if n == 2 else 3)
            assert got == pytest.approx(shown, abs=1e-9), f"t(0.975, {n - 1}) is {want:.5f}, {shown} to the digits shown; the table says {got}"
        else:
            assert abs(got - want) < 2e-4, f"t(0.975, {n - 1}) is {want:.5f}; the expansion gives {got:.5f}"


def write_results(folder, name="results.json", **fields):
    """A hand-written results.json (or retest-*.json) in folder, made on the way."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(fields))


@pytest.mark.train
def test_report_keeps_one_seeds_own_intervals_and_three_digits_of_mse(tmp_path):
    """One seed: its test cell and its knock-out each keep their own interval over test episodes (test_ci95 and
    knockout_ci95, not one for both); an MSE is shown to three significant digits, its interval to two."""
    import report
    for task, metric, numbers in (("omniglot", "accuracy", (0.9, 0.004, 0.5, 0.03)),
                                  ("copy", "mse", (0.012345, 0.00123, 0.4567, 0.0456))):
        write_results(tmp_path / "one" / f"{task}-hebbian", task=task, rule="hebbian", metric=metric,
                      **dict(zip(("test_mean", "test_ci95", "knockout_mean", "knockout_ci95"), numbers)),
                      params=1000, train_time_s=60.0)
    table = report.tables(report.load_runs(str(tmp_path)))
    assert "| - | omniglot | - | 90.00 ± 0.40 (knock-out 50.00 ± 3.00); 0.00M; 1; 1.0 min |" in table, \
        f"one seed: 90.00 ± 0.40, its knock-out 50.00 ± 3.00 (its own knockout_ci95):\n{table}"
    assert "| - | copy | - | 0.0123 ± 0.0012 (knock-out 0.457 ± 0.046); 0.00M; 1; 1.0 min |" in table, \
        f"an MSE of 0.012345 ± 0.00123 is 0.0123 ± 0.0012 (three digits, two for the interval):\n{table}"


@pytest.mark.train
def test_report_marks_smoke_runs_and_short_tests_as_no_result(tmp_path, capsys):
    """A cell of runs under 100 steps, or tested on fewer than the protocol's 1,000 episodes, says so (as train.py
    said when it ran them), whether train.py or pretrain.py wrote it; a run of the protocol says nothing more."""
    import report
    assert train.main(tiny_argv(tmp_path / "smoke", "--steps", "20", "--test-episodes", "100")) == 0
    fields = dict(task="omniglot", metric="accuracy", test_mean=0.9, test_ci95=0.01, params=1000, train_time_s=60.0)
    write_results(tmp_path / "protocol" / "omniglot-none", rule="none", test_episodes=1000,
                  config=dict(train=dict(steps=8000)), **fields)
    write_results(tmp_path / "fewer" / "omniglot-none", rule="none", test_episodes=200,
                  config=dict(train=dict(steps=8000)), **fields)
    write_results(tmp_path / "pretrain" / "pretrain-omniglot", rule="prototypes", test_episodes=1000,
                  config=dict(steps=50), **fields)
    capsys.readouterr()
    table = report.tables(report.load_runs(str(tmp_path)))
    for folder, mark in (("smoke", "**smoke run (20 steps), 100 test episodes: not a result**"),
                         ("fewer", "**200 test episodes: not a result**"),
                         ("pretrain", "**smoke run (50 steps): not a result**")):
        assert mark in table.split(f"### {folder}")[1].split("###")[0], f"{folder}: expected {mark!r} in\n{table}"
    assert "not a result" not in table.split("### protocol")[1].split("###")[0], f"a protocol run is a result:\n{table}"


@pytest.mark.train
def test_report_rows_are_named_by_the_whole_setting_and_retests_by_their_runs_setting(tmp_path):
    """results/<experiment>/<setting, any depth>/seed<k>/<task>-<rule>/: every folder between the experiment and
    the seed names the row ('a/x' and 'b/x' are two rows, not one of four seeds), a retest's row is its run's
    setting and its episodes ('1 query' for one), rows come in order of setting, and the prototypes column is
    only an experiment's that has an encoder scored alone."""
    import report
    settings = {"b/x": 0.60, "a/x": 0.70, "a/y": 0.80}
    for setting, value in settings.items():
        for seed, spread in enumerate((0.0, 0.02)):  # two seeds 0.02 apart: half-width 12.71 * 0.02 / 2 = 0.1271
            folder = tmp_path / "exp" / setting / f"seed{seed}" / "omniglot-none"
            write_results(folder, task="omniglot", rule="none", metric="accuracy", test_mean=value + spread,
                          test_ci95=0.01, params=1000, train_time_s=60.0)
            write_results(folder, "retest-5way-5shot-1query.json", way=5, shot=5, query=1,
                          test_mean=value - 0.1 + spread, test_ci95=0.01)
    write_results(tmp_path / "other" / "pretrain-omniglot", task="omniglot", rule="prototypes", metric="accuracy",
                  test_mean=0.9, test_ci95=0.01, params=1000, train_time_s=60.0)
    table = report.tables(report.load_runs(str(tmp_path)))
    exp, other = table.split("### other")
    rows = {line.split(" | ")[0][2:]: line for line in exp.splitlines() if line.startswith("| ") and "omniglot" in line}
    want = [f"{setting}{label}" for setting in sorted(settings) for label in ("", ", retested 5-way 5-shot, 1 query per class")]
    assert list(rows) == want, f"rows {want} in this order (every folder of the setting, a retest under its run's):\n{table}"
    for setting, value in settings.items():
        run, retest = rows[setting], rows[f"{setting}, retested 5-way 5-shot, 1 query per class"]
        assert f"| {100 * value + 1:.2f} ± 12.71; 0.00M; 2;" in run and f"| {100 * value - 9:.2f} ± 12.71; 0.00M; 2;" in retest, \
            f"{setting}: its two seeds alone, {100 * value + 1:.2f} ± 12.71 and retested {100 * value - 9:.2f} ± 12.71:\n{table}"
    headers = [line for line in table.splitlines() if line.startswith("| setting")]
    assert headers == ["| setting | task | none | hebbian | gradient |", "| setting | task | none | hebbian | gradient | prototypes |"], \
        f"only experiment 'other' has an encoder scored alone, so only its table has a prototypes column:\n{table}"


@pytest.mark.train
def test_report_paired_line_against_an_explicit_computation(tmp_path, capsys):
    """--paired on hand-written scores of 10 episodes with spread (a tiny run's episodes often all differ by 0, which
    no interval formula tells apart): A - B's mean, its half-width 1.96 * std(ddof=1) / sqrt(10) (the normal
    interval of train.mean_ci95, not t: 2.262 here), the episodes where A is higher, lower and level counted
    apart, and each run's own mean after its letter. Two pairs (two seeds) give the line over the pairs, with
    t(0.975, 1) = 12.71; the same pair twice in a row is refused."""
    import report
    a = [1.0, 0.8, 0.6, 0.6, 0.9, 0.2, 1.0, 0.4, 0.7, 0.5]
    b = [0.6, 0.8, 0.7, 0.2, 0.9, 0.6, 0.5, 0.4, 0.3, 0.5]  # A higher on 4 episodes, lower on 2, level on 4
    c = [0.4, 0.8, 0.6, 0.6, 0.9, 0.2, 1.0, 0.4, 0.7, 0.5]  # seed 1: the same but its first episode
    paths = []
    for name, scores, md5 in (("a", a, "s0"), ("b", b, "s0"), ("c", c, "s1"), ("d", b, "s1")):
        write_results(tmp_path, f"{name}.json", task="omniglot", metric="accuracy", test_mean=sum(scores) / 10,
                      test_episodes=10, episodes_md5=md5, by_episode=scores)
        paths.append(str(tmp_path / f"{name}.json"))
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / 10
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 9) / math.sqrt(10)
    assert report.main(["--paired", paths[0], paths[1]]) == 0, "a pair of the same episodes should succeed"
    line = capsys.readouterr().out.strip()
    want = (f"A - B: +{100 * mean:.2f} ± {100 * half:.2f} points of accuracy (paired 95% interval over the same 10 "
            f"test episodes); A 67.00, B 55.00; A higher on 4, lower on 2, level on 4")
    assert line == want, f"expected\n{want}\ngot\n{line}"
    second = sum(x - y for x, y in zip(c, b)) / 10
    assert report.main(["--paired", paths[0], paths[1], "--paired", paths[2], paths[3]]) == 0, "two seeds' pairs"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    over = 12.71 * abs(mean - second) / math.sqrt(2) / math.sqrt(2)  # std of two values: |x - y| / sqrt(2)
    assert last.startswith(f"over the 2 pairs: A - B +{50 * (mean + second):.2f} ± {100 * over:.2f} points"), \
        f"two pairs: their mean and t(0.975, 1) = 12.71 times its standard error, got {last!r}"
    assert report.main(["--paired", paths[0], paths[1], "--paired", paths[0], paths[1]]) == 2, \
        "the same pair twice in a row would count as a second seed"
    assert "is given twice" in capsys.readouterr().err
    for name in ("a", "b"):  # run folders: the folder and its results.json are one test
        write_results(tmp_path / name, **json.loads((tmp_path / f"{name}.json").read_text()))
    spelled = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a" / "results.json"), str(tmp_path / "b") + "/"]
    assert report.main(["--paired", *spelled[:2], "--paired", paths[2], paths[3], "--paired", *spelled[2:]]) == 2, \
        "the same pair given as folders and as their results.json would count as a second seed"
    assert "is given twice" in capsys.readouterr().err
    assert report.main(["--paired", spelled[0], spelled[2]]) == 2, "a run paired with itself differs by zero by construction"
    assert "are the same test" in capsys.readouterr().err


@pytest.mark.train
def test_report_pairs_only_tests_of_the_same_number_task_and_images(tmp_path, capsys):
    """same_episodes: the number of episodes and the task are compared besides episodes_md5; where both runs kept
    images_md5 it decides (the same targets drawn from another split's images are refused, even with the same
    inputs_md5); and a pretrain.py run's split is the one at the top of its config."""
    import report
    test = dict(test_episodes=4, task="omniglot", episodes_md5="t", inputs_md5="v", images_md5="i", split=None)
    assert report.same_episodes(test, dict(test)), "a test is paired with itself"
    for change in (dict(test_episodes=5), dict(test_episodes=None), dict(task="cifar_fs"), dict(images_md5="j")):
        assert not report.same_episodes(test, test | change), f"{change}: other episodes, which should not be paired"
    unprinted = {k: v for k, v in test.items() if k != "images_md5"}
    assert "read as other inputs" in report.episodes_differ(unprinted, unprinted | dict(inputs_md5="w")), \
        "without images_md5, other inputs_md5 may be other training classes: say so, not other images alone"
    for name, images in (("vinyals", "i"), ("lake", "j")):
        write_results(tmp_path, f"{name}.json", metric="accuracy", test_mean=0.5, by_episode=[1.0, 0.0, 1.0, 0.0],
                      **{k: v for k, v in test.items() if k != "split"} | dict(images_md5=images))
    assert report.main(["--paired", str(tmp_path / "vinyals.json"), str(tmp_path / "lake.json")]) == 2, \
        "the same targets on other images (another split) should be refused"
    assert "different episodes" in capsys.readouterr().err
    for split in ("vinyals", "lake"):  # pretrain.py's results.json from before inputs_md5: its config names the split
        write_results(tmp_path / f"pretrain-{split}", metric="accuracy", task="omniglot", test_mean=0.5, test_episodes=4,
                      episodes_md5="t", by_episode=[1.0, 0.0, 1.0, 0.0], config=dict(split=split))
    assert report.read_test(str(tmp_path / "pretrain-lake"))["split"] == "lake", "pretrain.py's config names the split at its top"
    assert report.main(["--paired", str(tmp_path / "pretrain-vinyals"), str(tmp_path / "pretrain-lake")]) == 2, \
        "pretrain.py runs of two splits should be refused"
    capsys.readouterr()


def window_plot_calls(monkeypatch) -> dict:
    """{file name: (y scale, x tick labels, [(rule, x, means, intervals) per errorbar])} of the window plots that
    report.py saves from now on, read from its calls to matplotlib (the plots themselves are written as usual)."""
    import report
    from matplotlib.axes import Axes
    drawn, saved = [], {}
    errorbar, save_plot = Axes.errorbar, report.save_plot
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, yerr=None, **kw: drawn.append(
        (kw["label"], list(x), list(y), list(yerr))) or errorbar(self, x, y, yerr, **kw))
    monkeypatch.setattr(report, "save_plot", lambda fig, path: saved.__setitem__(os.path.basename(path), (
        fig.axes[0].get_yscale(), [t.get_text() for t in fig.axes[0].get_xticklabels()], list(drawn))) or
        drawn.clear() or save_plot(fig, path))
    return saved


@pytest.mark.train
def test_report_plots_each_window_task_against_the_window_in_order(tmp_path, monkeypatch):
    """window-<task>.png of experiment 'window': per rule, each window's mean over seeds with its interval (the
    table's numbers), in order of the window (4 before 16, full attention last); accuracy on a linear axis, MSE on
    a log one."""
    import report
    saved = window_plot_calls(monkeypatch)
    for task, metric, windows in (("omniglot", "accuracy", ("full", "16", "4")), ("copy", "mse", ("full", "2"))):
        for i, window in enumerate(windows):
            for seed, spread in enumerate((0.0, 0.02) if window == "16" else (0.0,)):
                for rule, shift in (("none", 0.0), ("hebbian", 0.1)):
                    write_results(tmp_path / "window" / f"{task}-w{window}" / f"seed{seed}" / f"{task}-{rule}",
                                  task=task, rule=rule, metric=metric, test_mean=0.5 + 0.1 * i + shift + spread,
                                  test_ci95=0.01 * (i + 1), params=1000, train_time_s=60.0)
    assert report.main([str(tmp_path)]) == 0
    assert sorted(saved) == ["window-copy.png", "window-omniglot.png"] and (tmp_path / "window-omniglot.png").is_file(), \
        f"one plot per task of experiment window, got {sorted(saved)}"
    scale, ticks, lines = saved["window-omniglot.png"]
    assert ticks == ["4", "16", "full"] and scale == "linear", f"windows 4, 16, full on a linear axis, got {ticks} {scale}"
    half = 12.71 * 0.02 / 2  # two seeds 0.02 apart at window 16
    for rule, shift in (("none", 0.0), ("hebbian", 0.1)):
        label, x, means, cis = next(line for line in lines if line[0] == rule)
        assert x == [0, 1, 2] and means == pytest.approx([0.7 + shift, 0.61 + shift, 0.5 + shift]) and \
            cis == pytest.approx([0.03, half, 0.01]), f"{rule}: means and intervals at windows 4, 16, full, got {means} {cis}"
    scale, ticks, _ = saved["window-copy.png"]
    assert ticks == ["2", "full"] and scale == "log", f"copy's MSE against windows 2, full on a log axis, got {ticks} {scale}"


@pytest.mark.train
def test_report_plots_a_rule_that_skipped_a_window_at_its_own_windows(tmp_path, monkeypatch):
    """Each window has one place on the axis whichever rules ran it: the static model at windows 1, 4 and full,
    the Hebbian rule at 4 and full only, so its points go at places 1 and 2, not 0 and 1. A retest in the
    experiment, and a setting that names no window, are left out of the plot rather than crashing it."""
    import report
    saved = window_plot_calls(monkeypatch)
    for rule, windows in (("none", ("1", "4", "full")), ("hebbian", ("4", "full"))):
        for i, window in enumerate(windows):
            folder = tmp_path / "window" / f"omniglot-w{window}" / "seed0" / f"omniglot-{rule}"
            write_results(folder, task="omniglot", rule=rule, metric="accuracy", test_mean=0.5 + 0.1 * i,
                          test_ci95=0.01, params=1000, train_time_s=60.0)
    write_results(tmp_path / "window" / "omniglot-w4" / "seed0" / "omniglot-none", "retest-20way-1shot-3query.json",
                  way=20, shot=1, query=3, test_mean=0.3, test_ci95=0.01)
    write_results(tmp_path / "window" / "omniglot-way20" / "seed0" / "omniglot-none", task="omniglot", rule="none",
                  metric="accuracy", test_mean=0.3, test_ci95=0.01, params=1000, train_time_s=60.0)
    assert report.main([str(tmp_path)]) == 0, "a retest or a setting without a window should not stop the plots"
    _, ticks, lines = saved["window-omniglot.png"]
    assert ticks == ["1", "4", "full"], f"the windows any rule ran, in order: 1, 4, full; got {ticks}"
    placed = {rule: (x, means) for rule, x, means, _ in lines}
    assert placed["none"] == ([0, 1, 2], pytest.approx([0.5, 0.6, 0.7])) and \
        placed["hebbian"] == ([1, 2], pytest.approx([0.5, 0.6])), \
        f"the Hebbian rule's windows 4 and full belong at places 1 and 2 (the static model's 1, 4, full at 0-2): {placed}"


@pytest.mark.train
def test_report_marks_a_cell_by_its_fewest_steps_and_episodes_over_every_seed(tmp_path):
    """not_a_result: a smoke run is one under SMOKE_RUN's 100 steps (99 is, 100 is not), any seed of a cell makes
    it no result (not only the first), and the cell names the fewest steps and test episodes among its seeds."""
    import report
    fields = dict(task="omniglot", rule="none", metric="accuracy", test_mean=0.9, test_ci95=0.01, params=1000,
                  train_time_s=60.0)
    cells = {"hundred": [(100, 1000)], "ninety-nine": [(99, 1000)], "second-seed": [(8000, 1000), (50, 200)],
             "fewest": [(60, 300), (20, 100), (80, 400)]}  # setting: (steps, test episodes) per seed
    said = {"hundred": None, "ninety-nine": "smoke run (99 steps)", "second-seed": "smoke run (50 steps), 200 test episodes",
            "fewest": "smoke run (20 steps), 100 test episodes"}
    for setting, seeds in cells.items():
        for seed, (steps, episodes) in enumerate(seeds):
            write_results(tmp_path / "exp" / setting / f"seed{seed}" / "omniglot-none", test_episodes=episodes,
                          config=dict(train=dict(steps=steps, seed=seed)), **fields)
    table = report.tables(report.load_runs(str(tmp_path)))
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ") and "omniglot" in line}
    for setting, mark in said.items():
        if mark is None:
            assert "not a result" not in rows[setting], f"{setting}: 100 steps and 1,000 episodes are a result:\n{table}"
        else:
            assert f"; **{mark}: not a result**" in rows[setting], f"{setting}: expected {mark!r} (the fewest over seeds):\n{table}"


@pytest.mark.train
def test_report_compares_the_options_each_run_used_whatever_its_rule_or_task():
    """differing_options: a None coef_init is the gradient rule's own ('negative', not the Hebbian 'positive'), and
    an option that does not act on the run's task (jitter on Omniglot) is not compared even where both configs
    record it."""
    import report

    def run(rule, train=None, model=None, task=None):
        return dict(rule=rule, config=dict(train=dict(seed=0) | (train or {}), model=dict(rule=rule) | (model or {}),
                                           task=dict(name="omniglot", way=5, shot=1) | (task or {})))
    for rule, a, b in (("gradient", run("gradient", model=dict(coef_init="negative")), run("gradient", model=dict(coef_init=None))),
                       ("hebbian", run("hebbian", task=dict(jitter=0.4)), run("hebbian", task=dict(jitter=0.0)))):
        assert report.differing_options([a, b]) == {}, f"{rule}: {a['config']} and {b['config']} ran alike"


@pytest.mark.train
def test_report_says_why_two_tests_cannot_be_paired_and_names_the_fix_only_where_it_helps(tmp_path, capsys):
    """episodes_differ names the reason (the two tasks, the targets drawn, the images, the split), and --paired's
    refusal suggests fingerprint.py only for tests of the same number, task and targets that lack images_md5 on
    one side: not for 3 and 4 episodes, two tasks, or tests whose images_md5 already differ."""
    import report
    printed = dict(test_episodes=4, task="omniglot", episodes_md5="t", inputs_md5="v", images_md5="i", split="lake")
    old = dict(test_episodes=4, task="omniglot", episodes_md5="t", split="lake")  # tested before inputs_md5
    for a, b, reason in ((printed, printed | dict(task="cifar_fs"), "of omniglot and of cifar_fs"),
                         (printed, printed | dict(episodes_md5="u"), "other classes and images drawn"),
                         (printed, printed | dict(images_md5="j"), "the same classes drawn, from other images"),
                         (old, old | dict(split="vinyals"), "the same classes drawn, from another split")):
        said = report.episodes_differ(a, b) or ""
        assert reason in said, f"{a} and {b}: expected {reason!r}, got {said!r}"
    scores = [1.0, 0.0, 1.0, 0.0]
    for name, fields in (("a", {}), ("three", dict(test_episodes=3)), ("cifar", dict(task="cifar_fs")),
                         ("printed", dict(images_md5="i")), ("reprinted", dict(images_md5="j", inputs_md5="w"))):
        n = fields.get("test_episodes", 4)
        write_results(tmp_path, f"{name}.json", **dict(task="omniglot", metric="accuracy", test_mean=0.5, test_episodes=n,
                                                       episodes_md5="t", inputs_md5="v", by_episode=scores[:n]) | fields)
    for a, b in (("three", "a"), ("cifar", "a"), ("printed", "reprinted")):
        assert report.main(["--paired", str(tmp_path / f"{a}.json"), str(tmp_path / f"{b}.json")]) == 2, f"{a} and {b}: refused"
        err = capsys.readouterr().err
        assert "different episodes" in err and "fingerprint.py" not in err, \
            f"{a} and {b}: images_md5 would not pair them, so no fingerprint.py hint: {err!r}"


@pytest.mark.train
def test_report_paired_refuses_a_test_without_its_fields_or_episodes_and_knows_a_linked_folder(tmp_path, capsys):
    """read_test: a file lacking any of metric, test_mean, test_episodes is no final test, and one with an empty
    by_episode keeps no per-episode scores (one sentence each, not a crash); a run folder reached through a link
    is the same test as the folder itself."""
    import report
    full = dict(task="omniglot", metric="accuracy", test_mean=0.5, test_episodes=4, episodes_md5="t", by_episode=[1.0, 0.0, 1.0, 0.0])
    write_results(tmp_path / "run", **full)
    write_results(tmp_path / "other", **full | dict(by_episode=[0.0, 0.0, 1.0, 0.0], test_mean=0.25))
    write_results(tmp_path, "no-count.json", **{k: v for k, v in full.items() if k != "test_episodes"})
    write_results(tmp_path, "empty.json", **full | dict(by_episode=[]))
    for path, message in (("no-count.json", "holds no final test"), ("empty.json", "keeps no per-episode scores")):
        assert report.main(["--paired", str(tmp_path / path), str(tmp_path / "run")]) == 2, f"{path}: refused"
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, f"{path}: one sentence with {message!r}, got {err!r}"
    os.symlink(tmp_path / "run", tmp_path / "link")
    assert report.main(["--paired", str(tmp_path / "link"), str(tmp_path / "run")]) == 2, "a link to the run is the run"
    assert "are the same test" in capsys.readouterr().err
    assert report.main(["--paired", str(tmp_path / "run"), str(tmp_path / "other"),
                        "--paired", str(tmp_path / "link"), str(tmp_path / "other")]) == 2, "one pair through a link is one pair"
    assert "is given twice" in capsys.readouterr().err


@pytest.mark.train
def test_report_no_mean_over_pairs_that_share_a_seed_or_ask_another_question(tmp_path, capsys):
    """why_no_mean over three pairs: the first and third sharing a seed (not neighbours) say so; retests of other
    ways, or other numbers of queries, ask other questions, and so do retests of runs trained with another lr (read
    from the run's results.json beside each retest); static runs that differ only in fast-weight options, which the
    static model does not read, are the same comparison and get their mean."""
    import report

    def run(name, rule, seed, train=None, model=None):
        config = dict(train=dict(seed=seed, lr=0.001) | (train or {}), model=dict(rule=rule) | (model or {}),
                      task=dict(name="omniglot", way=5, shot=1))
        write_results(tmp_path / name, task="omniglot", rule=rule, metric="accuracy", test_mean=0.5, test_episodes=4,
                      episodes_md5=f"seed{seed}", by_episode=[1.0, float(seed % 2), 0.0, 1.0], config=config)
        return str(tmp_path / name)

    def retest(folder, rule, seed, way=5, shot=1, query=1):
        name = f"retest-{way}way-{shot}shot-{query}query.json"
        write_results(tmp_path / folder, name, task="omniglot", rule=rule, way=way, shot=shot, query=query,
                      metric="accuracy", test_mean=0.5, test_episodes=4, episodes_md5=f"r{seed}-{way}-{shot}-{query}",
                      by_episode=[1.0, 0.0, float(rule == "hebbian"), 1.0])
        return str(tmp_path / folder / name)

    pairs = {seed: (run(f"h{seed}", "hebbian", seed), run(f"n{seed}", "none", seed)) for seed in range(3)}
    fast = {seed: (run(f"fh{seed}", "hebbian", seed), run(f"fn{seed}", "none", seed, model=dict(eta=0.1 * seed, decay=seed)))
            for seed in range(2)}
    for seed in range(2):
        run(f"lr{seed}", "hebbian", seed, train=dict(lr=0.001 * (seed + 1)))
    cases = (([pairs[0], pairs[1], pairs[0][:1] + (run("n0b", "none", 0),)], "pairs 1 and 3 were tested on the same episodes"),
             ([(retest("h0", "hebbian", 0, way=5), retest("n0", "none", 0, way=5)),
               (retest("h1", "hebbian", 1, way=10), retest("n1", "none", 1, way=10))], "their A runs differ in more than the seed (tested.way)"),
             ([(retest("h0", "hebbian", 0, query=1), retest("n0", "none", 0, query=1)),
               (retest("h1", "hebbian", 1, query=3), retest("n1", "none", 1, query=3))], "their A runs differ in more than the seed (tested.query)"),
             ([(retest("lr0", "hebbian", 0), retest("n0", "none", 0)), (retest("lr1", "hebbian", 1), retest("n1", "none", 1))],
              "their A runs differ in more than the seed (train.lr)"),
             ([fast[0], fast[1]], "over the 2 pairs: A - B"))
    for pairs_given, want in cases:
        argv = [arg for a, b in pairs_given for arg in ("--paired", a, b)]
        assert report.main(argv) == 0, f"{argv}: each pair's line is right"
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert want in last, f"{[os.path.relpath(p, tmp_path) for p in argv[1::3]]}...: expected {want!r}, got {last!r}"


@pytest.mark.train
def test_report_plots_only_experiment_window_and_a_window_folder_below_the_task(tmp_path, monkeypatch):
    """Only experiment 'window' is plotted (another experiment's -w<k> settings are not), and a setting whose last
    folder names the window (omniglot/w4, as WINDOW_SETTING allows) is a window of the plot."""
    import report
    saved = window_plot_calls(monkeypatch)
    for experiment, setting in (("window", "omniglot/w4"), ("window", "omniglot/wfull"), ("other", "copy-w2")):
        task = setting.split("/")[0].split("-")[0]
        write_results(tmp_path / experiment / setting / "seed0" / f"{task}-none", task=task, rule="none",
                      metric="accuracy" if task == "omniglot" else "mse", test_mean=0.5, test_ci95=0.01, params=1000,
                      train_time_s=60.0)
    assert report.main([str(tmp_path)]) == 0
    assert sorted(saved) == ["window-omniglot.png"], f"only experiment window's task is plotted, got {sorted(saved)}"
    assert saved["window-omniglot.png"][1] == ["4", "full"], f"windows 4 and full, got {saved['window-omniglot.png'][1]}"


@pytest.mark.train
def test_report_reads_results_by_default_and_a_run_folder_given_itself(tmp_path, monkeypatch, capsys):
    """report.py with no folder reads results/ of the working directory; a run folder given itself is a run
    directly in the folder given: an experiment named after it."""
    import report
    write_results(tmp_path / "results" / "exp" / "copy-none", task="copy", rule="none", metric="mse", test_mean=0.5,
                  test_ci95=0.01, params=1000, train_time_s=60.0)
    write_results(tmp_path / "runs" / "copy-none", task="copy", rule="none", metric="mse", test_mean=0.5,
                  test_ci95=0.01, params=1000, train_time_s=60.0)
    monkeypatch.chdir(tmp_path)
    assert report.main([]) == 0, "the default folder results/ holds a run"
    assert "### exp" in capsys.readouterr().out, "the default folder is results/"
    assert report.main([str(tmp_path / "runs" / "copy-none")]) == 0
    out = capsys.readouterr().out
    assert "### copy-none" in out and "| - | copy |" in out, f"a run folder given alone: experiment copy-none, setting -:\n{out}"


@pytest.mark.train
def test_report_no_mean_over_one_seed_that_only_one_sides_images_md5_show(tmp_path, capsys):
    """Two pairs of one seed whose runs were trained on other numbers of classes: each pair is paired by inputs_md5
    (one side fingerprinted, the other not), and only the fingerprinted side's images_md5 show that the two pairs
    share their episodes. Whichever side that is, A or B, the mean over the pairs is refused."""
    import report
    for printed in ("A", "B"):
        paths = []
        for pair, inputs in ((1, "v"), (2, "w")):  # trained 5-way and 10-way: other inputs_md5, one seed's episodes
            for side in ("A", "B"):
                fields = dict(task="omniglot", metric="accuracy", test_mean=0.5, test_episodes=4, episodes_md5="t",
                              inputs_md5=inputs, by_episode=[1.0, 0.0, float(side == "A"), float(pair == 1)])
                write_results(tmp_path / printed, f"{side}{pair}.json", **fields | (dict(images_md5="i") if side == printed else {}))
                paths.append(str(tmp_path / printed / f"{side}{pair}.json"))
        assert report.main(["--paired", *paths[:2], "--paired", *paths[2:]]) == 0, "each pair is paired by inputs_md5"
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith("no mean over the pairs: pairs 1 and 2 were tested on the same episodes"), \
            f"the {printed} runs' images_md5 show one seed twice: expected no mean, got {last!r}"


@pytest.mark.train
def test_report_no_mean_over_a_retest_pair_and_a_final_test_pair(tmp_path, capsys):
    """A pair of 5-way retests (seed 0) and a pair of the 20-way runs' own final tests (seed 1) ask two questions:
    the runs' configs are alike, but one side is a retest and the other is not, so no mean over the pairs."""
    import report
    for rule, scores in (("hebbian", [1.0, 1.0, 0.0, 1.0]), ("none", [0.0, 1.0, 0.0, 1.0])):
        for seed in (0, 1):
            config = dict(train=dict(seed=seed), model=dict(rule=rule), task=dict(name="omniglot", way=20, shot=1))
            write_results(tmp_path / f"{rule}{seed}", task="omniglot", rule=rule, metric="accuracy", test_mean=0.75,
                          test_episodes=4, episodes_md5=f"s{seed}", by_episode=scores, config=config)
            write_results(tmp_path / f"{rule}{seed}", "retest-5way-1shot-1query.json", task="omniglot", rule=rule, way=5,
                          shot=1, query=1, metric="accuracy", test_mean=0.75, test_episodes=4, episodes_md5=f"r{seed}",
                          by_episode=scores[::-1])
    retest = "retest-5way-1shot-1query.json"
    assert report.main(["--paired", str(tmp_path / "hebbian0" / retest), str(tmp_path / "none0" / retest),
                        "--paired", str(tmp_path / "hebbian1"), str(tmp_path / "none1")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("no mean over the pairs: their A runs differ in more than the seed"), \
        f"a 5-way retest and a 20-way final test are two questions: expected no mean, got {last!r}"


@pytest.mark.train
def test_mean_ci95_is_the_normal_interval_of_the_mean():
    values = torch.tensor([0.2, 0.4, 0.9, 0.5, 0.7], dtype=torch.float64)
    mean, ci = train.mean_ci95(values)
    want = 1.96 * np.std(values.numpy(), ddof=1) / np.sqrt(5)
    assert abs(mean - 0.54) < 1e-12, f"mean should be 0.54, got {mean}"
    assert abs(ci - want) < 1e-12, f"95% CI half-width should be 1.96 * sample std / sqrt(n) = {want:.6f}, got {ci:.6f}"
    two = train.mean_ci95(torch.tensor([0.0, 1.0]))  # the fewest episodes allowed (--eval-episodes 2) still have an interval
    assert two == pytest.approx((0.5, 1.96 * math.sqrt(0.5) / math.sqrt(2))), f"two values 0 and 1: mean 0.5, CI 0.98, got {two}"
    same = torch.full((100,), 0.2)  # float32, as episodes score: 100 x 0.2 has no spread at all
    assert train.mean_ci95(same)[1] == 0.0, f"identical values have a CI of exactly 0, got {train.mean_ci95(same)[1]}"


@pytest.mark.train
def test_the_final_test_pairs_the_model_with_its_knock_out_episode_by_episode():
    """summarise_test: plasticity_mean/ci95 are the mean and 1.96 std / sqrt(n) of the model's score minus the
    knock-out's on each episode (numpy, float64), far narrower here than either mean's own interval."""
    values = torch.tensor([0.8, 0.6, 1.0, 0.4, 0.9, 0.7])
    knocked = values - torch.tensor([0.1, 0.0, 0.2, 0.1, 0.0, 0.1])
    trace = dict(metric=torch.zeros(3), scored=torch.ones(3))
    fingerprint = dict(episodes_md5="md5", inputs_md5="inputs")
    results, line = train.summarise_test(values, trace, knocked, fingerprint, tasks.make_task("copy"))
    effect = values.double().numpy() - knocked.double().numpy()
    want = (effect.mean(), 1.96 * effect.std(ddof=1) / np.sqrt(6))
    assert (results["plasticity_mean"], results["plasticity_ci95"]) == pytest.approx(want, abs=1e-6), \
        f"the model minus its knock-out should be {want}, got {results['plasticity_mean']}, {results['plasticity_ci95']}"
    assert results["plasticity_ci95"] < results["knockout_ci95"] / 2, "pairing should remove the episodes' shared spread"
    assert "the model minus it +0.083 ± 0.06 (paired)" in line, f"the printed line should give the paired effect: {line}"
    assert results["by_episode"] == pytest.approx(values.tolist(), abs=1e-6) and results["episodes_md5"] == "md5"
    assert results["inputs_md5"] == "inputs", "the episodes' whole fingerprint should be kept"
    assert results["knockout_by_episode"] == pytest.approx(knocked.tolist(), abs=1e-6), \
        f"knockout_by_episode should be the knock-out's own scores {knocked.tolist()}, got {results['knockout_by_episode']}"
    k = knocked.double().numpy()
    want = (k.mean(), 1.96 * k.std(ddof=1) / np.sqrt(6))
    assert (results["knockout_mean"], results["knockout_ci95"]) == pytest.approx(want, abs=1e-6), \
        f"the knock-out's mean and interval should be its own scores' {want}, got {results['knockout_mean']}, " \
        f"{results['knockout_ci95']}"
    half_scored = dict(metric=torch.tensor([0.3, 0.0]), scored=torch.tensor([0.5, 0.0]))
    assert train.metric_by_position(half_scored) == [0.6, None], \
        "a position scored in half the episodes: its metric summed over them, divided by that half; None where none is"


@pytest.mark.train
def test_the_knock_out_scores_the_tests_own_episodes(monkeypatch):
    """final_evaluations: the knock-out (eta = 0) is evaluate() on the test's split, number and seed of
    episodes, so that plasticity_mean pairs them episode by episode; the static model has none."""
    calls = []
    monkeypatch.setattr(train, "evaluate", lambda model, task, split, episodes, batch_size, device, seed, eta=None, **kw:
                        calls.append((split, episodes, seed, eta)) or (torch.zeros(episodes), {}))
    tc = train.TrainConfig(test_episodes=6, seed=4, batch_size=3)
    for rule in ("hebbian", "none"):
        calls.clear()
        train.final_evaluations(types.SimpleNamespace(config=Config(rule=rule)), None, tc, "cpu")
        want = [("test", 6, 6, None)] + ([("test", 6, 6, 0.0)] if rule != "none" else [])
        assert calls == want, f"{rule}: the test and its knock-out should be {want}, got {calls}"


@pytest.mark.train
def test_a_resume_runs_the_optimizer_as_this_run_asks(tmp_path):
    """A checkpoint's AdamW groups take this run's capturable and weight decay: a state saved capturable (by a
    CUDA-graph run) steps on a CPU, and a changed --weight-decay is the one used, as config.json records."""
    params = [torch.nn.Parameter(torch.ones(3))]
    saved_optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, capturable=True)
    params[0].grad = torch.ones(3)
    saved = saved_optimizer.state_dict()
    resumed = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, capturable=False)
    resumed.load_state_dict(train.resumed_optimizer_state(saved, train.TrainConfig(weight_decay=0.5), graphed=False))
    assert [(g["capturable"], g["weight_decay"]) for g in resumed.param_groups] == [(False, 0.5)]
    resumed.step()  # a capturable state on the CPU would stop here
    assert torch.allclose(params[0].detach(), torch.full((3,), 1 - 0.1 * 0.5 - 0.1), atol=1e-4), \
        f"one AdamW step of lr 0.1 with weight decay 0.5 from ones: {params[0].detach().tolist()}"


@pytest.mark.train
def test_evaluate_scores_the_requested_episodes_reproducibly(monkeypatch):
    """evaluate() returns one metric per episode, equal to task.metric on the same seeded episodes (drawn
    EVAL_DRAW at a time, run batch_size at a time), the same ones every time for a seed, and passes the
    knock-out rate to the model; its trace's "metric" is each position's squared error where scored,
    averaged over the episodes."""
    monkeypatch.setattr(train, "EVAL_DRAW", 4)
    task = tasks.make_task("copy", **TINY_TASKS["copy"])
    torch.manual_seed(0)
    model = PlasticGPT(Config(d_in=task.d_in, d_out=task.d_out, max_len=task.seq_len, n_layer=1, n_head=2, d_model=16))
    values, trace = train.evaluate(model, task, "test", episodes=10, batch_size=3, device="cpu", seed=3)
    assert values.shape == (10,), f"one metric per episode: expected (10,), got {tuple(values.shape)}"
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        batches = [task.sample(n, "test", "cpu", generator) for n in (4, 4, 2)]
        expected = torch.cat([task.metric(model(b.x)[0], b) for b in batches])
        per_position = torch.cat([(model(b.x)[0] - b.target).pow(2).mean(-1) * b.mask for b in batches]).mean(0)
        eta = torch.cat([model(b.x)[1]["eta"] for b in batches]).mean(0)
    assert torch.allclose(values, expected), "evaluate() should score exactly the seeded episodes, drawn 4 + 4 + 2"
    assert torch.allclose(trace["metric"], per_position), "the trace's metric should be each position's mean squared error"
    assert torch.allclose(trace["eta"], eta), "the trace's eta should be each position's mean over the 10 episodes"
    assert torch.equal(trace["scored"], torch.cat([b.mask for b in batches]).float().mean(0)), \
        "the trace's scored should be the fraction of episodes that score each position"
    again, _ = train.evaluate(model, task, "test", episodes=10, batch_size=3, device="cpu", seed=3)
    assert torch.equal(values, again), "the same seed must give the same episodes and scores"
    _, knocked = train.evaluate(model, task, "test", episodes=10, batch_size=3, device="cpu", seed=3, eta=0.0)
    assert torch.all(knocked["eta"] == 0) and torch.all(trace["eta"] > 0), "eta=0.0 must reach the model (knock-out)"
    assert trace["eta"].shape == (task.seq_len,), "the trace is one mean per token position"


def image_model_and_task(rule):
    """A tiny model with the Conv4 encoder (batch norm) and a 3-way 1-shot task on synthetic images."""
    task = synthetic_few_shot(TaskConfig("omniglot", **TINY_TASKS["omniglot"]))
    torch.manual_seed(0)
    model = PlasticGPT(Config(d_in=task.d_in, d_out=task.d_out, max_len=task.seq_len, image_shape=task.image_shape,
                              rule=rule, n_layer=1, n_head=2, d_model=16, encoder_channels=8))
    return model, task


@pytest.mark.train
def test_evaluate_leaves_batch_norm_statistics_unchanged():
    """Evaluation runs in eval mode: batch norm uses its running statistics and does not update them."""
    model, task = image_model_and_task("none")
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert before, "setup: the encoder should have batch-norm buffers"
    train.evaluate(model, task, "val", episodes=4, batch_size=4, device="cpu", seed=0)
    changed = [name for name, buffer in model.named_buffers() if not torch.equal(buffer, before[name])]
    assert not changed, f"evaluate() changed the batch-norm buffers {changed}: it must run the model in eval mode"
    assert model.training, "evaluate() must hand the model back in training mode, for the steps after a validation"


@pytest.mark.train
def test_evaluate_scores_each_episode_alone_whatever_the_batch_size(monkeypatch):
    """A seed's episodes scored in batches of 1, 2 and 5 give the same scores and the same trace: the
    episodes do not depend on the batch (drawn EVAL_DRAW at a time, here 3, across which the slices of
    2 and 5 fall), and in eval mode no episode's images influence another's (non-transductive)."""
    monkeypatch.setattr(train, "EVAL_DRAW", 3)
    model, task = image_model_and_task("hebbian")
    results = {batch_size: train.evaluate(model, task, "val", episodes=7, batch_size=batch_size, device="cpu", seed=0)
               for batch_size in (1, 2, 5)}
    alone, alone_trace = results[1]
    for batch_size in (2, 5):
        scores, trace = results[batch_size]
        assert torch.allclose(alone, scores, atol=1e-6), \
            f"per-episode scores differ between batches of 1 and {batch_size}: {alone} vs {scores}"
        for key in ("eta", "fast_norm"):
            assert torch.allclose(alone_trace[key], trace[key], rtol=1e-4), \
                f"the {key} trace differs between batches of 1 and {batch_size}"


# ----------------------------------------------------------------------------------------------
# Progress, interruptions, run folders and mistakes: nothing is lost, every error is one sentence


def tiny_argv(out_dir, *options) -> list[str]:
    """The command line of tiny() for train.main, with the static rule: the quickest, and these tests are about
    the run, not the rule."""
    return ["--task", "copy", "--rule", "none", "--seq-len", "2", "--delay", "1", "--n-layer", "2", "--n-head", "2",
            "--d-model", "16", "--batch-size", "4", "--eval-episodes", "4", "--test-episodes", "8", "--device", "cpu",
            "--out-dir", str(out_dir), *options]


@pytest.mark.train
def test_the_first_steps_logged_loss_is_the_tasks_loss_averaged_over_its_batch(tmp_path):
    """The loss a step trains on and logs is task.loss, the mean over the batch's sequences, on the first
    batch of the training stream (seeded by --seed) for the model built from the seed: reproduced here from
    the saved config, and not the sum over the batch (which --grad-clip would then clip B times sooner)."""
    cfg = tiny(tmp_path, "copy", "hebbian", steps=1, batch_size=4, log_interval=1, grad_clip=0.0, seed=3)
    train.train(cfg)
    run_dir = tmp_path / "copy-hebbian"
    logged = next(r["loss"] for r in train.read_log(run_dir) if r["split"] == "train" and r["step"] == 1)
    saved = json.loads((run_dir / "config.json").read_text())
    task = train.load_task(cfg.task)
    torch.manual_seed(3)
    model = PlasticGPT(train.model_of(saved["model"]))
    batch = task.sample(4, "train", "cpu", torch.Generator().manual_seed(3))
    out, _ = model(batch.x, batch.images, fast_norm=False, context=batch.context)
    want = task.loss(out.float(), batch).item()
    assert logged == pytest.approx(want, rel=1e-5), f"step 1 logged loss {logged}, the task's mean loss on its batch {want}"


@pytest.mark.train
def test_progress_lines_come_after_the_first_step_then_by_steps_or_seconds(tmp_path):
    train.train(tiny(tmp_path / "by_steps", rule="none", steps=5, log_interval=100, log_seconds=1000.0, eval_interval=100))
    logged = [r["step"] for r in train.read_log(tmp_path / "by_steps/copy-none") if r["split"] == "train"]
    assert logged == [1, 5], f"a line after the first step and one at the last (validation) step, got {logged}"
    train.train(tiny(tmp_path / "by_time", rule="none", steps=5, log_interval=100, log_seconds=1e-9, eval_interval=100))
    logged = [r["step"] for r in train.read_log(tmp_path / "by_time/copy-none") if r["split"] == "train"]
    assert logged == [1, 2, 3, 4, 5], f"log_seconds passed at every step, so every step should log, got {logged}"


@pytest.mark.train
def test_a_long_cpu_run_prints_one_hint_with_settings_that_finish_in_minutes(tmp_path, monkeypatch, capsys):
    hint = train.cpu_hint(TrainConfig(steps=4000), Config(d_model=128, n_layer=4), ms_per_step=700.0)
    assert "--steps 420 --d-model 64 --n-layer 2" in hint, f"300 s at 700 ms/step is 428 steps, rounded down: {hint}"
    monkeypatch.setitem(train.CPU_HINT, "minutes", 0)  # every run counts as long
    train.train(tiny(tmp_path, rule="none"))
    hints = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "--steps" in hints[0], f"one hint on the CPU, not one per progress line: {hints}"


@pytest.mark.train
def test_smoke_runs_take_smaller_batches_and_fewer_episodes_and_say_so():
    task = tasks.make_task("copy")
    smoke = train.resolve(RunConfig(train=TrainConfig(steps=20), task=TaskConfig("copy")), task).train
    assert (smoke.batch_size, smoke.eval_episodes, smoke.test_episodes) == (16, 100, 100), \
        "a run of under 100 steps is a smoke run: batch 16, 100 validation and test episodes"
    real = train.resolve(RunConfig(train=TrainConfig(steps=100), task=TaskConfig("copy")), task).train
    assert (real.batch_size, real.eval_episodes, real.test_episodes) == (64, 500, 1000), \
        "other runs take the task's batch and the protocol's episodes: 1,000 test episodes"
    given = train.resolve(RunConfig(train=TrainConfig(steps=20, batch_size=64, test_episodes=1000), task=TaskConfig("copy")), task)
    assert (given.train.batch_size, given.train.test_episodes) == (64, 1000), "options given explicitly win"
    assert train.smoke_note(smoke).endswith(
        "; options not given take smaller values (batch_size 16, eval_episodes 100, test_episodes 100)"), train.smoke_note(smoke)
    smaller = train.resolve(RunConfig(train=TrainConfig(steps=20, batch_size=8, test_episodes=1000), task=TaskConfig("copy")), task)
    for run in (given, smaller):  # a batch given above or below the smoke run's 16
        assert train.smoke_note(run.train).endswith("(eval_episodes 100)"), \
            f"a smoke run should name only the smaller values it runs with, not those given: {train.smoke_note(run.train)}"
    assert train.smoke_note(real) == "", "a run of 100 steps or more is not a smoke run"
    assert "1000" in train.protocol_note(100) and train.protocol_note(1000) == "", \
        "a test on fewer episodes than the protocol's must say so"


@pytest.mark.cli
def test_help_says_unset_where_the_comments_say_none(capsys):
    import fingerprint, pretrain, retest
    for main in (train.main, pretrain.main, retest.main, fingerprint.main):
        with pytest.raises(SystemExit) as done:
            main(["--help"])
        shown = capsys.readouterr().out
        assert done.value.code == 0 and "unset:" in shown and "None" not in shown, \
            f"{main.__module__}.py --help should say 'unset' for an option left out, never Python's None"


@pytest.mark.cli
def test_cli_task_defaults_and_choices_are_in_help_and_fill_the_model():
    help_text = " ".join(train.build_parser().format_help().split())
    for shown in ("2000 for copy, regression, cue_reward; 8000 for omniglot, cifar_fs",
                  "64 for copy, regression, cue_reward; 128 for omniglot; 256 for cifar_fs", "{vinyals,lake}",
                  "64 for copy, regression, cue_reward; 128 for omniglot, cifar_fs",
                  "0.01 for copy; 0.1 for regression, cue_reward, omniglot, cifar_fs", "3 for omniglot; 1 for cifar_fs; otherwise 1",
                  "10 for omniglot; otherwise unset", "False for omniglot; otherwise True", "0.001 for every task",
                  "--steps INT optimizer steps; unset: the task's default", "indices of blocks with plastic MLPs; unset: all",
                  "unset: 5% of steps",
                  "{factored,dense}", "{positive,negative,symmetric}", "{torch,gpt2}", "{linear,mlp}"):
        assert shown in help_text, f"--help should show {shown!r}"
    parse = lambda line: train.config_from_args(train.build_parser().parse_args(line.split()))
    for task in tasks.TASKS:
        model = parse(f"--task {task}").model
        expected = tuple(train.TASK_DEFAULTS[task][k] for k in ("d_model", "n_layer", "decay"))
        assert (model.d_model, model.n_layer, model.decay) == expected, f"{task}: the model should have the task's size and decay {expected}"
    assert parse("--task copy --d-model 96").model.d_model == 96, "an explicit --d-model wins over the task's default"
    for task in ("omniglot", "cifar_fs"):
        assert parse(f"--task {task}").task.query == train.TASK_DEFAULTS[task]["query"], f"{task}: --query left unset takes the task's default"
    assert parse("--task copy").task.query == TaskConfig().query, "a task without a default of its own keeps TaskConfig's"
    assert parse("--task omniglot --query 1").task.query == 1, "an explicit --query wins over the task's default"
    omniglot, cifar = parse("--task omniglot"), parse("--task cifar_fs")
    assert (omniglot.task.train_way, omniglot.model.positions) == (10, False), "Omniglot trains 10-way without positions"
    assert (cifar.task.train_way, cifar.model.positions) == (None, True), "a task without these defaults keeps the fields' own"
    assert parse("--task omniglot --way 20").task.train_way == 20, "a way above the task's training classes trains way-way"
    five_shot = parse("--task omniglot --shot 5").task
    assert (five_shot.train_shot, five_shot.train_way) == (1, 10), "Omniglot's 5-shot trains as its 1-shot default does"
    assert (cifar.task.train_shot, parse("--task cifar_fs --shot 5").task.train_way) == (None, None), \
        "CIFAR-FS trains at the test's shots and ways (None: shot's and way's)"
    assert parse("--task omniglot --shot 5 --train-way 5").task.train_way == 5, "an explicit --train-way wins at 5 shots"
    assert parse("--task omniglot --shot 5 --train-shot 5").task.train_way == 5, "training at 5 shots trains way-way"
    assert parse("--task omniglot --train-shot 5").task.train_way == 5, "training at 5 shots trains way-way"
    explicit = parse("--task omniglot --train-way 5 --positions")
    assert (explicit.task.train_way, explicit.model.positions) == (5, True), "explicit --train-way and --positions win"


@pytest.mark.cli
def test_default_config_from_python_runs_what_the_command_line_runs(monkeypatch):
    """train.train(train.default_config(task, *options)) is what `python train.py --task <task> <options>` hands to
    train(), with the task's model sizes, which RunConfig(task=TaskConfig(task)) does not take (it keeps
    Config's own: d_model 128 for copy, whose command line gives 64)."""
    options = ["--rule", "hebbian", "--steps", "200", "--seed", "3"]
    handed = []
    monkeypatch.setattr(train, "train", handed.append)
    for task in ("copy", "omniglot"):  # a synthetic task and a few-shot one, each with model sizes of its own
        assert train.main(["--task", task, *options]) == 0
        assert train.default_config(task, *options) == handed[-1], f"{task}: default_config should be the command line's"
    copy = train.default_config("copy").model
    assert (copy.d_model, copy.n_layer, copy.decay) == (64, 2, 0.01) != (Config().d_model, Config().n_layer, Config().decay), \
        "copy's own model sizes, not Config's field defaults"


@pytest.mark.cli
@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "-1"), ("--lr", "0"), ("--eta", "inf"),
                                           ("--decay", "-0.1"), ("--n-head", "0"), ("--dropout", "1.5"), ("--steps", "-5"),
                                           ("--encoder-lr-scale", "2"), ("--test-episodes", "1"), ("--eval-episodes", "1")])
def test_cli_non_finite_or_negative_numbers_exit_2_with_one_sentence(tmp_path, capsys, option, value):
    code = train.main(tiny_argv(tmp_path, "--steps", "2", option, value))
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith(f"train.py: {option} must be") and "\n" not in error, \
        f"{option} {value}: expected exit 2 and one sentence naming {option}, got {code}: {error!r}"
    assert not any(tmp_path.iterdir()), "nothing may be written for a mistaken command line"


@pytest.mark.train
def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    train.train(tiny(tmp_path, rule="none", steps=2))
    run_dir = tmp_path / "copy-none"
    before = {name: (run_dir / name).read_bytes() for name in RUN_FILES}
    with pytest.raises(train.UsageError, match="holds a finished run already; continue it with --resume, replace it with --overwrite"):
        train.train(tiny(tmp_path, rule="none", steps=2, seed=1))
    assert all((run_dir / name).read_bytes() == data for name, data in before.items()), "a refused run must change no file"
    with pytest.raises(train.UsageError, match="choose one"):
        train.train(tiny(tmp_path, rule="none", steps=2, resume=True, overwrite=True))
    (run_dir / "retest-5way-5shot-3query.json").write_text("{}")  # retest.py's test of the model replaced
    (run_dir / "notes.txt").write_text("mine")
    train.train(tiny(tmp_path, rule="none", steps=2, seed=1, overwrite=True))
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 1, "--overwrite replaces the run"
    assert not (run_dir / "retest-5way-5shot-3query.json").exists(), "--overwrite removes the retests of the model it replaces"
    assert (run_dir / "notes.txt").read_text() == "mine", "--overwrite leaves files that are not the run's alone"


@pytest.mark.train
def test_refused_options_leave_the_run_folder_as_it_was(tmp_path, capsys):
    assert train.main(tiny_argv(tmp_path, "--steps", "2")) == 0
    run_dir = tmp_path / "copy-none"
    before = {name: (run_dir / name).read_bytes() for name in RUN_FILES}
    refused = {"a resume with another model": tiny_argv(tmp_path, "--steps", "4", "--resume", "--d-model", "32"),
               "--lr nan": tiny_argv(tmp_path, "--steps", "4", "--resume", "--lr", "nan")}
    for what, argv in refused.items():
        assert train.main(argv) == 2, f"{what} should be refused with exit 2"
        changed = [name for name, data in before.items() if (run_dir / name).read_bytes() != data]
        assert not changed, f"{what} was refused, yet it changed {changed}"
    (run_dir / "checkpoint.pt").write_bytes(b"damaged")
    assert train.main(tiny_argv(tmp_path, "--steps", "4", "--resume")) == 2, "a damaged checkpoint should be refused"
    assert (run_dir / "config.json").read_bytes() == before["config.json"], "a refused resume must not rewrite config.json"
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("train.py: ") for line in errors), f"one sentence each: {errors}"


@pytest.mark.train
def test_a_step_that_cannot_fit_in_memory_is_refused_before_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(train.memory, "free_bytes", lambda device: 1000)
    with pytest.raises(train.UsageError, match=r"one training step needs about .* GiB free; lower --batch-size"):
        train.train(tiny(tmp_path))
    assert not (tmp_path / "copy-hebbian").exists(), "a refused run must not create its folder"

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.00 GiB")
    monkeypatch.setattr(train.memory, "free_bytes", lambda device: None)  # no estimate: the first step fails
    monkeypatch.setattr(train, "make_train_step", lambda *args: out_of_memory)
    with pytest.raises(train.UsageError, match="ran out of memory at step 1; lower --batch-size"):
        train.train(tiny(tmp_path))


@pytest.mark.train
def test_the_refusal_says_what_a_step_needs_what_is_free_and_what_batch_would_fit(tmp_path, monkeypatch):
    """A step of 2 GiB for 8 sequences against 1 GiB free: refused, in GiB, with 80% of the 4 sequences that fit
    (3); a step that needs exactly what is free runs."""
    cfg, task = tiny(tmp_path, batch_size=8), types.SimpleNamespace(seq_len=10)
    monkeypatch.setattr(train.memory, "step_bytes", lambda *args: 2 * 2**30)
    monkeypatch.setattr(train.memory, "free_bytes", lambda device: 2**30)
    with pytest.raises(train.UsageError) as refused:
        train.check_memory(cfg, task, torch.device("cpu"))
    assert str(refused.value) == ("one training step needs about 2.0 GiB (8 sequences of 10 tokens), but the cpu has 1.0 GiB "
                                  f"free; {train.memory.REMEDY} (--batch-size 3 would fit with a margin)."), str(refused.value)
    monkeypatch.setattr(train.memory, "free_bytes", lambda device: 2 * 2**30)
    train.check_memory(cfg, task, torch.device("cpu"))  # fits exactly: no error
    monkeypatch.setattr(train.memory, "free_bytes", lambda device: 2 * 2**30 - 1)
    with pytest.raises(train.UsageError, match="one training step needs about"):
        train.check_memory(cfg, task, torch.device("cpu"))


@pytest.mark.train
def test_the_memory_estimate_scales_one_sequence_by_the_batch_size():
    """memory.py assumes what autograd saves grows in proportion to the batch: checked against a real batch."""
    task = tasks.make_task("copy", seq_len=4, delay=4)
    cfg = Config(d_in=task.d_in, d_out=task.d_out, max_len=task.seq_len, n_layer=2, n_head=2, d_model=32, rule="gradient")
    model = PlasticGPT(cfg)
    one, batch = (task.sample(n, "train", "cpu", torch.Generator().manual_seed(0)) for n in (1, 16))
    per_sequence, measured = train.memory.saved_bytes(model, one), train.memory.saved_bytes(model, batch)
    assert measured <= 16 * per_sequence <= 1.5 * measured, \
        f"16 x one sequence ({16 * per_sequence:,} bytes) should bound a batch of 16 ({measured:,}) from above, closely"


@pytest.mark.train
def test_sigterm_saves_the_current_step_and_resume_reaches_the_uninterrupted_parameters(tmp_path, monkeypatch, capsys):
    argv = tiny_argv(tmp_path / "stopped", "--steps", "6", "--eval-interval", "100", "--log-interval", "100")
    assert train.main(tiny_argv(tmp_path / "straight", "--steps", "6", "--eval-interval", "100")) == 0
    learning_rate = train.learning_rate

    def terminated_during_step_4(step, tc, sent=[]):  # as `kill <pid>` would, through the handler train() installed
        if step == 4 and not sent:
            sent.append(signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None))
        return learning_rate(step, tc)
    monkeypatch.setattr(train, "learning_rate", terminated_during_step_4)
    assert train.main(argv) == 143, "SIGTERM should exit with 128 + 15"
    error = capsys.readouterr().err.strip()
    assert "stopped at step 4 of 6" in error and error.endswith(" --resume") and "\n" not in error, \
        f"one line saying where it stopped and how to resume: {error!r}"
    assert torch.load(tmp_path / "stopped/copy-none/checkpoint.pt", weights_only=True)["step"] == 4, \
        "the checkpoint should hold the step the signal came in"
    monkeypatch.setattr(train, "learning_rate", learning_rate)
    assert train.main(argv + ["--resume"]) == 0, "the resume should finish the run"
    a, b = (torch.load(tmp_path / f"{run}/copy-none/checkpoint.pt", weights_only=True) for run in ("straight", "stopped"))
    different = [name for name in a["model"] if not torch.equal(a["model"][name], b["model"][name])]
    assert not different, f"4 steps + SIGTERM + resume + 2 steps differ from 6 straight steps in {different}"


@pytest.mark.train
def test_checkpoints_also_follow_the_clock(tmp_path, monkeypatch):
    kill_at_step(monkeypatch, 4)
    with pytest.raises(Interrupted):  # a kill -9 with no chance to save: only the clock's checkpoints remain
        train.train(tiny(tmp_path, rule="none", steps=6, eval_interval=100, log_interval=1, checkpoint_minutes=1e-9))
    checkpoint = torch.load(tmp_path / "copy-none/checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3, f"every log line was due a checkpoint, so step 3's should be there, not {checkpoint['step']}"


@pytest.mark.cli
def test_ctrl_c_in_a_running_train_py_saves_and_says_how_to_resume(tmp_path):
    argv = tiny_argv(tmp_path, "--steps", "100000", "--log-interval", "100000", "--eval-interval", "100000")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    as_in_a_terminal = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # not ignored, even if pytest runs in the background
    with subprocess.Popen([sys.executable, "train.py", *argv], cwd=HERE, env=env, text=True, preexec_fn=as_in_a_terminal,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as running:
        for line in running.stdout:  # the first progress line comes after the first step
            if line.startswith("step 1/"):
                break
        running.send_signal(signal.SIGINT)
        _, error = running.communicate(timeout=60)
    assert running.returncode == 130, f"Ctrl-C should exit with 130, got {running.returncode}: {error}"
    last = error.strip().splitlines()[-1] if error.strip() else ""
    assert len(error.strip().splitlines()) == 1 and "stopped at step" in last and last.endswith("--resume"), \
        f"one line saying where it stopped and the command that resumes it: {error!r}"
    step = torch.load(tmp_path / "copy-none/checkpoint.pt", weights_only=True)["step"]
    assert train.main(argv[:-4] + ["--steps", str(step + 2), "--eval-interval", "100000", "--resume"]) == 0, \
        "--resume should continue from the saved step and finish"
    logged = [r["step"] for r in train.read_log(tmp_path / "copy-none") if r["split"] == "train"]
    assert logged[-1] == step + 2 and (tmp_path / "copy-none/results.json").is_file(), f"resumed to the end: {logged}"


@pytest.mark.train
def test_report_reads_train_py_default_layout_and_has_help(tmp_path, capsys):
    import report
    for rule in ("none", "hebbian"):
        folder = tmp_path / "runs" / f"copy-{rule}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(dict(
            task="copy", rule=rule, metric="mse", test_mean=0.5, test_ci95=0.01, params=1000, train_time_s=60.0,
            knockout_mean=None if rule == "none" else 0.6, knockout_ci95=0.01)))
    assert report.main([str(tmp_path / "runs")]) == 0, "report.py should read runs/<task>-<rule>/"
    table = capsys.readouterr().out
    assert "### runs" in table and "| - | copy | 0.5 ± 0.01;" in table and "knock-out 0.6" in table, \
        f"runs/<task>-<rule>/ should be experiment 'runs', setting '-', one row per task:\n{table}"
    assert report.main([str(tmp_path)]) == 0 and "### runs" in capsys.readouterr().out, "any depth above the runs works"
    folder = tmp_path / "runs" / "omniglot-none"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(dict(
        task="omniglot", rule="none", metric="accuracy", test_mean=0.9, test_ci95=0.01, params=1000, train_time_s=60.0)))
    assert report.main([str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    under = {part.split(":")[0]: part for part in table.split("\ntest ")[1:]}  # each table by its unit
    assert sorted(under) == ["MSE", "accuracy %"] and "| - | copy |" in under["MSE"] and "| - | omniglot | 90.00" \
        in under["accuracy %"] and "omniglot" not in under["MSE"] and "copy" not in under["accuracy %"], \
        f"copy's MSE and Omniglot's accuracy should be two tables, each under its own unit:\n{table}"
    no_size = dict(task="omniglot", rule="none", metric="accuracy", test_mean=0.9, test_ci95=0.01)
    for text, message in (("{cut sho", "is not readable JSON"), ("{}", "holds no task, rule, metric, test_mean, test_ci95"),
                          ("[1, 2]", "holds no task, rule, metric, test_mean, test_ci95"),
                          (json.dumps(no_size), "holds no params, train_time_s")):
        (folder / "results.json").write_text(text)
        assert report.main([str(tmp_path / "runs")]) == 2, f"{text}: a damaged results.json is refused"
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, f"{text}: one sentence naming the file, got {err!r}"
    (tmp_path / "nothing").mkdir()
    assert report.main([str(tmp_path / "nothing")]) == 2, "a folder without a finished run is refused"
    err = capsys.readouterr().err
    assert "no finished run" in err and err.count("\n") == 1, f"one sentence, got {err!r}"
    for argv, message in (([str(tmp_path / "missing")], "missing is not a folder"),
                          ([str(tmp_path / "runs" / "copy-none" / "results.json")], "results.json is not a folder"),
                          ([str(tmp_path / "runs"), "--paired", "a", "b"], "drop the folder, or run report.py on it alone")):
        assert report.main(argv) == 2, f"{argv}: refused"
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, f"{argv}: one sentence with {message!r}, got {err!r}"
    with pytest.raises(SystemExit) as done:
        report.main(["--help"])
    assert done.value.code == 0 and "folder" in capsys.readouterr().out, "--help prints the usage and exits 0"


@pytest.mark.train
@pytest.mark.plots
def test_the_learning_curve_labels_a_loss_within_one_decade_as_plain_numbers(tmp_path, monkeypatch):
    """A training loss from 2.41 to 2.71 on the log axis: its ticks read 2.45, 2.5, ..., not 2.45x10^0."""
    with open(tmp_path / "log.jsonl", "w") as log:
        for step, loss in ((1, 2.41), (2, 2.55), (3, 2.71)):
            log.write(json.dumps(dict(split="train", step=step, loss=loss, metric=0.1)) + "\n")
        log.write(json.dumps(dict(split="val", step=3, metric=0.2, ci95=0.01)) + "\n")
    labels = []

    def saved(fig, path):
        fig.canvas.draw()
        labels.extend(t.get_text() for t in fig.axes[0].yaxis.get_ticklabels(minor=True) if t.get_text())
    monkeypatch.setattr(train, "save_plot", saved)
    train.plot_learning_curve(str(tmp_path), "accuracy", "omniglot, rule none")
    assert "2.5" in labels and not [t for t in labels if "times" in t or "^" in t], \
        f"the loss axis should read plain numbers, got {labels}"


@pytest.mark.train
def test_plots_are_saved_in_256_colours_that_match_matplotlibs_own_png(tmp_path):
    """report.save_plot (every plot train.py and report.py write): the figure at 100 dpi, as matplotlib's
    own PNG of it, in a palette of 256 colours, off by under a level of 255 on average (0.27 here), in fewer bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import report
    fig, ax = plt.subplots(figsize=(4, 3))
    for k in range(10):                                              # antialiased curves: many more than 256 colours
        ax.plot(np.sin(np.linspace(0, 6, 200) + k), marker=".", label=f"curve {k}")
    ax.axvspan(50, 80, color="tab:orange", alpha=0.15)
    ax.legend(fontsize=6)
    fig.savefig(tmp_path / "matplotlib.png", dpi=100)
    report.save_plot(fig, tmp_path / "plot.png")
    plt.close(fig)
    reference, saved = Image.open(tmp_path / "matplotlib.png").convert("RGB"), Image.open(tmp_path / "plot.png")
    assert len(reference.getcolors(1 << 24)) > 256, "the reference needs more than 256 colours for this test to mean anything"
    assert saved.mode == "P" and saved.size == reference.size, f"a palette PNG of {reference.size}, got {saved.mode} {saved.size}"
    error = np.abs(np.asarray(reference).astype(int) - np.asarray(saved.convert("RGB")).astype(int))
    assert error.mean() < 1.0, f"the plot should look as matplotlib draws it: {error.mean():.2f} levels off on average"
    ratio = (tmp_path / "plot.png").stat().st_size / (tmp_path / "matplotlib.png").stat().st_size
    assert ratio < 0.7, f"the palette should save bytes, got {ratio:.0%} of matplotlib's PNG"


@pytest.mark.train
@pytest.mark.plots
def test_learning_curve_of_a_one_step_run_is_not_blank(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps(dict(split="train", step=1, loss=0.5, metric=0.5)) + "\n")
    train.plot_learning_curve(str(tmp_path), "mse", "copy, rule hebbian")
    pixels = np.asarray(Image.open(tmp_path / "learning_curve.png").convert("RGB")).astype(int)
    line_colour = np.array([31, 119, 180])  # matplotlib's first colour, C0
    drawn = (np.abs(pixels - line_colour).sum(-1) < 60).sum()
    assert drawn > 10, f"a single logged step should draw a visible marker, found {drawn} pixels of its colour"
