"""
Train a plastic GPT on one task, validate it as it learns, and test the best model.

    python train.py --rule hebbian --task omniglot        # one rule, the task's default settings
    python train.py --rule all --task copy --steps 20     # none, hebbian, gradient: one table (a smoke run)
    python train.py --help                                # every option, grouped by dataclass

Every run writes a folder <out-dir>/<task>-<rule>/ with config.json, checkpoint.pt (the latest,
for --resume), best.pt (the best validation score, or with --train-on-val the last; the final test
uses it), log.jsonl (one JSON line per progress line and per validation), results.json,
learning_curve.png and, for the plastic rules, modulation.csv / modulation.png: the mean modulated
rate eta_t per token position over the test episodes (the study's analysis of the learned modulatory
signal), beside the step taken after the norm bound, the update's norm before it, the fast weight's
norm and the share of episodes scored there. --rule all also writes <out-dir>/<task>-comparison.txt.
An existing run is never replaced silently: --resume continues it, --overwrite replaces it.

The test reports the mean and 95% confidence interval over --test-episodes episodes, and for the
plastic rules the same test with plasticity knocked out (eta = 0): how much the model relies on its
fast weights. Ctrl-C (or SIGTERM) saves a checkpoint at the current step and says how to resume.
From Python: `train(RunConfig(...)) -> dict`, `compare(RunConfig(...)) -> dict`.
"""

import argparse
import bisect
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
import types
import typing
from dataclasses import dataclass, field

import torch

import memory
from plastic import COEF_INITS, FAST_WEIGHT_OPTIONS, INITS, RULES, Config, Conv4, PlasticGPT
from report import RETEST_FILE, save_plot, with_options_added
from tasks import OMNIGLOT_SPLITS, TASKS, TaskConfig, make_task_from_config, option_flag

# Defaults per task for the options left at None: TrainConfig's steps, batch_size and lr, and on the
# command line also the model's d_model, n_layer, decay and positions and the few-shot tasks' query and
# train_way and train_shot (from Python, Config's and TaskConfig's own values are used as given). An
# option given explicitly wins; a --way above the task's train_way trains way-way, and so does a training
# shot (--train-shot, or --shot where the task has no default) above one.
#
# Why each value (% with 95% intervals; README.md has every run, in "Each query alone (the default)" unless named):
# - Omniglot, 8,000 steps of 128 episodes: Hebbian 98.23 +- 0.38%, static 98.33 +- 0.49% over three seeds,
#   the Hebbian command 6.8 min on an H200; 11,000 steps gave 98.43 against 98.41 (seed 0).
# - train_way=10 at batch 128 (five classes' images per step at 256): +0.21 +- 0.28 over three seeds against
#   five (unpaired), not established (on a CPU five were 0.30 above), at 1.26x the step time; kept as never
#   below five on the GPU. positions=False: a 5-way test query would sit where 10-way training had only
#   support; with five classes they made no difference (98.09 against 98.07 without, Hebbian seed 0).
# - query=3: +0.71 +- 1.07 over three CPU seeds (static, paired; "Queries that see each other"), ahead on each,
#   not established; +0.41 (Hebbian), +0.37 (static) on GPU seed 0, within each run's interval; 1.6x the step time.
# - train_shot=1 (5-shot trains as 1-shot does, choosing its checkpoint at 5 shots): static 99.50 +- 0.19%
#   over three seeds, +0.18 +- 0.15 above five training classes of 5 shots (by seed, unpaired); Hebbian +0.27
#   (seed 0), in 6.8 min rather than 10.8. Twenty 1-shot classes: +0.05 +- 0.24 (static, paired by seed),
#   not established, and 15.2 min for the Hebbian rule.
# - 20-way trains 20-way (train_way rises to --way at one shot): Hebbian 94.12 +- 0.28% (seed 0 94.00 +- 0.25),
#   static 94.52 +- 0.47% over three seeds; 40 training classes +0.09 +- 0.56 (static, paired by seed), not
#   established.
# - No pre-trained encoder (pretrain.py, --init-encoder; "A pre-trained encoder"): on Omniglot +0.20 +- 0.19
#   (static) and +0.18 +- 0.43 (Hebbian) over three seeds, unpaired, +0.13 +- 0.09 at 5 shots (Hebbian, paired
#   by seed), for a second command; on CIFAR-FS -0.94 +- 1.41 (static, seed 1, paired).
# - CIFAR-FS, 8,000 steps of 256 episodes, one query per class, positions, mirrored and shifted training
#   images: Hebbian 62.82 +- 1.79%, static 62.17 +- 2.88% over three seeds. With queries seeing each other
#   (seed 0; "Queries that saw each other (before commit 712ea9f)") 8,000 x 256 gained 6.4 (Hebbian) and 4.5
#   points (static) over 4,000 x 64, augmentation 4.5 (static). Static, seed 1, paired: three queries +0.18
#   +- 1.40 at nearly twice the step time, ten training classes -1.56 +- 1.38; dropout, R2D2's wider Conv4,
#   colour jitter and weight decay 0.1 -0.74 to -1.30, each interval including zero. Its training shot is
#   the test's: one at 5 shots -2.66 +- 1.14 (seed 0, paired).
# - lr 1e-3 everywhere ("What makes the fast weights work", item 6): 3e-4 took CIFAR-FS at attention window 1
#   from 1 to 3 of 3 Hebbian seeds, but scored slightly lower with full attention on Omniglot (Hebbian 97.38
#   against 97.86, one seed, within the intervals) and learned copy far slower (0.181 against 0.0201 after
#   2,000 steps). Copy's decay 0.01: test MSE 0.103 after 2,000 steps against 0.161 with 0.1 (Hebbian,
#   window 1, the same section); the other tasks keep 0.1, where it was measured (Omniglot).
# - The synthetic tasks' smaller model (measured only here), on a CPU, rule none, batch 64, 512 test sequences:
#   at 2,000 steps d_model 64 with 2 blocks reached test MSE 0.038 on cue_reward and 0.19 on regression, the
#   few-shot size (d_model 128, 4 blocks: 8x the parameters, 4.5x the time per step) 0.043 and 0.35; after 300
#   steps the larger was still ahead (copy 9e-5 against 3e-4), d_model 32 far behind (copy 0.013; Hebbian copy
#   0.21 against 0.0003 with d_model 64).
TASK_DEFAULTS = {
    "copy": dict(steps=2000, batch_size=64, lr=1e-3, d_model=64, n_layer=2, decay=0.01),
    "regression": dict(steps=2000, batch_size=64, lr=1e-3, d_model=64, n_layer=2, decay=0.1),
    "cue_reward": dict(steps=2000, batch_size=64, lr=1e-3, d_model=64, n_layer=2, decay=0.1),
    "omniglot": dict(steps=8000, batch_size=128, lr=1e-3, d_model=128, n_layer=4, decay=0.1, query=3, train_way=10,
                     train_shot=1, positions=False),
    "cifar_fs": dict(steps=8000, batch_size=256, lr=1e-3, d_model=128, n_layer=4, decay=0.1, query=1),
}
PER_TASK = {key for defaults in TASK_DEFAULTS.values() for key in defaults}  # the options whose default depends on the task
PROTOCOL_EPISODES = dict(eval_episodes=500, test_episodes=1000)  # of every run; reported results: 1,000 test episodes
# A run of fewer steps is a smoke run: it checks that everything works, its numbers are no result, and
# where not given otherwise it takes smaller batches and fewer episodes, so that it finishes in seconds
# to a minute on a CPU (measured in the README).
SMOKE_RUN = dict(steps=100, batch_size=16, eval_episodes=100, test_episodes=100)


@dataclass
class TrainConfig:
    rule: str = "hebbian"  # fast-weight rule: none | hebbian | gradient, or all three (one table)
    steps: int | None = None  # optimizer steps; None: the task's default
    batch_size: int | None = None  # sequences (episodes) per step; None: the task's default, or 16 in a smoke run (under 100 steps)
    lr: float | None = None  # peak learning rate of AdamW; None: the task's default
    warmup: int | None = None  # steps of linear warm-up before the cosine decay; None: 5% of steps
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient's global norm to this; 0: no clipping
    match_params: bool = False  # rule none: widen d_model to the Hebbian model's parameter count (always on with --rule all)
    seed: int = 0  # seeds the model's initialisation and every sampled sequence
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    threads: int | None = None  # CPU threads of PyTorch; None: $OMP_NUM_THREADS where it is a positive number, else half the cores, at least 1 (see set_cpu_threads)
    log_interval: int = 100  # steps between progress lines; one also comes after the first step, and at least every log_seconds
    log_seconds: float = 10.0  # longest time between progress lines
    eval_interval: int = 1000  # steps between validations (and checkpoints)
    checkpoint_minutes: float = 10.0  # also save checkpoint.pt this often, so that a killed run loses minutes, not hours
    eval_episodes: int | None = None  # validation episodes (the same ones every time); None: 500, or 100 in a smoke run (under 100 steps)
    test_episodes: int | None = None  # final test episodes (fresh ones); None: 1000, the protocol for reported results, or 100 in a smoke run (under 100 steps)
    out_dir: str = "runs"  # each run writes to <out_dir>/<task>-<rule>/
    resume: bool = False  # continue the run in its folder from checkpoint.pt
    overwrite: bool = False  # replace the run in its folder (without it or --resume, an existing run is refused)
    cuda_graph: bool = True  # on CUDA: record one training step as a CUDA graph and replay it (far fewer launches); ignored on the CPU
    bench: bool = False  # time training steps of each rule (none, hebbian, gradient) and count their operations instead of training; print a table (bench.py)
    compile: bool = False  # torch.compile the model (rules none and hebbian; the gradient rule's second order does not compile); the token loop compiles slowly (minutes)
    amp: bool = False  # bfloat16 autocast of the encoder and parallel blocks, the token loop in float32 (CUDA only; ignored on the CPU); 10-23% slower per step at the Omniglot size (README, Speed)
    init_encoder: str | None = None  # image tasks: a run folder (its best.pt) or checkpoint whose Conv4 encoder starts this model; the rest starts fresh
    encoder_lr_scale: float = 1.0  # image tasks: the encoder's learning rate as a fraction of the rest's, at every step (0.1 fine-tunes an --init-encoder gently; 0 keeps its weights, while its batch-norm statistics still follow the training images)
    deterministic: bool = False  # deterministic kernels (deterministic_algorithms): a run repeats bit for bit on one GPU, where two runs of one command differed by 0.39 test points; off by default, as they are 10-19% slower on an H200


