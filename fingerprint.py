"""
Give few-shot tests from before images_md5 was kept (commit 96ebd97) their images_md5, so that
report.py --paired pairs them with runs trained on other numbers of classes.

    python fingerprint.py results/isolated/omniglot-20way     # every few-shot test below the folder

A test's episodes are named by the md5 of their targets (episodes_md5), of their tokens and images
(inputs_md5) and of their images (images_md5; train.episodes_fingerprint). The tokens show the support
labels as wide as the model's training episodes, so two runs trained on other numbers of classes have
other inputs_md5 for the same episodes, and only images_md5 says they are the same. This draws each
test's episodes again (a results.json's: its run's test; a retest-*.json's: its sizes, seed and
number; a pre-training's: its encoder's test) with the run's config.json and data, and adds images_md5
only where the episodes drawn again give the stored episodes_md5 and, where it was kept, inputs_md5:
proof that they are the episodes that were scored. Draws depend on the kind of device (a CPU's differ
from a GPU's), so run it where the tests ran; tests it cannot reproduce are listed and left as they
are. Nothing else in a file changes.
"""

import dataclasses
import json
import os
import sys

import torch

from plastic import Config
from pretrain import PretrainConfig
from report import with_options_added
from retest import RetestConfig, retest_task
from tasks import FEW_SHOT, TaskConfig
from train import Parser, UsageError, device_name, episodes_fingerprint, load_task, pick_device, write_json


def tests_below(folder: str):
    """(file, run folder) of every results.json beside a config.json, and every retest-*.json, below folder."""
    for root, _, files in sorted(os.walk(folder)):
        if "config.json" not in files:
            continue
        for name in sorted(files):
            if name == "results.json" or (name.startswith("retest-") and name.endswith(".json")):
                yield os.path.join(root, name), root


def episodes_of(file: str, test: dict, config: dict, data_dir) -> tuple[TaskConfig, int, int]:
    """The task config, seed and number of the episodes that `test` (file's contents) scored."""
    if "train" not in config:  # pretrain.py's folder: its options, flat
        task_cfg = dataclasses.replace(PretrainConfig(**config).task_config(), data_dir=data_dir)
        return task_cfg, config["seed"], test["test_episodes"]
    saved = with_options_added(config, dict(model=dataclasses.asdict(Config()), task=dataclasses.asdict(TaskConfig())))
    if os.path.basename(file) == "results.json":  # train.py's final test: the run's own sizes, seed + 2
        task_cfg = TaskConfig(**saved["task"] | dict(data_dir=data_dir))
        return task_cfg, config["train"]["seed"], test["test_episodes"]
    sizes = RetestConfig(way=test["way"], shot=test["shot"], query=test["query"], data_dir=data_dir)
    return retest_task(saved["task"], sizes), test["seed"], test["test_episodes"]


def add_images_md5(file: str, run: str, device: torch.device, data_dir=None, tasks=None) -> str:
    """Add images_md5 to file's test if its episodes drawn again reproduce its stored md5s; what was done,
    in a few words. `tasks` caches loaded tasks by config across calls."""
    tasks = {} if tasks is None else tasks
    try:
        with open(file) as f:
            test = json.load(f)
        with open(os.path.join(run, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        return f"cannot read it or its run's config.json ({err}): left alone"
    if not isinstance(test, dict) or not isinstance(config, dict):
        return "it or its run's config.json is not a JSON object: left alone"
    if test.get("images_md5"):
        return "has images_md5"
    if test.get("task") not in FEW_SHOT:
        return "not a few-shot test: left alone"
    if not test.get("by_episode") or "episodes_md5" not in test:
        return "keeps no per-episode scores, so nothing pairs with it: left alone"
    try:
        task_cfg, seed, episodes = episodes_of(file, test, config, data_dir)
    except (TypeError, KeyError) as err:
        return f"its run's config.json is not one this code reads ({err!r}): left alone"
    key = json.dumps(dataclasses.asdict(task_cfg), sort_keys=True)
    if key not in tasks:
        tasks[key] = load_task(task_cfg)
    drawn = episodes_fingerprint(tasks[key], "test", episodes, device, seed + 2)
    stored = {k: test[k] for k in ("episodes_md5", "inputs_md5") if k in test}
    if any(drawn[k] != v for k, v in stored.items()):
        return (f"not reproduced (tested on {test.get('device')}, drawn again on {device_name(device)}): "
                f"left alone")
    write_json(file, test | dict(images_md5=drawn["images_md5"]))
    return f"images_md5 added ({' and '.join(stored)} reproduced)"


def main(argv=None) -> int:
    parser = Parser(description="Add images_md5 to few-shot tests kept before it, where their episodes reproduce.")
    parser.add_argument("folder", help="a folder of run folders (results/..., runs)")
    parser.add_argument("--device", default="auto", help="where to draw the episodes: the kind the tests ran on")
    parser.add_argument("--data-dir", default=None, help="folder with omniglot/ and cifar100/; unset: $PLASTIC_DATA or ./data")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not os.path.isdir(args.folder):
            raise UsageError(f"{args.folder} is not a folder; give a folder of run folders, such as results.")
        device, tasks, found = pick_device(args.device), {}, 0
        for file, run in tests_below(args.folder):
            print(f"{file}: {add_images_md5(file, run, device, args.data_dir, tasks)}", flush=True)
            found += 1
        if not found:
            raise UsageError(f"{args.folder} holds no test (a results.json or retest-*.json beside a config.json) at "
                             "any depth; give a folder of run folders, such as results.")
    except UsageError as err:
        print(f"fingerprint.py: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
