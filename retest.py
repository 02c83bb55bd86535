"""
Test a trained few-shot run again, on episodes of other sizes: more shots, more queries, or as many
classes as it was trained to tell apart, without training it again.

    python retest.py runs/omniglot-hebbian --shot 5                 # the 1-shot default, tested 5-shot
    python retest.py runs/omniglot-hebbian --way 10                 # trained on 10 classes: test 10-way
    python train.py --task omniglot --train-way 20 --out-dir r && python retest.py r/omniglot-hebbian --way 20

The run's best.pt is tested as train.py's final test tests it: fresh episodes of its own test classes,
the same ones for the same seed, number and kind of device (the run's own seed and number by default, so
that retesting at the run's own sizes on its kind of device gives its results.json again; a run trained
at a batch other than 128 by commit 5114021 or earlier drew its test episodes in batches of its own, so
it gets other episodes: see train.EVAL_DRAW), and for a plastic rule the same episodes with plasticity
knocked out (eta = 0). A model's labels name at most the classes of its training episodes (its
train_way, the width of its label input), so --way goes up to that. More shots or queries make longer
episodes: a model without position embeddings (Omniglot's default) reads any length; one with them
reads at most the length it learned.

It prints one line and writes <run>/retest-<way>way-<shot>shot-<query>query.json: the test's numbers,
the options, the device, the PyTorch version and the time. Retesting with the same options and seed gives the same numbers,
so the file is replaced. A file of other episodes (another seed, number of episodes or kind of device,
as a quick check of 20 episodes on a CPU would be) is refused before the test, unless --overwrite: a
retest to report is never erased by another. The run's own files are never touched.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from dataclasses import dataclass

import torch

from plastic import Config, PlasticGPT
from report import same_episodes, with_options_added
from tasks import FEW_SHOT, TaskConfig
from train import (HelpFormatter, Parser, TrainConfig, UsageError, check_numbers, command_line_help, device_name,
                   field_comments, final_evaluations, final_fingerprint, load_task, pick_device, protocol_note,
                   set_cpu_threads, summarise_test, write_json)


@dataclass
class RetestConfig:
    run: str = ""  # a run folder train.py wrote (<out-dir>/<task>-<rule>/, with config.json and best.pt)
    way: int | None = None  # classes per test episode; None: the run's own; at most its training episodes' classes
    shot: int | None = None  # labelled support images per class; None: the run's own
    query: int | None = None  # queries per class; None: the run's own
    test_episodes: int | None = None  # fresh test episodes; None: the run's own (1,000 for results to report)
    seed: int | None = None  # seeds the test episodes (seed + 2, as in train.py); None: the run's own seed
    batch_size: int | None = None  # episodes per forward pass; None: the run's training batch
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    data_dir: str | None = None  # folder with omniglot/ and cifar100/; None: $PLASTIC_DATA or ./data
    overwrite: bool = False  # replace a retest file of other episodes (seed, number, kind of device); without it such a file is refused


def read_run(run_dir: str) -> dict:
    """config.json of a finished or stopped run folder that holds best.pt; a UsageError (one sentence) otherwise."""
    if not os.path.exists(run_dir):
        raise UsageError(f"there is no {run_dir}; give a run folder that train.py wrote (<out-dir>/<task>-<rule>/).")
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is a file; give the run folder that train.py wrote (<out-dir>/<task>-<rule>/), "
                         f"not a file in it.")
    for name in ("config.json", "best.pt"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise UsageError(f"{run_dir} holds no {name}; give a run folder that train.py wrote "
                             "(<out-dir>/<task>-<rule>/) after its first validation.")
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"{run_dir}/config.json is not readable JSON ({err}); give a run folder that train.py "
                         "wrote, or train the run again.") from err
    if not (isinstance(config, dict) and all(isinstance(config.get(k), dict) for k in ("train", "model", "task"))
            and "name" in config["task"]):
        raise UsageError(f"{run_dir}/config.json is not a train.py run's config (train, model and task); give a run "
                         "folder that train.py wrote.")
    return config


def retest_task(saved_task: dict, rc: RetestConfig) -> TaskConfig:
    """The run's task with the asked sizes. train_way stays the run's: it is the width of the model's labels.
    train_shot goes (the training episodes take the test's shot): a retest draws no training episode, and a
    size too large for the images is then named by the options retest.py has (--shot, --query)."""
    trained_way = saved_task["train_way"] or saved_task["way"]
    way = rc.way or saved_task["way"]
    if way > trained_way:
        raise UsageError(f"the run was trained on episodes of {trained_way} classes, so its labels name at most "
                         f"{trained_way}; test --way {trained_way} or fewer (train with --train-way {way} to test {way}-way).")
    options = dict(way=way, train_way=trained_way, train_shot=None, shot=rc.shot or saved_task["shot"],
                   query=rc.query or saved_task["query"], data_dir=rc.data_dir)
    try:
        return TaskConfig(**saved_task | options)
    except ValueError as err:
        raise UsageError(str(err)) from err


def retest_model(model_cfg: Config, task) -> Config:
    """The run's model, reading the test episodes: without position embeddings no parameter depends on the
    length, so max_len grows to theirs; with them the learned length is the limit."""
    tokens = task.ways["test"] * (task.cfg.shot + task.cfg.query)  # a test episode's
    if tokens > model_cfg.max_len:
        if model_cfg.positions:
            raise UsageError(f"the run learned position embeddings for episodes of up to {model_cfg.max_len} tokens, "
                             f"and these have {tokens}; ask for fewer shots or queries.")
        model_cfg = dataclasses.replace(model_cfg, max_len=tokens)
    return model_cfg


def check_replaceable(path: str, test: dict, overwrite: bool) -> None:
    """A retest file is replaced by a test of the same episodes (report.same_episodes: its own numbers again;
    `test` holds the new one's task, test_episodes and fingerprint) or with --overwrite; one that is not of
    these episodes, or cannot be read, is refused in one sentence (a UsageError)."""
    if overwrite or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise UsageError(f"{path} holds something retest.py cannot read as a retest; move it, or pass --overwrite to "
                         f"replace it.")
    if not same_episodes(old | dict(split=None), test | dict(split=None)):  # one run's folder: one split
        raise UsageError(f"{path} holds a retest of other episodes, {old.get('test_episodes')} test episodes of seed "
                         f"{old.get('seed')} on {old.get('device')}: move it, or pass --overwrite to replace it.")


def retest(rc: RetestConfig) -> dict:
    """Test rc.run's best.pt on the asked episodes; print one line, write and return retest-*.json's contents."""
    config = read_run(rc.run)
    if config["task"]["name"] not in FEW_SHOT:
        raise UsageError(f"{rc.run} is a {config['task']['name']} run; retest.py retests few-shot runs ({', '.join(FEW_SHOT)}).")
    defaults = dict(model=dataclasses.asdict(Config()), task=dataclasses.asdict(TaskConfig()))
    saved = with_options_added(config, defaults)
    try:  # a config.json edited by hand, or written by another version of the code
        task_cfg, saved_model, saved_train = retest_task(saved["task"], rc), Config(**saved["model"]), config["train"]
        tc = TrainConfig(rule=saved_model.rule, seed=saved_train["seed"] if rc.seed is None else rc.seed,
                         test_episodes=rc.test_episodes or saved_train["test_episodes"],
                         batch_size=rc.batch_size or saved_train["batch_size"], amp=saved_train.get("amp", False),
                         device=rc.device)
    except UsageError:  # the asked sizes: its own sentence
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{rc.run}/config.json is not one this code reads ({type(err).__name__}: {err}); retest the "
                         "run with the code that trained it.") from err
    task = load_task(task_cfg)
    model_cfg = retest_model(saved_model, task)
    device = pick_device(tc.device)
    set_cpu_threads(tc, device)
    model = PlasticGPT(model_cfg)
    try:
        best = torch.load(os.path.join(rc.run, "best.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])
        best_step = best["step"]
    except Exception as err:  # a truncated file, weights of another model, or no step (not one train.py wrote)
        raise UsageError(f"{rc.run}/best.pt is not a readable checkpoint of this run's model ({type(err).__name__}); "
                         "train the run again.") from err
    model.to(device)

    way, shot, query = task.ways["test"], task.cfg.shot, task.cfg.query
    path = os.path.join(rc.run, f"retest-{way}way-{shot}shot-{query}query.json")
    fingerprint = final_fingerprint(task, tc, device)
    check_replaceable(path, dict(task=task.name, test_episodes=tc.test_episodes, **fingerprint), rc.overwrite)
    started = time.perf_counter()
    values, trace, knocked = final_evaluations(model, task, tc, device)
    seconds = time.perf_counter() - started
    summary, line = summarise_test(values, trace, knocked, fingerprint, task)
    results = dict(run=rc.run, task=task.name, rule=model_cfg.rule, way=way, shot=shot,
                   query=query, train_way=task.ways["train"], seed=tc.seed, best_step=best_step, metric=task.metric_name,
                   **summary, device=device_name(device), torch=torch.__version__, seconds=seconds)
    queries = "1 query" if query == 1 else f"{query} queries"
    print(f"{task.name} {way}-way {shot}-shot, {queries} per class, rule "
          f"{model_cfg.rule}: {line}{protocol_note(tc.test_episodes)}")
    try:
        write_json(path, results)
    except OSError as err:
        raise UsageError(f"cannot write {path} ({err.strerror}); the numbers are printed above.") from err
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command line, one option per field of RetestConfig, its comment the help."""
    parser = Parser(description="Test a trained few-shot run again on episodes of other sizes.",
                    epilog="example: python retest.py runs/omniglot-hebbian --shot 5", formatter_class=HelpFormatter)
    hints, comments = typing.get_type_hints(RetestConfig), field_comments(RetestConfig)
    for f in dataclasses.fields(RetestConfig):
        if f.name == "run":
            parser.add_argument("run", help=command_line_help(comments["run"]))
            continue
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])  # int | None -> int
        if kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true",
                                help=command_line_help(comments[f.name]))
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                            metavar=kind.__name__.upper(), help=command_line_help(comments[f.name]))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_numbers(vars(args))
        retest(RetestConfig(**vars(args)))
    except UsageError as err:
        print(f"retest.py: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