@dataclass
class RunConfig:
    """Everything a run needs. model.rule, d_in, d_out, max_len and image_shape are set by train()
    from train.rule and the task."""
    train: TrainConfig = field(default_factory=TrainConfig)
    model: Config = field(default_factory=Config)
    task: TaskConfig = field(default_factory=TaskConfig)


class UsageError(Exception):
    """A mistake in the options or the files a user gave: main() prints it as one sentence, exit 2."""


class Diverged(Exception):
    """The loss became NaN or inf: main() prints the step and a remedy, exit 1."""


class Stopped(Exception):
    """SIGINT (Ctrl-C) or SIGTERM ended the run, after saving what there was to save: main() prints the
    message and how to resume, exit 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int, message: str, resumable: bool):
        super().__init__(message)
        self.signum, self.resumable = signum, resumable


# ----------------------------------------------------------------------------------------------
# Setting up a run

MAY_BE_ZERO = {"warmup", "seed", "min_lr_ratio", "weight_decay", "grad_clip", "delay", "noise", "cue_noise",
               "dropout", "eta", "decay", "n_extra", "jitter", "encoder_lr_scale"}  # every other number an option holds must be above 0
AT_MOST_ONE = {"min_lr_ratio", "dropout", "jitter", "encoder_lr_scale"}
AT_LEAST_TWO = {"eval_episodes", "test_episodes"}  # a 95% interval needs two


def check_numbers(options: dict) -> None:
    """Every number in `options` (field name -> value, one dataclass) is finite and not negative, most
    are above 0; a NaN or a negative learning rate would otherwise surface as a traceback, or not at all."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        allowed = "a number of 0 or more" if name in MAY_BE_ZERO else "a number above 0"
        allowed += " and at most 1" if name in AT_MOST_ONE else ""
        allowed = "2 or more (an interval needs two)" if name in AT_LEAST_TWO else allowed
        if not (math.isfinite(value) and (value > 0 or value == 0 and name in MAY_BE_ZERO)
                and (value <= 1 or name not in AT_MOST_ONE) and (value >= 2 or name not in AT_LEAST_TWO)):
            raise UsageError(f"--{name.replace('_', '-')} must be {allowed}, not {value}.")


def check_warmup(warmup: int, steps: int) -> None:
    """A warm-up as long as the run would never reach the peak rate, nor decay from it."""
    if warmup >= steps:
        raise UsageError(f"--warmup {warmup} is not below --steps {steps}: the learning rate would never reach its "
                         f"peak nor decay; lower --warmup.")


def is_smoke_run(tc: TrainConfig) -> bool:
    return tc.steps < SMOKE_RUN["steps"]


def smoke_note(tc: TrainConfig, sizes: dict = SMOKE_RUN) -> str:
    """What a smoke run says about itself: that it is one, and the smaller values of `sizes` (those a smoke run
    takes) it runs with (an option given another value is the user's, and not named)."""
    if not is_smoke_run(tc):
        return ""
    smaller = [f"{k} {v}" for k, v in sizes.items() if k != "steps" and getattr(tc, k) == v]
    return (f"a smoke run (under {SMOKE_RUN['steps']} steps): it shows that everything works, not a result"
            + (f"; options not given take smaller values ({', '.join(smaller)})" if smaller else ""))


