"""
Pre-train the Conv4 image encoder as a plain classifier of every training class at once, for a few-shot
run to start from (train.py --init-encoder). Whole-class pre-training is what the strongest simple
few-shot baselines rest on (Chen et al. 2019, "A closer look at few-shot classification"; Tian et al.
2020, "Rethinking few-shot image classification"; Chen et al. 2021, Meta-Baseline): a classifier of 64
classes sees every training image against all the others, an episode only against four.

    python pretrain.py --task cifar_fs                      # writes runs/pretrain-cifar_fs/
    python train.py --task cifar_fs --init-encoder runs/pretrain-cifar_fs

Each step classifies --batch-size training images, augmented as train.py's training episodes are, among
all the split's training classes (CIFAR-FS's 64; Omniglot's 4,112 on Vinyals's split, 1,028 characters
in four rotations) by a linear layer on the encoder's features. The linear layer is dropped afterwards.
Validation scores the encoder alone as a nearest-prototype few-shot classifier (prototype_accuracy: each
query takes the class of the support set's mean feature nearest in cosine similarity, as Meta-Baseline's
Classifier-Baseline is tested) on the validation episodes train.py validates on; the best encoder (with
--train-on-val, which classifies the validation classes too, the last) is kept in best.pt and scored the
same way on train.py's test episodes of the same seed, so that
`python report.py --paired` compares it with a run's model, episode by episode.

The folder <out-dir>/pretrain-<task>/ holds config.json, log.jsonl, best.pt (the encoder as "encoder.*",
what --init-encoder reads, and the classifier as "classifier.*") and results.json. Pre-training takes
seconds to minutes on a GPU, so it has no --resume: an existing folder is replaced only with --overwrite.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memory import is_out_of_memory
from plastic import Config, Conv4
from tasks import FEW_SHOT, OMNIGLOT_SPLITS, TaskConfig
from train import (PROTOCOL_EPISODES, SMOKE_RUN, TASK_DEFAULTS, Diverged, HelpFormatter, Parser, UsageError,
                   check_numbers, check_warmup, command_line_help, deterministic_algorithms, device_name, draws,
                   episodes_fingerprint, field_comments, is_smoke_run, kept_note, learning_rate, load_task, mean_ci95,
                   optional, pick_device, protocol_note, save_checkpoint, set_cpu_threads, smoke_note, write_json)


@dataclass
class PretrainConfig:
    task: str = "cifar_fs"  # omniglot | cifar_fs: whose training classes the encoder learns to tell apart
    split: str = "vinyals"  # omniglot's class split: vinyals | lake (as train.py's --split)
    train_on_val: bool = False  # classify the validation classes too, as train.py's --train-on-val (Vinyals's split: 4,800 classes; CIFAR-FS: 80); validation then chooses nothing, and the last encoder is kept
    steps: int = 4000  # optimizer steps
    batch_size: int = 256  # training images per step
    lr: float = 1e-3  # peak learning rate of AdamW (train.py's schedule: linear warm-up, then cosine decay)
    warmup: int | None = None  # steps of linear warm-up; None: 5% of steps
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW weight decay
    augment: bool = True  # training images shifted at random (CIFAR-FS's also mirrored), as in train.py's episodes
    jitter: float = 0.0  # cifar_fs: colour jitter of the training images, as train.py's --jitter
    encoder_channels: int = 64  # channels of each Conv4 block, as train.py's --encoder-channels
    encoder_widths: tuple[int, ...] | None = None  # the four blocks' channels, as train.py's --encoder-widths; None: encoder_channels in each
    way: int = 5  # validation and test episodes: classes per episode
    shot: int = 1  # validation and test episodes: support images per class
    query: int | None = None  # validation and test episodes: query images per class; None: the task's default, as train.py's
    eval_interval: int = 500  # steps between validations
    eval_episodes: int | None = None  # validation episodes (train.py's: the same ones, seed + 1); None: 500, or 100 in a smoke run (under 100 steps), as train.py's
    test_episodes: int | None = None  # test episodes (train.py's: the same ones, seed + 2, for report.py --paired); None: 1000, or 100 in a smoke run (under 100 steps)
    seed: int = 0  # seeds the classifier's initialisation and the training images; seed + 1 and + 2 the episodes
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    threads: int | None = None  # CPU threads of PyTorch; None: $OMP_NUM_THREADS where it is a positive number, else half the cores, at least 1
    data_dir: str | None = None  # folder with omniglot/ and cifar100/; None: $PLASTIC_DATA or ./data
    out_dir: str = "runs"  # writes <out_dir>/pretrain-<task>/
    overwrite: bool = False  # replace an earlier pre-training in that folder
    deterministic: bool = False  # deterministic kernels, as train.py's --deterministic: a run repeats bit for bit on one GPU, where two runs differed by 0.39 test points; off by default, as they are 16-19% slower on an H200

    def task_config(self) -> TaskConfig:
        """The episodes train.py would validate and test on with these way, shot and query (None: the task's
        default), and its training images' augmentation."""
        query = TASK_DEFAULTS[self.task]["query"] if self.query is None else self.query
        return TaskConfig(name=self.task, way=self.way, shot=self.shot, query=query,
                          omniglot_split=self.split, train_on_val=self.train_on_val, augment=self.augment,
                          jitter=self.jitter, data_dir=self.data_dir)

    def widths(self) -> tuple[int, int, int, int]:
        """The four Conv4 blocks' channels, as train.py's model builds them (Config checks encoder_widths)."""
        return Config(encoder_channels=self.encoder_channels, encoder_widths=self.encoder_widths).conv4_widths()


