"""python results/queries/alone.py RUN_FOLDER: a few-shot run's best.pt tested on the episodes of its final test
(the same seed), with every query isolated (--isolate-queries), whatever the run was trained with."""
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
import train  # noqa: E402
from plastic import Config, PlasticGPT  # noqa: E402
from tasks import TaskConfig  # noqa: E402

run_dir = sys.argv[1]
cfg = json.load(open(os.path.join(run_dir, "config.json")))
task = train.load_task(dataclasses.replace(TaskConfig(**cfg["task"]), isolate_queries=True))
model = PlasticGPT(Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["model"].items()}))
model.load_state_dict(torch.load(os.path.join(run_dir, "best.pt"), map_location="cpu", weights_only=True)["model"])
values, trace, _ = train.final_evaluations(model, task, train.TrainConfig(**cfg["train"]), "cpu")
mean, ci = train.mean_ci95(values)
by_position = [v for v in train.metric_by_position(trace) if v is not None]
print(f"queries isolated: {mean:.4f} ± {ci:.4f} over {values.numel()} episodes; "
      f"by query position {' '.join(f'{v:.4f}' for v in by_position)}")