def resolve(cfg: RunConfig, task) -> RunConfig:
    """Fill the options left at None from TASK_DEFAULTS and PROTOCOL_EPISODES (or SMOKE_RUN) and the
    model's sizes from the task; check every number."""
    tc = cfg.train
    defaults = {k: v for k, v in TASK_DEFAULTS[task.name].items() if hasattr(tc, k)} | PROTOCOL_EPISODES
    tc = dataclasses.replace(tc, steps=defaults["steps"] if tc.steps is None else tc.steps)
    defaults |= SMOKE_RUN if is_smoke_run(tc) else {}
    tc = dataclasses.replace(tc, **{k: v for k, v in defaults.items() if getattr(tc, k) is None})
    for section in (tc, cfg.model, cfg.task):
        check_numbers(dataclasses.asdict(section))
    tc = dataclasses.replace(tc, warmup=tc.steps // 20 if tc.warmup is None else tc.warmup)
    check_warmup(tc.warmup, tc.steps)
    if tc.encoder_lr_scale != 1 and task.image_shape is None:
        raise UsageError(f"--encoder-lr-scale sets the image encoder's learning rate, and {task.name} has no images; drop it.")
    try:
        model = dataclasses.replace(cfg.model, rule=tc.rule, d_in=task.d_in, d_out=task.d_out,
                                    max_len=task.seq_len, image_shape=task.image_shape)
        model = dataclasses.replace(model, eta=model.base_rate())  # the rule's own where not given: config.json says which
        if tc.rule == "none" and tc.match_params:
            model = dataclasses.replace(model, d_model=matched_static_width(model))
    except ValueError as err:
        raise UsageError(str(err)) from err
    return RunConfig(train=tc, model=model, task=cfg.task)


def load_task(task_cfg: TaskConfig):
    """The task with its dataset loaded; missing or damaged data is a UsageError (one sentence)."""
    try:
        return make_task_from_config(task_cfg)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err


def count_params(model_cfg: Config) -> int:
    with torch.device("meta"):  # builds the model without allocating or initialising memory
        return PlasticGPT(model_cfg).num_params()


def matched_static_width(model_cfg: Config) -> int:
    """d_model (a multiple of n_head, up to 4x the given one) whose static model has the parameter
    count closest to the Hebbian model's with the same settings: the fair static baseline, widened as
    Duan et al. widen theirs. The plastic coefficients A make the plastic MLPs twice as large."""
    target = count_params(dataclasses.replace(model_cfg, rule="hebbian"))
    widths = range(model_cfg.n_head, 4 * model_cfg.d_model + 1, model_cfg.n_head)

    def static(width):
        return count_params(dataclasses.replace(model_cfg, rule="none", d_model=width))
    above = bisect.bisect_left(widths, target, key=static)  # the count grows with the width: the first at or above
    return min(widths[max(above - 1, 0):above + 1], key=lambda width: abs(static(width) - target))


def model_of(saved: dict) -> Config:
    """A Config from config.json's model section (JSON's lists back to tuples)."""
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def sets_width(model_cfg: Config, name: str, other) -> bool:
    """Whether fast-weight option name at value other, rather than model_cfg's, gives the Hebbian model another
    parameter count: only such an option sets the width that --match-params matches."""
    plastic = dataclasses.replace(model_cfg, rule="hebbian")
    try:
        return count_params(dataclasses.replace(plastic, **{name: tuple(other) if isinstance(other, list) else other})) \
            != count_params(plastic)
    except ValueError:  # a value this model cannot take at all: it is part of what the run was
        return True


def refuse_idle_fast_weights(values: dict, model_cfg: Config) -> None:
    """The static model (--rule none) has no fast weights: a fast-weight option given would be recorded in
    config.json as if it had acted. With --match-params those that set the matched plastic model's parameter
    count do act (sets_width); the rest are refused all the same."""
    own = {f.name: f.default for f in dataclasses.fields(Config)}
    default = {k: TASK_DEFAULTS[values["task.name"]].get(k, own[k]) for k in FAST_WEIGHT_OPTIONS}
    parser_default = {k: None if k in PER_TASK else own[k] for k in FAST_WEIGHT_OPTIONS}  # None: not given
    given = [k for k in FAST_WEIGHT_OPTIONS if values[f"model.{k}"] != parser_default[k]]
    matched = values["train.match_params"]
    idle = [k for k in given if not (matched and sets_width(model_cfg, k, default[k]))]
    if idle:
        k, value = idle[0], values[f"model.{idle[0]}"]
        why = " (with --match-params it would not change the parameter count the width matches)" if matched else ""
        raise UsageError(f"{option_flag(k, value if isinstance(value, bool) else None)} sets the fast weights, and the "
                         f"static model (--rule none) has none{why}; drop it, or train a plastic rule (--rule hebbian, "
                         f"gradient or all).")


def pick_device(name: str) -> torch.device:
    """auto, cpu or cuda[:N]; other kinds (mps, meta) and numbered CPUs are refused: checkpoints saved from
    "cpu:0" would not load again."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from err
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for but CUDA is not available; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise UsageError(f"device {name!r} was asked for but this machine has {count} CUDA device"
                         f"{'s' if count > 1 else ''} ({names}); use one of them, or auto.")
    return device


def set_cpu_threads(tc: TrainConfig, device: torch.device) -> None:
    """On a CPU, PyTorch's default of one thread per core makes every small operation wait for all of
    them. Measured on 2 cores (copy and cue_reward, d_model 64): 2 threads were up to 1.9x faster than 1
    on an idle machine, but 4-40x slower while another program kept one core busy. Half the cores
    leaves that headroom. --threads decides where given; else $OMP_NUM_THREADS where it is a positive
    number (the usual way to limit a program's threads, as the tests do, each worker on one): PyTorch
    read it at import, and the count it set stays. A value OpenMP cannot read ("abc", "0") counts as unset."""
    if device.type != "cpu":
        return
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    elif not (omp.isdigit() and int(omp) > 0):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Within it, when enabled, every operation takes a deterministic implementation, and one that has none
    raises an error rather than silently breaking the promise: a run repeats bit for bit on the same device
    and software. Without it two runs of one command on a GPU differed by 0.39 test points (README, "Few-shot
    on the literature's splits"), as some GPU kernels (PyTorch's reproducibility notes name cuDNN's
    convolution backward passes and cuBLAS) sum in an order that changes from run to run; with it two runs
    on an H200 scored every test episode the same, with every rule, 10-19% slower. cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG once, at its first call, so train(), pretrain() and bench() enter this before
    their first CUDA work (in a process that has already multiplied on the GPU without it, set the variable
    before starting Python).
    The previous settings come back on leaving: tests train many times in one process."""
    if not enabled:
        yield
        return
    previous = (os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark)
    try:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a fixed cuBLAS workspace, as its deterministic matmuls need
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        yield
    finally:
        workspace, algorithms, warn_only, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def check_memory(cfg: RunConfig, task, device: torch.device) -> None:
    """Refuse a run whose training step would not fit in memory before allocating it (memory.py)."""
    free = memory.free_bytes(device)
    need = memory.step_bytes(cfg.model, task, cfg.train.batch_size, device) if free is not None else 0
    if free is not None and need > free:
        fits = int(0.8 * cfg.train.batch_size * free / need)  # a margin for the estimate; parameters are a small share
        raise UsageError(f"one training step needs about {need / 2**30:.1f} GiB ({cfg.train.batch_size} sequences of "
                         f"{task.seq_len} tokens), but the {device.type} has {free / 2**30:.1f} GiB free; {memory.REMEDY}"
                         + (f" (--batch-size {fits} would fit with a margin)." if fits else "."))


def run_folder(tc: TrainConfig, task_name: str) -> str:
    return os.path.join(tc.out_dir, f"{task_name}-{tc.rule}")


RUN_FILES = ("config.json", "checkpoint.pt", "best.pt", "log.jsonl", "results.json", "learning_curve.png",
             "modulation.csv", "modulation.png")  # what a run writes into its folder (and retest.py RETEST_FILE)


def run_state(run_dir: str) -> str | None:
    """"finished" (results.json is there), "unfinished" (other files of a run are), or None (no run)."""
    if os.path.exists(os.path.join(run_dir, "results.json")):
        return "finished"
    return "unfinished" if any(os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES) else None


def refuse_to_replace(tc: TrainConfig, run_dir: str) -> None:
    """A run folder is never replaced silently: without --resume or --overwrite an existing run is refused."""
    if tc.resume and tc.overwrite:
        raise UsageError("--resume continues the run in its folder and --overwrite replaces it; choose one.")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is a file, not a run folder; move it, or choose another --out-dir.")
    state = run_state(run_dir)
    if state and not tc.resume and not tc.overwrite:
        # a run killed before its first checkpoint has none to resume from (a finished one --rule all --resume reuses)
        resumable = state == "finished" or os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
        raise UsageError(f"{run_dir} holds {'a finished' if state == 'finished' else 'an unfinished'} run already; "
                         + ("continue it with --resume, replace it" if resumable else "it has no checkpoint.pt to resume "
                            "from: replace it") + " with --overwrite, or choose another --out-dir.")


def make_run_dir(tc: TrainConfig, run_dir: str) -> None:
    """Create <out_dir>/<task>-<rule>/, checked writable now rather than after hours of training; with
    --overwrite remove the earlier run's files and retest.py's tests of its model (only those: whatever else
    lies there stays)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
        retests = [name for name in os.listdir(run_dir) if re.fullmatch(RETEST_FILE, name)]
        for name in (*RUN_FILES, *retests) if tc.overwrite else ():
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    except OSError as err:
        raise UsageError(f"cannot write the run folder {run_dir} ({err.strerror}); choose another --out-dir.") from err


def learning_rate(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at the last step (nanoGPT)."""
    if step <= tc.warmup:
        return tc.lr * step / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(amp: bool, device: torch.device):
    """bfloat16 mixed precision on CUDA when asked for (--amp); otherwise a context that does nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints (plain dicts and tensors, so they load with weights_only=True)


def write_whole(path: str, write) -> None:
    """write(path + ".tmp"), then rename it onto path: a crash mid-write never leaves half a file at path, and a
    write or rename that fails leaves no .tmp behind in the run's folder."""
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    write_whole(path, write)


def save_checkpoint(path: str, state: dict) -> None:
    write_whole(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise UsageError(f"there is no checkpoint {path} to resume from; run without --resume (with --overwrite "
                         f"where an earlier run left files).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"{path} is not a readable checkpoint ({type(err).__name__}); start the run again "
                         "with --overwrite instead of --resume.") from err
    keys = ("model", "step", "config", "optimizer", "best", "train_time", "rng")  # what train_rule's save() writes
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing or not (isinstance(state["config"], dict)
                       and all(isinstance(state["config"].get(k), dict) for k in ("train", "model", "task"))):
        lacks = ", ".join(missing) or "a config of train, model and task"
        raise UsageError(f"{path} is not a checkpoint train.py wrote (it lacks {lacks}); start the run again with "
                         "--overwrite instead of --resume.")
    return state


def encoder_classes(file: str, checkpoint: dict) -> tuple[str, str, bool] | None:
    """(task, Omniglot split, whether it trained on the validation classes too) whose training classes the
    encoder in `file` learnt: from the checkpoint's own config (every one train.py and pretrain.py write holds
    it, so a copied best.pt is still known), else the config.json beside it; None where there is neither.
    Runs saved before --split used Lake's, and those before --train-on-val did not use it."""
    saved = checkpoint.get("config")
    try:
        if not isinstance(saved, dict):
            with open(os.path.join(os.path.dirname(os.path.abspath(file)), "config.json")) as f:
                saved = json.load(f)
        if "train" in saved:  # train.py's
            task = saved["task"]
            return task["name"], task.get("omniglot_split", "lake"), task.get("train_on_val", False)
        return saved["task"], saved["split"], saved.get("train_on_val", False)  # pretrain.py's
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_encoder(path: str, model_cfg: Config, task_cfg: TaskConfig) -> dict:
    """The image encoder's weights (and batch-norm statistics) from a run folder's best.pt or a checkpoint
    file, checked against the encoder this model builds and against this run's classes: --init-encoder starts
    a model from another run's features (README, "Attention window 1"). An encoder trained on the other
    Omniglot split has seen this split's test or validation characters (Vinyals's split trains on 236
    evaluation characters that Lake's tests on; Lake's on the background alphabets Vinyals's validates on)."""
    if model_cfg.image_shape is None:
        raise UsageError("--init-encoder needs an image task (omniglot, cifar_fs): this task has no image encoder.")
    file = os.path.join(path, "best.pt") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UsageError(f"--init-encoder: there is no {file}; give a run folder that holds best.pt, or a checkpoint file.")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        saved = checkpoint["model"]
    except Exception as err:
        raise UsageError(f"--init-encoder: {file} is not a readable checkpoint ({type(err).__name__}); give a run's "
                         "best.pt or checkpoint.pt.") from err
    learnt = encoder_classes(file, checkpoint)
    if learnt and task_cfg.name == "omniglot" and learnt[0] == "omniglot" and learnt[1] != task_cfg.omniglot_split:
        raise UsageError(f"--init-encoder: {file} was trained on Omniglot's {learnt[1]} split, whose training characters "
                         f"include test or validation characters of the {task_cfg.omniglot_split} split; pre-train "
                         f"on --split {task_cfg.omniglot_split}.")
    if learnt and learnt[0] == task_cfg.name and learnt[2] and not task_cfg.train_on_val:
        raise UsageError(f"--init-encoder: {file} was trained on the validation classes too (--train-on-val), so this "
                         f"run's validation would score classes its encoder learnt; add --train-on-val, or start from "
                         f"an encoder trained without it.")
    state = {name.removeprefix("encoder."): value for name, value in saved.items() if name.startswith("encoder.")}
    built = Conv4(model_cfg.image_shape[0], model_cfg.conv4_widths()).state_dict()
    if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in built.items()}:
        widths = " ".join(map(str, model_cfg.conv4_widths()))
        raise UsageError(f"--init-encoder: {file} holds no Conv4 encoder for {model_cfg.image_shape[0]}-channel images with "
                         f"blocks of {widths} channels; give a run of the same task and --encoder-channels (--encoder-widths).")
    return state


# Training options a resumed run must keep, as config.json records one value for the whole run: the seed (the
# initialisation and the first steps' episodes), the batch, the validation episodes (the best score is compared
# across the resume), the encoder's learning-rate scale (it decides the optimizer's groups) and --deterministic
# (a run repeats bit for bit only if every part of it ran deterministic); a finished run also keeps its test
# episodes. --init-encoder is kept too: it only starts a run, so a resume ignores it, and config.json must name
# the encoder the run started from. A run saved before these options had scale 1 and was not deterministic.
# A static run also keeps --match-params (check_same_config), a plastic one need not (its width ignores it).
# --steps, the learning rate and the weight decay may change (resumed_optimizer_state).
KEPT_ON_RESUME = {"seed": None, "batch_size": None, "eval_episodes": None, "encoder_lr_scale": 1.0, "deterministic": False,
                  "init_encoder": None}
# A resume that changes a training option (--steps, --lr, ...) trains the rest of the run with it, and config.json
# records the new value; its "resumed" list keeps each such resume's step and every option it changed, [before,
# after], so the run's record says how all of its steps trained. Options of where and how often a run writes,
# and of how fast its steps run (a CUDA graph, torch.compile: the same steps), are not recorded. A run with no
# step left to train (a finished one, tested again by --resume) refuses a change of the options that act only on
# training steps: they would change nothing but its config.json.
UNRECORDED_ON_RESUME = ("resume", "overwrite", "out_dir", "threads", "log_interval", "log_seconds", "checkpoint_minutes",
                        "cuda_graph", "compile",
                        "match_params")  # a static run keeps it (check_same_config), a plastic one does not read it
TRAINING_ONLY = ("lr", "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "eval_interval")


def resumed_record(saved: dict, current: dict, step: int, path: str, steps_left: bool) -> list[dict]:
    """config.json's "resumed" list for a resume at step of the run saved with config saved: the saved run's list,
    and this resume's step and changed training options, if any; a change that would act on no step is refused."""
    before = {k: saved["train"].get(k, KEPT_ON_RESUME.get(k)) for k in current["train"]}  # as check_same_config reads it
    changed = {k: [before[k], v] for k, v in current["train"].items() if k not in UNRECORDED_ON_RESUME and before[k] != v}
    idle = [k for k in changed if k in TRAINING_ONLY]
    if idle and not steps_left:
        k, (was, now) = idle[0], changed[idle[0]]
        raise UsageError(f"{path} has trained all its {step} steps, so {option_flag(k, now)} would change nothing but its "
                         f"config.json; give the run's own {option_flag(k, was)} to test it again, or --steps above {step} "
                         f"to train on with {option_flag(k, now)}.")
    return saved.get("resumed", []) + ([dict(step=step, **changed)] if changed else [])


def check_same_config(saved: dict, current: dict, path: str, finished: bool = False, reuse: bool = False) -> None:
    """A resumed run must use the training options of KEPT_ON_RESUME, the model and the task it was started
    with; a finished one (tested again by --resume, or reused as it is by --rule all --resume: reuse) also its
    test episodes, and a static one its --match-params (it sets d_model, an option the user never gave; --rule all
    always gives it). The task is checked before the model: the model's sizes (d_in, max_len) follow from it, and
    the option to name is the task's (--train-way, not d_in).
    A train_shot of None trains at shot, so it is compared as shot (a 1-shot run saved with None resumes under
    Omniglot's default of 1)."""
    kept = KEPT_ON_RESUME | (dict(test_episodes=None) if finished else {})
    for k, before in kept.items():
        was = saved["train"].get(k, before)
        if was != current["train"][k]:
            raise UsageError(f"{path} was trained {trained_with(k, was, current['train'][k])}; "
                             f"{'reuse it' if reuse else 'resume'} with the run's own options, or start it again with "
                             f"--overwrite.")
    matched = saved["train"].get("match_params", False)
    if current["train"]["rule"] == "none" and matched != current["train"]["match_params"]:  # it sets d_model
        if matched:
            raise UsageError(f"{path} was trained with --match-params (as --rule all does); resume it with that "
                             f"option, or start it again with --overwrite.")
        raise UsageError(f"{path} was trained without --match-params, which --rule all always gives; resume it alone "
                         f"with --rule none and without that option, or move it away to train it again.")
    as_trained = lambda task: task | dict(train_shot=task["train_shot"] or task["shot"])
    saved, current = ({**config, "task": as_trained(config["task"])} for config in (with_options_added(saved, current), current))
    idle = FAST_WEIGHT_OPTIONS if current["train"]["rule"] == "none" else ()  # --rule all gives its static run them too
    for section in ("task", "model"):
        changed = [k for k in current[section] if k != "data_dir" and not (section == "model" and k in idle)
                   and saved[section].get(k) != current[section][k]]
        if changed and changed[0] == "d_model" and matched:  # the width --match-params matched: which options set it
            set_by = [f for f in idle if saved["model"].get(f) != current["model"][f]
                      and sets_width(model_of(current["model"]), f, saved["model"].get(f))]
            if set_by:
                given = " and ".join(option_flag(f, saved["model"][f]) for f in set_by)
                raise UsageError(f"{path} was matched (--match-params) to a plastic model with {given}, whose "
                                 f"parameter count sets its width; {'reuse it' if reuse else 'resume it'} with the "
                                 f"options it was trained with.")
            raise UsageError(f"{path} was trained at the width --match-params matched, {saved['model']['d_model']}, and "
                             f"these options match {current['model']['d_model']}; {'reuse it' if reuse else 'resume it'} "
                             f"with the run's own --d-model and other options.")
        if changed:
            k = changed[0]
            raise UsageError(f"{path} was trained {trained_with(k, saved[section].get(k), current[section][k])}; "
                             f"{'reuse it' if reuse else 'resume'} with the run's own options.")


def trained_with(name: str, was, now) -> str:
    """How a run was trained in one option, as the command line gives it, against the value asked for now: 'with
    --shot 5, not 1', 'with --split lake, not vinyals', 'without --train-way, not with --train-way 10'; an on/off
    flag takes no value: 'without --augment'."""
    flag = option_flag(name)
    if isinstance(was, bool):
        return f"with {flag}" if was else f"without {flag}"
    if was is None:
        return f"without {flag}" + (f", not with {option_flag(name, now)}" if now is not None else "")
    value = lambda v: option_flag(name, v)[len(flag) + 1:]  # --encoder-widths 96 192 ... -> 96 192 ...
    return f"with {option_flag(name, was)}" + (f", not {value(now)}" if now is not None else "")


def read_log(run_dir: str) -> list[dict]:
    """log.jsonl's records; a last line cut short (the process killed while writing it) is left out."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:
                raise UsageError(f"{path} is damaged at line {i + 1} ({err.msg}); start the run again with "
                                 "--overwrite.") from err
            continue
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise UsageError(f"{path} is damaged at line {i + 1} (not a record with a step); start the run again "
                             "with --overwrite.")
        records.append(record)
    return records


def rng_states(generator: torch.Generator) -> dict:
    return dict(torch=torch.get_rng_state(), generator=generator.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------------------------
# Evaluation


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval, 1.96 * std / sqrt(n). The std is taken of the
    differences from the first value, in float64: the same std, but exactly 0 when every value is the same
    (float32 episodes that all score 0.2 gave 2.9e-9)."""
    n, values = values.numel(), values.double()
    ci = 1.96 * (values - values[0]).std().item() / math.sqrt(n) if n > 1 else 0.0
    return values.mean().item(), ci


# Evaluation draws its episodes EVAL_DRAW at a time and runs each draw in slices of the batch size, so
# that a seed's validation and test episodes are the same whatever the batch (on one device): runs of
# one seed at different batch sizes are scored on the same episodes, and can be compared episode by
# episode. 128 is Omniglot's default batch, so its runs' episodes are those drawn before (commit 5114021
# and earlier drew them in batches of the training batch).
EVAL_DRAW = 128


def draws(task, split, episodes, device, seed):
    """The seeded episodes of `split` that evaluate() scores, EVAL_DRAW at a time."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, episodes, EVAL_DRAW):
        yield task.sample(min(EVAL_DRAW, episodes - start), split, device, generator)


def episodes_fingerprint(task, split, episodes, device, seed) -> dict:
    """What identifies those episodes: the md5 of their targets, in order (episodes_md5), and of their inputs,
    the tokens and images (inputs_md5), which the targets alone do not fix: Lake's split and Vinyals's, or
    two datasets, draw the same labels for a seed from other images. Runs whose final tests share both
    scored the same episodes, so report.py --paired compares them episode by episode.
    A few-shot episode's tokens are its support labels one-hot, as wide as the model's training episodes
    (train_way W): the same episodes read by a model trained 40-way and one trained 20-way have other
    tokens. Its targets, images and which tokens are queries fix them whatever W (images_md5, None
    without images); inputs_md5 stays as it was, so that runs tested before images_md5 still pair."""
    targets, inputs, images = hashlib.md5(), hashlib.md5(), hashlib.md5()
    for drawn in draws(task, split, episodes, torch.device(device), seed):
        targets.update(drawn.target.cpu().numpy().tobytes())
        inputs.update(drawn.x.cpu().numpy().tobytes())
        if drawn.images is not None:
            inputs.update(drawn.images.cpu().numpy().tobytes())
            images.update(drawn.mask.cpu().numpy().tobytes())
            images.update(drawn.images.cpu().numpy().tobytes())
    has_images = task.image_shape is not None
    return dict(episodes_md5=targets.hexdigest(), inputs_md5=inputs.hexdigest(),
                images_md5=images.hexdigest() if has_images else None)


@torch.no_grad()
def evaluate(model, task, split, episodes, batch_size, device, seed, eta=None, amp=False, fast_norm=True):
    """Run `episodes` fresh episodes of `split` (the same ones for the same seed, whatever batch_size) in
    eval mode, batch_size episodes per forward pass.
    Returns the per-episode metric (episodes,) and, per token position, the means over episodes of
    the model's info ((T,) each: eta, step, update_norm, fast_norm), of the scored-position mask and of
    the metric where scored ("metric": a few-shot run's accuracy per query position).
    fast_norm=False leaves out the fast-weight norm, which more than doubles the time of a plastic
    model's forward pass; only the final test's trace needs it."""
    device = torch.device(device)  # "cpu", "cuda" or a torch.device
    model.eval()
    metrics, sums = [], {}
    for drawn in draws(task, split, episodes, device, seed):
        for first in range(0, drawn.x.shape[0], batch_size):
            batch = drawn.rows(first, first + batch_size)
            with autocast(amp, device):
                out, info = model(batch.x, batch.images, eta=eta, fast_norm=fast_norm, context=batch.context)
            metrics.append(task.metric(out.float(), batch))
            info = {k: v for k, v in info.items() if k != "fast_weights"}
            info |= {"scored": batch.mask, "metric": task.token_metric(out, batch) * batch.mask}
            for key, value in info.items():  # (B, T) -> summed over episodes (T,)
                sums[key] = sums.get(key, 0) + value.float().sum(0)
    model.train()
    return torch.cat(metrics).cpu(), {key: (s / episodes).cpu() for key, s in sums.items()}


# ----------------------------------------------------------------------------------------------
# Plots and the modulation trace (matplotlib imported here so that importing train.py stays light)


def plot_learning_curve(run_dir: str, metric_name: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    log = read_log(run_dir)
    train = [r for r in log if r["split"] == "train"]
    val = [r for r in log if r["split"] == "val"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".")  # a marker: one point still shows
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log" if all(r["loss"] > 0 for r in train) else "linear")
    if ax_loss.get_yscale() == "log":  # a loss within one decade is labelled at its minor ticks: 2.45, not 2.45x10^0
        ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(minor_thresholds=(2, 0.4)))
    ax_metric.plot([r["step"] for r in train], [r["metric"] for r in train], marker=".", label="train", alpha=0.6)
    ax_metric.errorbar([r["step"] for r in val], [r["metric"] for r in val], [r["ci95"] for r in val],
                       marker="o", label="validation")
    ax_metric.set(xlabel="step", ylabel=metric_name)
    ax_metric.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_plot(fig, os.path.join(run_dir, "learning_curve.png"))
    plt.close(fig)


def plot_modulation_trace(run_dir: str, trace: dict, rule: str) -> None:
    """modulation.png: eta_t, the step taken and the fast weight's norm per token position, scored ones shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = dict(eta="eta_t (modulated rate)", step="step taken (after the bound)", fast_norm="||F_t+1||")
    fig, axes = plt.subplots(len(labels), 1, figsize=(8, 6), sharex=True)
    positions = range(len(trace["eta"]))
    for ax, (key, label) in zip(axes, labels.items()):
        ax.plot(positions, trace[key], marker=".")
        ax.set_ylabel(label, fontsize=8)
        for t in positions:  # shade the positions that are scored (queries, recall steps)
            if trace["scored"][t] > 0.5:
                ax.axvspan(t - 0.5, t + 0.5, color="tab:orange", alpha=0.15, linewidth=0)
    axes[0].set_title(f"{rule}: mean over test episodes (shaded: scored positions)")
    axes[-1].set_xlabel("token position t")
    fig.tight_layout()
    save_plot(fig, os.path.join(run_dir, "modulation.png"))
    plt.close(fig)


def write_modulation_trace(run_dir: str, trace: dict, rule: str) -> None:
    """modulation.csv and modulation.png: per token position, the means over the test episodes. At isolated
    few-shot queries (scored, writing nothing) eta is the rate the query would write with; step and
    update_norm are 0 there."""
    columns = ("eta", "step", "update_norm", "fast_norm", "scored")
    with open(os.path.join(run_dir, "modulation.csv"), "w") as f:
        f.write("position," + ",".join(columns) + "\n")
        for t in range(len(trace["eta"])):
            f.write(f"{t}," + ",".join(f"{trace[c][t].item():.6g}" for c in columns) + "\n")
    plot_modulation_trace(run_dir, trace, rule)


# ----------------------------------------------------------------------------------------------
# Training


def remedy(model_cfg: Config, tc: TrainConfig) -> str:
    if model_cfg.rule == "gradient":
        return f"lower --eta (now {model_cfg.eta}) or --max-norm (now {model_cfg.max_norm}), or --lr (now {tc.lr})"
    if tc.amp:
        return "run without --amp, or lower --lr"
    return f"lower --lr (now {tc.lr}) or --grad-clip (now {tc.grad_clip})"


def sequence_unit(task) -> str:
    return "episodes" if task.image_shape is not None else "sequences"  # few-shot episodes, other sequences


def format_time(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def final_evaluations(model, task, tc: TrainConfig, device):
    """The final test's evaluations: tc.test_episodes fresh episodes (held-out classes for few-shot tasks)
    with the fast-weight trace, and for the plastic rules the knock-out, the same episodes with eta = 0.
    Returns the per-episode metric, the trace and the knock-out's metric (None for the static model);
    final_fingerprint names the episodes."""
    values, trace = evaluate(model, task, "test", tc.test_episodes, tc.batch_size, device, tc.seed + 2, amp=tc.amp)
    knocked = None
    if model.config.rule != "none":
        knocked, _ = evaluate(model, task, "test", tc.test_episodes, tc.batch_size, device, tc.seed + 2, eta=0.0,
                              amp=tc.amp, fast_norm=False)
    return values, trace, knocked


def final_fingerprint(task, tc: TrainConfig, device) -> dict:
    """The fingerprint (episodes_fingerprint) of the episodes final_evaluations scores."""
    return episodes_fingerprint(task, "test", tc.test_episodes, device, tc.seed + 2)


def metric_by_position(trace: dict) -> list:
    """From evaluate()'s trace: the mean metric at each position where episodes are scored, None elsewhere."""
    return [round(m / n, 6) if n > 0 else None for m, n in zip(trace["metric"].tolist(), trace["scored"].tolist())]


def summarise_test(values, trace: dict, knocked, fingerprint: dict, task) -> tuple[dict, str]:
    """final_evaluations' numbers as results.json holds them (means, 95% intervals, the metric per scored
    position, and per episode with the episodes' fingerprint, for paired comparisons; for a plastic rule
    the knock-out and the model minus it, episode by episode) and the line that prints them."""
    results = dict(zip(("test_mean", "test_ci95"), mean_ci95(values)), test_episodes=values.numel(),
                   knockout_mean=None, knockout_ci95=None, plasticity_mean=None, plasticity_ci95=None,
                   by_position=metric_by_position(trace),
                   **fingerprint, by_episode=[round(v, 6) for v in values.tolist()],
                   knockout_by_episode=None if knocked is None else [round(v, 6) for v in knocked.tolist()])
    line = (f"test {task.metric_name} {results['test_mean']:.4g} ± {results['test_ci95']:.2g} over {values.numel()} "
            f"{sequence_unit(task)}")
    if knocked is not None:  # and the model minus its knock-out on each episode: what plasticity adds, paired
        results.update(zip(("knockout_mean", "knockout_ci95"), mean_ci95(knocked)))
        results.update(zip(("plasticity_mean", "plasticity_ci95"), mean_ci95(values.double() - knocked.double())))
        line += (f" | knock-out (eta=0) {results['knockout_mean']:.4g} ± {results['knockout_ci95']:.2g}, the model minus "
                 f"it {results['plasticity_mean']:+.2g} ± {results['plasticity_ci95']:.2g} (paired)")
    return results, line


def final_test(model, task, tc: TrainConfig, device, run_dir: str) -> dict:
    """The final test (final_evaluations), printed, with the metric per scored position (results.json's
    by_position) and the modulation trace written for the plastic rules."""
    values, trace, knocked = final_evaluations(model, task, tc, device)
    results, line = summarise_test(values, trace, knocked, final_fingerprint(task, tc, device), task)
    del trace["metric"]  # results.json's trace: the model's, per position
    if knocked is not None:
        write_modulation_trace(run_dir, trace, model.config.rule)
        results["trace"] = {key: [round(v, 6) for v in values.tolist()] for key, values in trace.items()}  # per position
    print(line + protocol_note(tc.test_episodes))
    if task.metric_name == "accuracy":  # a query that saw the others would score higher the later it comes
        print(f"test accuracy by query position: {' '.join(f'{v:.4g}' for v in results['by_position'] if v is not None)}")
    return results


def protocol_note(test_episodes: int) -> str:
    """What a test on fewer episodes than the protocol's says about itself, wherever it is printed."""
    protocol = PROTOCOL_EPISODES["test_episodes"]
    return "" if test_episodes >= protocol else f" (not the protocol's {protocol}: --test-episodes {protocol} for results to report)"


def make_optimizer(model, tc: TrainConfig, graphed: bool):
    """AdamW over one group of parameters, or, with an encoder_lr_scale other than 1, two: the image
    encoder's, whose learning rate is the rest's times its "scale", and the rest. For a CUDA graph it must
    not wait for the host: capturable=True and each group's learning rate a tensor."""
    encoder = list(model.encoder.parameters()) if tc.encoder_lr_scale != 1 else []
    in_encoder = {id(p) for p in encoder}
    groups = [dict(params=[p for p in model.parameters() if id(p) not in in_encoder], scale=1.0)]
    groups += [dict(params=encoder, scale=tc.encoder_lr_scale)] if encoder else []
    device = next(model.parameters()).device
    for group in groups:
        group["lr"] = torch.tensor(tc.lr * group["scale"], device=device) if graphed else tc.lr * group["scale"]
    return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, capturable=graphed)


def resumed_optimizer_state(saved: dict, tc: TrainConfig, graphed: bool) -> dict:
    """A checkpoint's optimizer state, its groups set to this run's capturable (a CUDA graph's step must not
    wait for the host, an eager one on a CPU cannot run capturable) and weight decay (what config.json records
    is what the resumed steps use), whatever the saving run's."""
    groups = [group | dict(capturable=graphed, weight_decay=tc.weight_decay) for group in saved["param_groups"]]
    return saved | dict(param_groups=groups)


def set_learning_rate(optimizer, value: float) -> None:
    """Every group's learning rate to value times its scale (1 where a checkpoint saved before scales had none)."""
    for group in optimizer.param_groups:
        lr = value * group.get("scale", 1.0)
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # in place: a recorded CUDA graph reads this tensor
        else:
            group["lr"] = lr


def make_train_step(forward, optimizer, task, tc: TrainConfig, device):
    """One optimizer step on a batch: forward, loss, backward, gradient clipping, AdamW.
    The clipping norm is over the parameters that train: at --encoder-lr-scale 0 the kept encoder's
    gradients would otherwise shrink every other parameter's clipped step.
    Returns (loss, out), both still on the device: nothing here waits for the GPU."""
    trained = [p for group in optimizer.param_groups if group.get("scale", 1.0) > 0 for p in group["params"]]

    def train_step(batch):
        with autocast(tc.amp, device):
            out, _ = forward(batch.x, batch.images, fast_norm=False, context=batch.context)
        loss = task.loss(out.float(), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, tc.grad_clip)
        optimizer.step()
        return loss.detach(), out.detach()
    return train_step


GRAPH_WARMUP = 3  # eager steps before a CUDA graph is recorded: they create the optimizer's state


def record_cuda_graph(train_step, batch):
    """Record train_step(batch) as a CUDA graph; return a step that copies each new batch into the
    recorded input tensors and replays it. The token loop of the plastic rules launches thousands of
    small kernels per step; a replay launches them all at once. Recording executes nothing, so the
    returned step must still be called on `batch`. Shapes stay fixed (the batch size), and so does the
    batch's context (a training episode's support set)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, out = train_step(batch)

    def replay(new_batch):
        for name in ("x", "images", "target", "mask"):
            if getattr(batch, name) is not None and getattr(new_batch, name) is not getattr(batch, name):
                getattr(batch, name).copy_(getattr(new_batch, name))
        graph.replay()
        return loss, out
    return replay


def eager_step_on_side_stream(train_step, batch, stream):
    """An eager step on a side stream, as the steps before a CUDA graph recording must be, ordered after
    the default stream's work (the batch) and before whatever follows it."""
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        result = train_step(batch)
    torch.cuda.current_stream(stream.device).wait_stream(stream)
    return result


def build_training(run: RunConfig, task, device, encoder=None):
    """The model, its optimizer and its training step; graphed: the step is to be recorded as a CUDA graph.
    encoder: read_encoder()'s weights for the image encoder, loaded over its initialisation (the rest of
    the model is initialised as without it)."""
    tc = run.train
    torch.manual_seed(tc.seed)
    model = PlasticGPT(run.model)
    if encoder is not None:
        model.encoder.load_state_dict(encoder)
    model = model.to(device)
    graphed = tc.cuda_graph and device.type == "cuda" and not tc.compile
    optimizer = make_optimizer(model, tc, graphed)
    forward = torch.compile(model) if tc.compile else model
    return model, optimizer, make_train_step(forward, optimizer, task, tc, device), graphed


class StopOnSignal:
    """Within `with StopOnSignal(checkpoint_path) as stop:` SIGINT (Ctrl-C) and SIGTERM only set
    stop.signum: the training loop then saves a checkpoint at the current step and ends. A second
    signal, or one after stop.at_once was set (when the checkpoint of the last step is on disk),
    raises Stopped at once. Signals reach only the main thread; elsewhere this does nothing."""

    def __init__(self, checkpoint_path: str):
        self.checkpoint_path, self.signum, self.at_once, self.previous = checkpoint_path, None, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # a signal ignored by who started us stays ignored
            self.previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGINT, signal.SIGTERM)
                             if signal.getsignal(signum) is not signal.SIG_IGN}
        return self

    def handle(self, signum, frame):
        if self.at_once:
            raise Stopped(signum, self.at_once, resumable=True)
        if self.signum is not None:
            saved = os.path.exists(self.checkpoint_path)
            raise Stopped(signum, "stopped at once by a second signal; " + (
                f"the last checkpoint, {self.checkpoint_path}, stays" if saved else "nothing was saved"), resumable=saved)
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


CPU_HINT = dict(minutes=10, seconds=300, model=dict(d_model=64, n_layer=2))  # runs of over 10 minutes: what fits in 5


def cpu_hint(tc: TrainConfig, model_cfg: Config, ms_per_step: float) -> str:
    """On a CPU, options that finish in minutes where the run as asked would take long."""
    fit = CPU_HINT["seconds"] * 1000 / ms_per_step
    unit = 10 ** max(0, math.floor(math.log10(fit)) - 1)
    steps = max(20, int(fit // unit * unit))  # rounded down to two significant digits
    smaller = "".join(f" --{k.replace('_', '-')} {v}" for k, v in CPU_HINT["model"].items()
                      if getattr(model_cfg, k) > v)
    return (f"hint: at this speed the {tc.steps} steps take about {format_time(tc.steps * ms_per_step / 1000)} on "
            f"this CPU; --steps {steps}{smaller} trains in 5 minutes or less, before the validations and the final "
            f"test (the task defaults are sized for a GPU)")


def kept_note(keep_last: bool, is_best: bool) -> str:
    """What a validation line says of the model it scored: kept as best.pt, or kept as the last (--train-on-val)."""
    if keep_last:
        return " | kept: classes trained on (--train-on-val), the last model is tested"
    return " | best" if is_best else ""


def train_rule(cfg: RunConfig) -> dict:
    """Train one rule (cfg.train.rule in none | hebbian | gradient), test the best model, write the
    run folder, and return what results.json holds."""
    task = load_task(cfg.task)
    cfg = resolve(cfg, task)
    tc, model_cfg = cfg.train, cfg.model
    device = pick_device(tc.device)
    set_cpu_threads(tc, device)
    run_dir = run_folder(tc, task.name)
    checkpoint_path, best_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "best.pt")
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as config.json holds it; plain, for weights_only=True
    # Nothing is written into the run folder until every option is known to be good.
    refuse_to_replace(tc, run_dir)
    state, kept = None, []  # kept: log.jsonl's records up to the checkpoint (not what came after it)
    if tc.resume:
        state = load_checkpoint(checkpoint_path)  # a finished run keeps its test episodes: its results.json is redone
        check_same_config(state["config"], config, checkpoint_path, finished=run_state(run_dir) == "finished")
        if state["step"] > tc.steps:  # nothing would train, and config.json would record fewer steps than the model took
            raise UsageError(f"{checkpoint_path} is at step {state['step']}, past --steps {tc.steps}; resume with --steps "
                             f"{state['step']} or more.")
        kept = [r for r in read_log(run_dir) if r["step"] <= state["step"]]
        if resumed := resumed_record(state["config"], config, state["step"], checkpoint_path, state["step"] < tc.steps):
            config["resumed"] = resumed
    encoder = read_encoder(tc.init_encoder, model_cfg, cfg.task) if tc.init_encoder and state is None else None
    check_memory(cfg, task, device)
    make_run_dir(tc, run_dir)
    write_json(os.path.join(run_dir, "config.json"), config)

    model, optimizer, train_step, graphed = build_training(cfg, task, device, encoder)
    # A run's training, validation and test draws come from generators seeded seed, seed + 1 and seed + 2:
    # distinct, so no run is tested on episodes it trained or was chosen on. Across runs they are shared:
    # seed K's test stream is seed K + 1's validation stream and seed K + 2's training stream, so on the
    # synthetic tasks (one distribution for every split) seed K + 1 picks its best.pt on seed K's test
    # episodes, and seed K + 2's first batches can repeat them (on a CPU: copy's at any batch, the others' at 128).
    generator = torch.Generator(device=device).manual_seed(tc.seed)  # the training sequences
    side_stream = torch.cuda.Stream(device) if graphed else None  # for the eager steps before the recording
    step, best, train_time = 0, dict(value=None, step=0), 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(resumed_optimizer_state(state["optimizer"], tc, graphed))
        for group in optimizer.param_groups:  # a float or a tensor, as this run needs, whatever the saving run used
            group["lr"] = torch.tensor(float(group["lr"]), device=device) if graphed else float(group["lr"])
        set_rng_states(state["rng"], generator)
        step, best, train_time = state["step"], state["best"], state["train_time"]
        print(f"resuming {checkpoint_path} at step {step}")
    better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
    # --train-on-val: validation scores classes the model trains on, so it chooses nothing; the last model is
    # kept, as the published figures that train on them test theirs.
    keep_last = cfg.task.train_on_val
    unit = sequence_unit(task)
    sizes = (f" ({task.ways['train']}-way {task.shots['train']}-shot; validated and tested {task.ways['test']}-way "
             f"{task.shots['test']}-shot)" if task.image_shape is not None else "")  # the training accuracy's chance differs
    print(f"{task.name}, rule {model_cfg.rule}: {model.num_params():,} parameters, {tc.steps} steps "
          f"of {tc.batch_size} {unit}{sizes} on {device_name(device)}; writing {run_dir}", flush=True)
    if note := smoke_note(tc):
        print(note)

    def save(path, **extra):  # model, step and config; checkpoint.pt also optimizer, best, RNG states
        save_checkpoint(path, dict(model=model.state_dict(), step=step, config=config, **extra))

    start_step = step
    pending = []  # (loss, metric) per step since the last log line, kept on the device: no sync per step
    started, interval_start, interval_steps = time.perf_counter() - train_time, time.perf_counter(), 0
    last_checkpoint, hinted = time.perf_counter(), device.type != "cpu"
    with StopOnSignal(checkpoint_path) as stop, open(os.path.join(run_dir, "log.jsonl"), "w") as log:
        log.writelines(json.dumps(r) + "\n" for r in kept)
        while step < tc.steps:
            step += 1
            set_learning_rate(optimizer, learning_rate(step, tc))
            batch = task.sample(tc.batch_size, "train", device, generator)
            try:
                if side_stream is not None and step - start_step > GRAPH_WARMUP:
                    train_step, side_stream = record_cuda_graph(train_step, batch), None
                if side_stream is not None:
                    loss, out = eager_step_on_side_stream(train_step, batch, side_stream)
                else:
                    loss, out = train_step(batch)
            except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:
                if not memory.is_out_of_memory(err):
                    raise
                raise UsageError(f"the {device.type} ran out of memory at step {step}; {memory.REMEDY}.") from err
            pending.append(torch.stack([loss, task.metric(out.float(), batch).mean()]))
            interval_steps += 1

            validate = step % tc.eval_interval == 0 or step == tc.steps
            stopping = stop.signum is not None  # read once: a signal may come at any time
            if not (validate or stopping or step % tc.log_interval == 0 or step == start_step + 1
                    or time.perf_counter() - interval_start >= tc.log_seconds):
                continue
            losses, metrics = torch.stack(pending).T.tolist()  # the one sync of the interval
            bad = [i for i, value in enumerate(losses) if not math.isfinite(value)]
            if bad:  # checked before any checkpoint is written, so the last one on disk is good
                bad_step = step - len(losses) + 1 + bad[0]
                log.write(json.dumps(dict(split="train", step=bad_step, diverged=True)) + "\n")
                kept = (f"the last good checkpoint is {checkpoint_path}" if os.path.exists(checkpoint_path)
                        else "no checkpoint was written yet")
                raise Diverged(f"the loss became {losses[bad[0]]} at step {bad_step}; {remedy(model_cfg, tc)} ({kept}).")
            seconds = time.perf_counter() - interval_start
            ms_per_step = 1000 * seconds / interval_steps
            record = dict(split="train", step=step, loss=sum(losses) / len(losses), metric=sum(metrics) / len(metrics),
                          lr=learning_rate(step, tc), ms_per_step=ms_per_step,
                          per_second=tc.batch_size * interval_steps / seconds)
            print(f"step {step}/{tc.steps} | loss {record['loss']:.4g} | {task.metric_name} {record['metric']:.4g} | "
                  f"{ms_per_step:.1f} ms/step | {record['per_second']:.0f} {unit}/s | "
                  f"left {format_time((tc.steps - step) * ms_per_step / 1000)}", flush=True)
            if not hinted and (tc.steps - step) * ms_per_step > 60_000 * CPU_HINT["minutes"]:
                print(cpu_hint(tc, model_cfg, ms_per_step), flush=True)
            hinted = True
            log.write(json.dumps(record) + "\n")
            pending, interval_steps = [], 0

            if validate:
                values, _ = evaluate(model, task, "val", tc.eval_episodes, tc.batch_size, device, tc.seed + 1,
                                     amp=tc.amp, fast_norm=False)
                value, ci = mean_ci95(values)
                is_best = keep_last or best["value"] is None or better(value, best["value"])
                if is_best:
                    best = dict(value=value, step=step)
                    save(best_path, val=value)
                print(f"val step {step} | {task.metric_name} {value:.4g} ± {ci:.2g}{kept_note(keep_last, is_best)}")
                log.write(json.dumps(dict(split="val", step=step, metric=value, ci95=ci, best=is_best)) + "\n")
            if validate or stopping or time.perf_counter() - last_checkpoint > 60 * tc.checkpoint_minutes:
                train_time = time.perf_counter() - started
                save(checkpoint_path, optimizer=optimizer.state_dict(), best=best, train_time=train_time,
                     rng=rng_states(generator))
                last_checkpoint = time.perf_counter()
            log.flush()
            interval_start = time.perf_counter()
            if stopping:
                break
        # The checkpoint of the last step is on disk (the last step always saves one): from here a
        # signal stops at once.
        stop.at_once = f"stopped during the final test; training is complete in {checkpoint_path}"
        if stop.signum is not None:  # a signal stopped the loop, or came during its last step
            raise Stopped(stop.signum, f"stopped at step {step} of {tc.steps}; {checkpoint_path} holds it", resumable=True)
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)["model"])
        results = dict(task=task.name, rule=model_cfg.rule, params=model.num_params(), metric=task.metric_name,
                       **final_test(model, task, tc, device, run_dir), best_step=best["step"], best_val=best["value"],
                       train_time_s=train_time, device=device_name(device), torch=torch.__version__, run_dir=run_dir,
                       config=config)
        plot_learning_curve(run_dir, task.metric_name, f"{task.name}, rule {model_cfg.rule}{sizes}")
        write_json(os.path.join(run_dir, "results.json"), results)
    return results


def read_finished(run: RunConfig, run_dir: str) -> dict | None:
    """A finished run's results.json, for --rule all --resume to reuse as it is, or None where --steps asks for
    more steps (it resumes); one that cannot be read, was run with other options (check_same_config), or is
    given another option of the training steps alone (resumed_record), is refused in one sentence."""
    path = os.path.join(run_dir, "results.json")
    try:
        with open(path) as f:
            finished = json.load(f)
    except (OSError, ValueError):
        finished = None
    saved = finished.get("config") if isinstance(finished, dict) else None
    if not (isinstance(saved, dict) and all(isinstance(saved.get(k), dict) for k in ("train", "model", "task"))
            and isinstance(saved["train"].get("steps"), int)):
        raise UsageError(f"{path} is damaged (no readable config); move it away to test the run again from its "
                         "checkpoint with --resume, or start the run again with --overwrite.")
    config = json.loads(json.dumps(dataclasses.asdict(resolve(run, load_task(run.task)))))
    check_same_config(saved, config, run_dir, finished=True, reuse=True)
    trained, steps = saved["train"]["steps"], config["train"]["steps"]
    if steps < trained:
        raise UsageError(f"{run_dir} trained {trained} steps, past --steps {steps}; resume with --steps {trained} or more.")
    if steps > trained:
        return None
    resumed_record(saved, config, trained, run_dir, steps_left=False)
    return finished


def compare(cfg: RunConfig) -> dict:
    """Train none (widened to the Hebbian model's parameter count), hebbian and gradient with the same
    settings; print and return one table. With --resume a finished rule's results.json is used as it
    is, an unfinished one resumes and one not started yet starts; with none of the three there, --resume is
    refused (a mistyped --out-dir, most likely)."""
    runs = [dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rule=rule, match_params=True)) for rule in RULES]
    folders, finished = [run_folder(run.train, cfg.task.name) for run in runs], {}
    for run, run_dir in zip(runs, folders):  # every folder checked, every finished run to reuse read, before training
        refuse_to_replace(run.train, run_dir)
        if run.train.resume and run_state(run_dir) == "finished" and (results := read_finished(run, run_dir)):
            finished[run.train.rule] = results
    if cfg.train.resume and all(run_state(folder) is None for folder in folders):  # a mistyped --out-dir, most likely
        raise UsageError(f"there is no run to resume in {cfg.train.out_dir} (no {', '.join(map(os.path.basename, folders))}"
                         f"); run without --resume, or give the --out-dir of the runs.")
    results = []
    for run, run_dir in zip(runs, folders):
        print(f"\n=== rule {run.train.rule} ===")
        if run.train.rule in finished:
            print(f"{run_dir} is finished with these options; its results.json is used as it is")
            results.append(finished[run.train.rule])
        else:
            resume = run.train.resume and run_state(run_dir) is not None
            results.append(train(dataclasses.replace(run, train=dataclasses.replace(run.train, resume=resume))))
    metric = results[0]["metric"]
    header = f"{'rule':<9} {'params':>10}   {'test ' + metric + ' (95% CI)':<24} {'knock-out (eta=0)':<20} {'train time':>10}"
    episodes = results[0]["test_episodes"]
    # where each run trained: a reused run may have trained on another machine (older ones did not record torch)
    machines = [r["device"] + (f", PyTorch {r['torch']}" if r.get("torch") else "") for r in results]
    ran = f"on {machines[0]}" if len(set(machines)) == 1 else "on " + "; ".join(
        f"{r['rule']} {machine}" for r, machine in zip(results, machines))
    lines = [f"{cfg.task.name}: {episodes} test episodes{protocol_note(episodes)}; {ran}", header, "-" * len(header)]
    for r in results:
        ko = "-" if r["knockout_mean"] is None else f"{r['knockout_mean']:.4g} ± {r['knockout_ci95']:.2g}"
        test = f"{r['test_mean']:.4g} ± {r['test_ci95']:.2g}"
        lines.append(f"{r['rule']:<9} {r['params']:>10,}   {test:<24} {ko:<20} {format_time(r['train_time_s']):>10}")
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(cfg.train.out_dir, f"{cfg.task.name}-comparison.txt"), "w") as f:
        f.write(table + "\n")
    return dict(runs=results, table=table)