# ----------------------------------------------------------------------------------------------
# The classifier, its training images, and the nearest-prototype score


class Classifier(nn.Module):
    """The Conv4 encoder and a linear layer from its features to every training class."""

    def __init__(self, image_shape, widths, classes):
        super().__init__()
        self.encoder = Conv4(image_shape[0], widths)
        self.classifier = nn.Linear(Conv4.out_features(image_shape, widths), classes)

    def forward(self, images):  # (n, C, H, W) -> logits (n, classes)
        return self.classifier(self.encoder(images))


def sample_images(task, batch_size, device, generator=None):
    """batch_size training images, each a uniformly drawn image of a uniformly drawn training class, prepared
    as the task's training episodes are (augmented, normalised): images (n, C, H, W) and their classes (n,),
    each class's index in the training split."""
    data = task.split_images("train", device)                              # (classes, per_class, C, H, W) uint8
    classes = torch.randint(data.shape[0], (batch_size,), device=device, generator=generator)   # (n,)
    picks = torch.randint(data.shape[1], (batch_size,), device=device, generator=generator)     # (n,)
    return task.prepare(data[classes, picks], "train", generator), classes


def prototype_accuracy(features, labels, mask, way):
    """Each episode's accuracy (B,) when every query takes the label of the nearest prototype in cosine
    similarity, a prototype being the mean feature of a class's support images.
    features (B, T, D), labels (B, T) in 0..way-1, mask (B, T) True at the queries."""
    support = F.one_hot(labels, way).to(features.dtype) * ~mask[..., None]          # (B, T, N) support one-hots
    prototypes = support.transpose(1, 2) @ features / support.sum(1)[..., None]      # (B, N, D) class means
    similarity = F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)   # (B, T, N)
    correct = (similarity.argmax(-1) == labels) & mask                               # (B, T)
    return correct.sum(1) / mask.sum(1)                                             # (B,)


@torch.no_grad()
def evaluate_prototypes(encoder, task, split, episodes, device, seed):
    """The encoder (in eval mode) as a nearest-prototype classifier on train.py's seeded episodes of
    `split`: the per-episode accuracy (episodes,)."""
    encoder.eval()
    scores = []
    for batch in draws(task, split, episodes, device, seed):
        B, T = batch.target.shape
        features = encoder(batch.images.flatten(0, 1)).view(B, T, -1)              # (B, T, D)
        scores.append(prototype_accuracy(features, batch.target, batch.mask, task.ways[split]))
    encoder.train()
    return torch.cat(scores).cpu()


# ----------------------------------------------------------------------------------------------
# Pre-training


def run_folder(pc: PretrainConfig) -> str:
    return os.path.join(pc.out_dir, f"pretrain-{pc.task}")