def train(cfg: RunConfig) -> dict:
    """train_rule(), or compare() for rule "all", with deterministic kernels where --deterministic asks."""
    with deterministic_algorithms(cfg.train.deterministic):
        return compare(cfg) if cfg.train.rule == "all" else train_rule(cfg)


# ----------------------------------------------------------------------------------------------
# The command line, built from the three dataclasses: one flag per field, help from its comment.

SKIPPED = dict(model={"d_in", "d_out", "max_len", "image_shape", "rule"}, task=set(), train=set())
FLAG_NAMES = dict(task={"name": "task", "omniglot_split": "split"})  # --task rather than --name, --split for Omniglot's
CHOICES = dict(train={"rule": RULES + ("all",)}, model={"fast_form": ("factored", "dense"),
               "coef_init": tuple(COEF_INITS), "init": INITS}, task={"name": TASKS, "mode": ("linear", "mlp"), "omniglot_split": OMNIGLOT_SPLITS})
SECTIONS = (("train", TrainConfig), ("model", Config), ("task", TaskConfig))  # the fields of RunConfig


def field_comments(cls) -> dict[str, str]:
    """The comment after each field in the class's source: its help text."""
    names, comments = {f.name for f in dataclasses.fields(cls)}, {}
    for line in inspect.getsource(cls).splitlines():
        code, _, comment = line.partition("#")
        for part in code.split(";"):  # "a: int = 1; b: int = 2  # comment" gives both the comment
            name = part.split(":")[0].strip()
            if ":" in part and name in names and comment.strip():
                comments.setdefault(name, comment.strip())
    return comments


def optional(kind):
    """An argparse type that also accepts 'none' (for options whose default None means 'all' or 'auto')."""
    def parse(text):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def per_task(key: str, own) -> str:
    """'2000 for copy, regression, cue_reward; 8000 for omniglot, cifar_fs': TASK_DEFAULTS[*][key] for --help;
    where some task has none, its field's own default follows ('10 for omniglot; otherwise unset')."""
    tasks_by_value = {}
    for task, defaults in TASK_DEFAULTS.items():
        if key in defaults:
            tasks_by_value.setdefault(defaults[key], []).append(task)
    shown = lambda value: "unset" if value is None else f"{value}" if isinstance(value, bool) else f"{value:g}"
    every_task = all(key in defaults for defaults in TASK_DEFAULTS.values())
    if len(tasks_by_value) == 1 and every_task:
        return f"{shown(next(iter(tasks_by_value)))} for every task"
    text = "; ".join(f"{shown(value)} for {', '.join(names)}" for value, names in tasks_by_value.items())
    return text if every_task else f"{text}; otherwise {shown(own)}"


def command_line_help(comment: str) -> str:
    """A field's comment as --help shows it: the comment says what None means to Python, where on the command line the
    option is left out ('None: the task's default' reads 'unset: the task's default'); % escaped for argparse."""
    return comment.replace("None:", "unset:").replace("None =", "unset:").replace("%", "%%")