RUN_FILES = ("config.json", "log.jsonl", "best.pt", "results.json")  # what a pre-training writes into its folder
# results.json as train.py's, rule "prototypes" (report.py gives it a column) and params the encoder's alone


def make_run_dir(pc: PretrainConfig) -> str:
    """The run folder, created; an earlier pre-training in it is refused, or with --overwrite its files removed."""
    run_dir = run_folder(pc)
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
    if earlier and not pc.overwrite:
        raise UsageError(f"{run_dir} holds a pre-training already; replace it with --overwrite, or choose another --out-dir.")
    try:
        os.makedirs(run_dir, exist_ok=True)
        for name in earlier:
            os.remove(os.path.join(run_dir, name))
    except OSError as err:
        raise UsageError(f"cannot write the folder {run_dir} ({err.strerror}); choose another --out-dir.") from err
    return run_dir


SMOKE_EPISODES = {k: SMOKE_RUN[k] for k in PROTOCOL_EPISODES}  # what a smoke run (under 100 steps) shrinks here: not the batch


def resolve(pc: PretrainConfig) -> PretrainConfig:
    """The options left at None filled as train.py fills them (the protocol's episodes, or a smoke run's; a
    warm-up of 5% of the steps), and every option checked."""
    if pc.task not in FEW_SHOT:
        raise UsageError(f"pretrain.py pre-trains an image encoder: --task must be one of {', '.join(FEW_SHOT)}, not {pc.task}.")
    episodes = PROTOCOL_EPISODES | (SMOKE_EPISODES if is_smoke_run(pc) else {})
    pc = dataclasses.replace(pc, **{k: v for k, v in episodes.items() if getattr(pc, k) is None})
    check_numbers(dataclasses.asdict(pc))  # seed, weight decay and jitter may be 0, jitter at most 1, the rest above 0
    pc = dataclasses.replace(pc, warmup=pc.steps // 20 if pc.warmup is None else pc.warmup)
    check_warmup(pc.warmup, pc.steps)
    return pc


def pretrain_encoder(pc: PretrainConfig) -> dict:
    """Pre-train, validate and keep the best encoder, test it; write the folder and return results.json's contents."""
    pc = resolve(pc)
    try:
        task_cfg, widths = pc.task_config(), pc.widths()
    except ValueError as err:
        raise UsageError(str(err)) from err
    task = load_task(task_cfg)
    device = pick_device(pc.device)
    set_cpu_threads(pc, device)
    run_dir = make_run_dir(pc)
    config = json.loads(json.dumps(dataclasses.asdict(pc)))
    write_json(os.path.join(run_dir, "config.json"), config)

    torch.manual_seed(pc.seed)
    classes = task.splits["train"].shape[0]
    model = Classifier(task.image_shape, widths, classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    generator = torch.Generator(device=device).manual_seed(pc.seed)
    print(f"pre-training the {'-'.join(map(str, widths))} Conv4 of {task.name} on its {classes} training classes: "
          f"{pc.steps} steps of {pc.batch_size} images on {device_name(device)}; writing {run_dir}", flush=True)
    if note := smoke_note(pc, SMOKE_EPISODES):
        print(note)
    best, started, pending = dict(value=None, step=0), time.perf_counter(), []
    with open(os.path.join(run_dir, "log.jsonl"), "w") as log:
        interval_start = time.perf_counter()
        for step in range(1, pc.steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, pc)
            images, labels = sample_images(task, pc.batch_size, device, generator)
            logits = model(images)                                               # (n, classes)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pending.append(torch.stack([loss.detach(), (logits.argmax(1) == labels).float().mean()]))
            validate = step % pc.eval_interval == 0 or step == pc.steps
            if not (validate or step % 100 == 0 or step == 1):
                continue
            losses, accuracies = torch.stack(pending).T.tolist()  # the one sync of the interval
            bad = [i for i, value in enumerate(losses) if not math.isfinite(value)]
            if bad:
                raise Diverged(f"the loss became {losses[bad[0]]} at step {step - len(losses) + 1 + bad[0]}; "
                               f"lower --lr (now {pc.lr}).")
            ms_per_step = 1000 * (time.perf_counter() - interval_start) / len(pending)
            record = dict(split="train", step=step, loss=sum(losses) / len(losses),
                          metric=sum(accuracies) / len(accuracies), ms_per_step=ms_per_step)
            print(f"step {step}/{pc.steps} | loss {record['loss']:.4g} | accuracy {record['metric']:.4g} "
                  f"({classes} classes) | {ms_per_step:.1f} ms/step", flush=True)
            log.write(json.dumps(record) + "\n")
            pending = []
            if validate:
                value, ci = mean_ci95(evaluate_prototypes(model.encoder, task, "val", pc.eval_episodes, device, pc.seed + 1))
                is_best = pc.train_on_val or best["value"] is None or value > best["value"]  # --train-on-val: the last
                if is_best:
                    best = dict(value=value, step=step)
                    save_checkpoint(os.path.join(run_dir, "best.pt"), dict(model=model.state_dict(), step=step, config=config))
                print(f"val step {step} | nearest-prototype accuracy {value:.4g} ± {ci:.2g}"
                      f"{kept_note(pc.train_on_val, is_best)}")
                log.write(json.dumps(dict(split="val", step=step, metric=value, ci95=ci, best=is_best)) + "\n")
            log.flush()
            interval_start = time.perf_counter()
    train_time = time.perf_counter() - started

    model.load_state_dict(torch.load(os.path.join(run_dir, "best.pt"), map_location=device, weights_only=True)["model"])
    values = evaluate_prototypes(model.encoder, task, "test", pc.test_episodes, device, pc.seed + 2)
    mean, ci = mean_ci95(values)
    results = dict(task=task.name, rule="prototypes", params=sum(p.numel() for p in model.encoder.parameters()),
                   way=pc.way, shot=pc.shot, query=task.cfg.query, metric="accuracy", test_mean=mean, test_ci95=ci, test_episodes=values.numel(),
                   **episodes_fingerprint(task, "test", pc.test_episodes, device, pc.seed + 2),
                   by_episode=[round(v, 6) for v in values.tolist()], best_step=best["step"], best_val=best["value"],
                   train_time_s=train_time, device=device_name(device), torch=torch.__version__, run_dir=run_dir,
                   config=config)
    print(f"test nearest-prototype accuracy {mean:.4g} ± {ci:.2g} over {values.numel()} {pc.way}-way {pc.shot}-shot "
          f"episodes{protocol_note(pc.test_episodes)}; the encoder for --init-encoder: {run_dir}")
    write_json(os.path.join(run_dir, "results.json"), results)
    return results


def pretrain(pc: PretrainConfig) -> dict:
    """pretrain_encoder(), with deterministic kernels where --deterministic asks."""
    with deterministic_algorithms(pc.deterministic):
        return pretrain_encoder(pc)


# ----------------------------------------------------------------------------------------------
# The command line, one flag per field of PretrainConfig, help from its comment


CHOICES = dict(task=FEW_SHOT, split=OMNIGLOT_SPLITS)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="Pre-train the Conv4 image encoder on every training class, for train.py --init-encoder.",
                    epilog="example: python pretrain.py --task cifar_fs; then python train.py --task cifar_fs "
                           "--init-encoder runs/pretrain-cifar_fs", formatter_class=HelpFormatter)
    hints, comments = typing.get_type_hints(PretrainConfig), field_comments(PretrainConfig)
    for f in dataclasses.fields(PretrainConfig):
        kind, args = hints[f.name], typing.get_args(hints[f.name])
        options = dict(default=f.default, help=command_line_help(comments.get(f.name, "")))
        if type(None) in args:
            kind = next(a for a in args if a is not type(None))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            options.update(nargs="+", type=typing.get_args(kind)[0], metavar="I")
        elif f.name in CHOICES:
            options["choices"] = CHOICES[f.name]
        else:
            options.update(type=optional(kind) if type(None) in args else kind, metavar=kind.__name__.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), **options)
    return parser


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    try:
        pretrain(PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}))
    except UsageError as err:
        print(f"pretrain.py: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        print(f"pretrain.py: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pretrain.py: stopped by Ctrl-C; best.pt, if written, holds the best encoder so far.", file=sys.stderr)
        return 130
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        print(f"pretrain.py: the memory ran out ({str(err).splitlines()[0][:120]}); lower --batch-size (now "
              f"{args['batch_size']}), and start again with --overwrite.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