def add_options(parser, section: str, cls) -> None:
    group = parser.add_argument_group(f"{section} options ({cls.__name__})")
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in SKIPPED[section]:
            continue
        flag = FLAG_NAMES.get(section, {}).get(f.name, f.name)
        kind, args = hints[f.name], typing.get_args(hints[f.name])
        can_be_none = isinstance(kind, types.UnionType) and type(None) in args
        if can_be_none:
            kind = next(a for a in args if a is not type(None))
        options = dict(dest=f"{section}.{f.name}", default=f.default, help=command_line_help(comments.get(f.name, "")))
        if f.name in PER_TASK:  # left unset, the task's default fills it in
            options.update(default=None, help=f"{options['help']} [per task: {per_task(f.name, f.default)}]")
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            options.update(nargs="+", type=typing.get_args(kind)[0], metavar="I")
        elif f.name in CHOICES.get(section, {}):
            options.update(choices=CHOICES[section][f.name])
        else:
            options.update(type=optional(kind) if can_be_none else kind, metavar=kind.__name__.upper())
        group.add_argument("--" + flag.replace("_", "-"), **options)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" says nothing: the comment says what None means
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence, exit code 2 (argparse would print the whole usage first)
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="Train and test a GPT with Hebbian or gradient-based fast weights.",
                    epilog="examples: python train.py --rule hebbian --task omniglot; "
                           "python train.py --rule all --task copy --attn-window 8 --steps 2000",
                    formatter_class=HelpFormatter)
    for section, cls in SECTIONS:
        add_options(parser, section, cls)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = vars(args)
    task_defaults = TASK_DEFAULTS[values["task.name"]]
    sections = {}
    for section, cls in SECTIONS:
        given = {f.name: values[f"{section}.{f.name}"] for f in dataclasses.fields(cls) if f"{section}.{f.name}" in values}
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
        if section != "train":  # left unset: the task's default, or the field's own for a task without one (TrainConfig's None: resolve())
            own = {f.name: f.default for f in dataclasses.fields(cls)}
            given |= {k: task_defaults.get(k, own[k]) for k, v in given.items() if v is None and k in PER_TASK}
        if section == "task" and values["task.train_way"] is None and given["train_way"] is not None:
            # the task's classes at one training shot, or way's if more (20-way trains 20-way); at more training
            # shots way's (--train-shot 5 trains 5-way; Omniglot's 5-shot trains as its 1-shot default does)
            one_shot = (given["train_shot"] or given["shot"]) == 1
            given["train_way"] = max(given["train_way"], given["way"]) if one_shot else given["way"]
        check_numbers(given)  # before the dataclass checks its own fields: Config(n_head=0) would divide by zero
        try:
            sections[section] = cls(**given)
        except ValueError as err:
            raise UsageError(str(err)) from err
        if section == "model" and values["train.rule"] == "none":
            refuse_idle_fast_weights(values, sections["model"])
    tc = sections["train"]
    if tc.compile and (tc.rule in ("gradient", "all") or tc.bench):
        raise UsageError("--compile cannot run the gradient rule (torch.compile cannot differentiate through the rule's "
                         "own gradient, a second-order derivative): use it with --rule hebbian or none, without --bench.")
    return RunConfig(**sections)


def default_config(task: str, *options: str) -> RunConfig:
    """The RunConfig that `python train.py --task <task> <options>` runs, with the task's own model and episode
    defaults (RunConfig(task=TaskConfig(task)) takes Config's and TaskConfig's field defaults as given):
    train(default_config("copy", "--steps", "200")) is that command from Python."""
    return config_from_args(build_parser().parse_args(["--task", task, *options]))


def resume_command(argv: list[str]) -> str:
    """The command that continues a stopped run: the same options, with --resume."""
    options = [a for a in argv if a != "--overwrite"]
    return shlex.join(["python", "train.py", *options, *([] if "--resume" in options else ["--resume"])])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config_from_args(build_parser().parse_args(argv))
        if cfg.train.bench:
            from bench import bench  # bench.py builds on this file, so it is imported only when asked for
            bench(cfg)
        else:
            train(cfg)
    except UsageError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 1
    except Stopped as err:
        how = f"; continue with: {resume_command(argv)}" if err.resumable else "."
        print(f"train.py: {err}{how}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("train.py: stopped by Ctrl-C before training began; nothing of this run was saved.", file=sys.stderr)
        return 128 + signal.SIGINT
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:  # outside a training step (--bench, a test)
        if not memory.is_out_of_memory(err):
            raise
        print(f"train.py: the memory ran out ({str(err).splitlines()[0][:120]}); {memory.REMEDY}.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
