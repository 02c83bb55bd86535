"""Tasks for the plastic GPT: synthetic sequences, few-shot episodes, and the real dataset loaders.

    python -c "import tasks; b = tasks.make_task('copy').sample(4); print(b.x.shape, b.target.shape)"

A task samples a whole batch at once, on the device it is asked for, and returns a Batch: the token
inputs, the images (few-shot tasks only), the targets and a mask of the positions that count for the
loss and the metric. `make_task(name, **options)` builds any task; the task tells the model the sizes
it needs (`d_in`, `d_out`, `image_shape`, `seq_len`).

Omniglot and CIFAR-100 are read from their official archives in `<data_dir>/omniglot/` and
`<data_dir>/cifar100/` (data_dir: argument, else $PLASTIC_DATA, else ./data), downloaded when missing,
decoded once and cached as uint8 arrays beside the archives (or in $PLASTIC_CACHE, else
~/.cache/plastic, when that folder is read-only).
"""

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import time
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

TASKS = ("copy", "regression", "cue_reward", "omniglot", "cifar_fs")
FEW_SHOT = ("omniglot", "cifar_fs")  # the image tasks: few-shot episodes of classes split into train, val and test
SPLITS = ("train", "val", "test")
OMNIGLOT_SPLITS = ("vinyals", "lake")


# The options each task reads; given to a task that does not read them, they are refused (TaskConfig), not
# recorded in config.json as if they had done something. The other options act on every task.
TASK_OPTIONS = {
    ("copy",): ("seq_len", "delay", "dim"),
    ("regression",): ("n_train", "n_test", "x_dim", "mode", "mlp_hidden", "noise"),
    ("cue_reward",): ("n_cues", "cue_dim", "trial_len", "cue_noise"),
    FEW_SHOT: ("way", "train_way", "shot", "train_shot", "query", "isolate_queries", "train_on_val", "augment", "jitter",
               "data_dir"),
    ("omniglot",): ("rotations", "omniglot_split"),
}


def option_flag(name: str, value=None) -> str:
    """The command-line flag that sets option name (a field of TaskConfig, or of train.py's other configs) to
    value: --shot 5, --no-augment, --split lake; with value None the flag alone (--eta)."""
    option = "--" + {"omniglot_split": "split", "name": "task"}.get(name, name).replace("_", "-")
    if isinstance(value, bool):
        return option if value else option.replace("--", "--no-", 1)
    if isinstance(value, (list, tuple)):  # --plastic-blocks 1 3
        value = " ".join(map(str, value))
    return option if value is None else f"{option} {value}"


@dataclass
class TaskConfig:
    name: str = "omniglot"          # copy | regression | cue_reward | omniglot | cifar_fs
    # copy (Duan et al. 2023: store a sequence, wait, recall it)
    seq_len: int = 20               # copy: vectors to store, and recall steps
    delay: int = 20                 # copy: blank steps between the last store and the first recall
    dim: int = 1                    # copy: size of each stored vector, values in [-1, 1]
    # regression (a fresh random function per sequence)
    n_train: int = 20               # regression: points shown with their y
    n_test: int = 20                # regression: points whose y must be predicted
    x_dim: int = 12                 # regression: size of each x, values in [-1, 1]
    mode: str = "linear"            # regression: "linear" map or "mlp" (one tanh hidden layer)
    mlp_hidden: int = 2             # regression, mode "mlp": tanh units of the random function
    noise: float = 0.1              # regression: std of the Gaussian noise on the shown y
    # cue_reward (Duan et al. 2023: learn which cue gives which reward, then recall it)
    n_cues: int = 5                 # cue_reward: distinct cues per sequence, each with its reward
    cue_dim: int = 14               # cue_reward: size of a cue vector, values in [0, 1]
    trial_len: int = 20             # cue_reward: steps; the first half shows rewards, the second asks
    cue_noise: float = 0.1          # cue_reward: std of the Gaussian noise on every cue presentation
    # few-shot classification (omniglot, cifar_fs)
    way: int = 5                    # classes per episode (N)
    train_way: int | None = None    # classes per training episode (at least way; more classes to tell apart, as Prototypical Networks train 60-way); validation and test stay way-way; None: way (the command line's per-task default holds at one training shot; at more training shots, or a --way above it, way)
    shot: int = 1                   # labelled support images per class (K)
    train_shot: int | None = None   # support images per class in training episodes; validation and test keep shot; None: shot (at --train-shot 1, Omniglot's default on the command line, --shot 5 trains on 1-shot episodes and picks and tests its checkpoint at 5 shots)
    query: int = 1                  # unlabelled query images per class (Q)
    isolate_queries: bool = True    # few-shot: each query sees the support set and itself alone, not the other queries, and writes no fast weight (inductive, as published few-shot results are tested); off: queries see the earlier ones, and with one query per class the last one's class is the class the others lack (README, "Queries that see each other")
    rotations: bool = True          # omniglot: rotations by 90/180/270 add training classes
    train_on_val: bool = False      # few-shot: train on the validation classes too, as the published Omniglot figures train on Vinyals et al.'s 1,200 characters (Vinyals's split: 4,800 classes with rotations; Lake's: 3,856; CIFAR-FS: 80); validation then scores classes it trained on, so train.py tests the last model rather than choosing one
    omniglot_split: str = "vinyals" # omniglot classes: "vinyals" (1,028 / 172 / 423 characters of both archives: the split every paper and torchmeta report on) or "lake" (train on the background alphabets, test on the 20 evaluation alphabets, none seen in training)
    augment: bool = True            # training images shifted at random (and CIFAR-FS's also mirrored): AUGMENTATION; never in validation or test
    jitter: float = 0.0             # cifar_fs, with augment: training images' brightness, contrast and saturation each scaled by a factor in [1 - jitter, 1 + jitter], in random order (torchvision's ColorJitter(jitter, jitter, jitter); MetaOptNet trains CIFAR-FS at 0.4); 0: none
    data_dir: str | None = None     # folder with omniglot/ and cifar100/; None: $PLASTIC_DATA or ./data

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; choose one of {', '.join(TASKS)}.")
        for name in ("seq_len", "dim", "n_train", "n_test", "x_dim", "mlp_hidden", "n_cues",
                     "cue_dim", "shot", "query"):
            if getattr(self, name) < 1:
                raise ValueError(f"{option_flag(name, getattr(self, name))} must be at least 1.")
        for name in ("delay", "noise", "cue_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{option_flag(name, getattr(self, name))} must be 0 or more.")
        if self.trial_len < 2:
            raise ValueError(f"{option_flag('trial_len', self.trial_len)} must be at least 2 (a half to learn, a half to recall).")
        if self.mode not in ("linear", "mlp"):
            raise ValueError(f"unknown regression mode {self.mode!r}; choose linear or mlp.")
        if self.way < 2:
            raise ValueError(f"{option_flag('way', self.way)} must be at least 2 (one class is no classification).")
        if self.train_shot is not None and self.train_shot < 1:
            raise ValueError(f"{option_flag('train_shot', self.train_shot)} must be at least 1 (or left out: the same as --shot).")
        if self.train_way is not None and self.train_way < self.way:
            raise ValueError(f"{option_flag('train_way', self.train_way)} must be at least {option_flag('way', self.way)} (or left out: the same).")
        if self.train_on_val and self.name not in FEW_SHOT:
            raise ValueError(f"train_on_val adds the validation classes of a few-shot task to its training classes, "
                             f"and {self.name} has none; drop --train-on-val.")
        if self.omniglot_split not in OMNIGLOT_SPLITS:
            raise ValueError(f"unknown Omniglot split {self.omniglot_split!r}; choose one of {', '.join(OMNIGLOT_SPLITS)}.")
        if self.omniglot_split != "vinyals" and self.name != "omniglot":  # vinyals: the default, whatever the task
            raise ValueError(f"--split {self.omniglot_split} chooses Omniglot's classes and does nothing for "
                             f"{self.name}; drop --split.")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"{option_flag('jitter', self.jitter)} must be between 0 (no colour jitter) and 1.")
        if self.jitter and self.name != "cifar_fs":
            raise ValueError(f"{option_flag('jitter', self.jitter)} changes colours, and only cifar_fs has them; "
                             f"drop --jitter for {self.name}.")
        if self.jitter and not self.augment:
            raise ValueError(f"{option_flag('jitter', self.jitter)} is part of the training images' augmentation, which --no-augment "
                             f"turns off; drop one of them.")
        default = {f.name: f.default for f in fields(self)}
        for owners, names in TASK_OPTIONS.items():
            given = [k for k in names if getattr(self, k) != default[k]]
            if self.name not in owners and given:
                readers = f"the {owners[0]} task reads" if len(owners) == 1 else f"the few-shot tasks ({', '.join(owners)}) read"
                raise ValueError(f"{option_flag(given[0], getattr(self, given[0]))} does nothing for {self.name}: only "
                                 f"{readers} it; drop it.")


@dataclass
class Batch:
    x: Tensor                       # (B, T, d_in) float32 token inputs
    images: Tensor | None           # (B, T, C, H, W) float32 normalised images, or None
    target: Tensor                  # (B, T, d_out) float32 for MSE tasks; (B, T) int64 class ids for few-shot
    mask: Tensor                    # (B, T) bool: the positions that count for loss and metric
    context: int | None = None      # S: tokens S.. are queries that see tokens < S and themselves alone (the model's context=); None: a plain causal sequence

    def rows(self, start: int, stop: int) -> "Batch":
        """Episodes start..stop-1 of the batch, as a batch (evaluation runs its draws in slices)."""
        images = None if self.images is None else self.images[start:stop]
        return Batch(self.x[start:stop], images, self.target[start:stop], self.mask[start:stop], self.context)


def check_request(batch_size, split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} must be at least 1.")


class Task:
    """Base of every task: sizes for the model, and the loss and metric over the masked positions."""

    name: str
    d_in: int                       # size of a token's input vector
    d_out: int                      # size of the model's output per token
    image_shape: tuple[int, int, int] | None = None   # (C, H, W) of the images, None without images
    seq_len: int                    # tokens per sequence, T
    metric_name = "mse"             # "mse" or "accuracy"
    higher_is_better = False

    def __init__(self, cfg: TaskConfig):
        self.cfg, self.name = cfg, cfg.name

    def sample(self, batch_size, split="train", device="cpu", generator=None) -> Batch:
        raise NotImplementedError

    def loss(self, out, batch) -> Tensor:
        """Scalar: cross-entropy, or the MSE averaged over every masked element; out (B, T, d_out).
        A mask-weighted mean rather than out[mask]: no data-dependent shape, so no host sync, and the
        training step can be captured as a CUDA graph."""
        out, mask = out.float(), batch.mask.float()
        if self.metric_name == "accuracy":
            per_token = F.cross_entropy(out.transpose(1, 2), batch.target, reduction="none")  # (B, T)
        else:
            per_token = (out - batch.target).pow(2).mean(-1)                                  # (B, T)
        return (per_token * mask).sum() / mask.sum()

    def token_metric(self, out, batch) -> Tensor:
        """(B, T) each token's metric: 1 for a right class and 0 for a wrong one, or the squared error."""
        out = out.float()
        if self.metric_name == "accuracy":
            return (out.argmax(-1) == batch.target).float()
        return (out - batch.target).pow(2).mean(-1)

    def metric(self, out, batch) -> Tensor:
        """(B,) the accuracy or the MSE of each sequence, over its masked positions."""
        return (self.token_metric(out, batch) * batch.mask).sum(1) / batch.mask.sum(1)


class Copy(Task):
    """Store `seq_len` random vectors, wait `delay` blank steps, then reproduce them in order.

    Tokens are [value (dim), store flag, recall flag]. One sequence with seq_len=2, delay=1, dim=1:

        t   x                    target   mask
        0   [ 0.31, 1, 0]        [ 0.00]  False   store 0.31
        1   [-0.72, 1, 0]        [ 0.00]  False   store -0.72
        2   [ 0.00, 0, 0]        [ 0.00]  False   delay
        3   [ 0.00, 0, 1]        [ 0.31]  True    recall the first
        4   [ 0.00, 0, 1]        [-0.72]  True    recall the second
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.d_in, self.d_out = cfg.dim + 2, cfg.dim
        self.seq_len = 2 * cfg.seq_len + cfg.delay

    def sample(self, batch_size, split="train", device="cpu", generator=None):
        check_request(batch_size, split)
        B, T, L, D = batch_size, self.seq_len, self.cfg.seq_len, self.cfg.dim
        recall = L + self.cfg.delay                                  # first recall step
        rng = dict(device=device, generator=generator)
        values = torch.rand(B, L, D, **rng) * 2 - 1                  # (B, L, dim) the vectors to store
        x = torch.zeros(B, T, D + 2, device=device)
        x[:, :L, :D] = values
        x[:, :L, D] = 1                                              # store flag
        x[:, recall:, D + 1] = 1                                     # recall flag
        target = torch.zeros(B, T, D, device=device)
        target[:, recall:] = values
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        mask[:, recall:] = True
        return Batch(x, None, target, mask)


class Regression(Task):
    """In-context regression: `n_train` points (x, y) of a fresh random function, then `n_test` x alone.

    f is a random linear map (Gaussian weights) or, with mode "mlp", a random one-hidden-layer tanh
    network (pre-activations of unit variance within a sequence, about a bias of unit variance, so it is
    neither linear nor mostly saturated). Its outputs are standardised per sequence (zero mean, unit
    variance over the sequence's points); the shown y
    carry Gaussian noise, the targets do not. Tokens are [x (x_dim), y or 0, 1 if y is shown].
    One sequence with n_train=2, n_test=1, x_dim=1:

        t   x                   target   mask
        0   [ 0.50,  1.09, 1]   [ 1.02]  False   shown: y = f(0.50) + noise
        1   [-0.90, -1.30, 1]   [-1.36]  False
        2   [ 0.10,  0.00, 0]   [ 0.34]  True    predict f(0.10)
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.d_in, self.d_out = cfg.x_dim + 2, 1
        self.seq_len = cfg.n_train + cfg.n_test

    def sample(self, batch_size, split="train", device="cpu", generator=None):
        check_request(batch_size, split)
        B, T, n, D, H = batch_size, self.seq_len, self.cfg.n_train, self.cfg.x_dim, self.cfg.mlp_hidden
        rng = dict(device=device, generator=generator)
        points = torch.rand(B, T, D, **rng) * 2 - 1                  # (B, T, x_dim)
        if self.cfg.mode == "linear":
            y = points @ torch.randn(B, D, 1, **rng)                 # (B, T, 1)
        else:
            # x_i has variance 1/3, so weights of variance 3/x_dim give pre-activations of variance ~1 within
            # a sequence, about a bias of variance 1
            hidden = torch.tanh(points @ (torch.randn(B, D, H, **rng) * (3 / D) ** 0.5)
                                + torch.randn(B, 1, H, **rng))       # (B, T, hidden)
            y = hidden @ torch.randn(B, H, 1, **rng)                 # (B, T, 1)
        y = (y - y.mean(1, keepdim=True)) / y.std(1, correction=0, keepdim=True).clamp_min(1e-6)
        x = torch.zeros(B, T, D + 2, device=device)
        x[..., :D] = points
        x[:, :n, D] = y[:, :n, 0] + self.cfg.noise * torch.randn(B, n, **rng)
        x[:, :n, D + 1] = 1
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        mask[:, n:] = True
        return Batch(x, None, y, mask)


class CueReward(Task):
    """Cue-reward association (Duan et al. 2023): learn each cue's reward, then recall it from the cue.

    Every sequence draws `n_cues` cue vectors in [0, 1]^cue_dim and a reward in [-1, 1] for each;
    every step shows a random one of them (plus Gaussian noise). In the first half of the
    `trial_len` steps the reward is shown with the cue; in the second half only the cue, and the
    model must give its reward. As in Duan et al. a cue may be missing from the first half; its
    reward then cannot be known (the best guess is 0). Tokens are [cue (cue_dim), reward or 0,
    1 if asked]. One sequence with n_cues=2, cue_dim=2, trial_len=4:

        t   x                         target   mask
        0   [0.81, 0.12, -0.50, 0]    [-0.50]  False   cue A, reward -0.5
        1   [0.33, 0.95,  0.70, 0]    [ 0.70]  False   cue B, reward 0.7
        2   [0.80, 0.13,  0.00, 1]    [-0.50]  True    cue A again: its reward?
        3   [0.80, 0.11,  0.00, 1]    [-0.50]  True    and again
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.d_in, self.d_out = cfg.cue_dim + 2, 1
        self.seq_len = cfg.trial_len

    def sample(self, batch_size, split="train", device="cpu", generator=None):
        check_request(batch_size, split)
        B, T, N, D = batch_size, self.seq_len, self.cfg.n_cues, self.cfg.cue_dim
        half = T // 2
        rng = dict(device=device, generator=generator)
        cues = torch.rand(B, N, D, **rng)                            # (B, n_cues, cue_dim)
        rewards = torch.rand(B, N, **rng) * 2 - 1                    # (B, n_cues)
        shown = torch.randint(N, (B, T), **rng)                      # (B, T) which cue each step shows
        cue = cues.gather(1, shown[..., None].expand(B, T, D))       # (B, T, cue_dim)
        reward = rewards.gather(1, shown)                            # (B, T)
        x = torch.zeros(B, T, D + 2, device=device)
        x[..., :D] = cue + self.cfg.cue_noise * torch.randn(B, T, D, **rng)
        x[:, :half, D] = reward[:, :half]
        x[:, half:, D + 1] = 1
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        mask[:, half:] = True
        return Batch(x, None, reward[..., None], mask)


class FewShot(Task):
    """N-way K-shot episodes: N*K labelled support images, then N*Q query images to classify.

    An episode draws N classes of the split without replacement and K + Q distinct images of each.
    The i-th class drawn gets label i; the draw order is random, so the labels are a fresh
    permutation of the classes in every episode. The support tokens come first, in shuffled order,
    each with its label as a one-hot input; then the query tokens, shuffled too, with a zero label
    input. Targets are the labels; only queries count. With cfg.isolate_queries (the default) the batch's
    context is the support set: each query sees it and itself alone, never another query. One 3-way
    1-shot 1-query episode:

        t   image              x          target   mask
        0   a drawing of 'ka'  [0, 1, 0]  1        False   support: image and its label
        1   a drawing of 'ga'  [0, 0, 1]  2        False
        2   a drawing of 'na'  [1, 0, 0]  0        False
        3   another 'na'       [0, 0, 0]  0        True    query: label hidden, answer 0
        4   another 'ka'       [0, 0, 0]  1        True
        5   another 'ga'       [0, 0, 0]  2        True

    With train_way W > N (cfg.train_way), training episodes are W-way and validation and test ones
    N-way: the label inputs and the outputs are W wide, an N-way episode shows labels 0..N-1 only, and
    its loss and accuracy choose among the labels its support shows (among_shown), as a nearest-prototype
    classifier compares a query with the episode's own classes alone. With train_shot, training episodes
    show that many support images per class and validation and test ones shot: a model trained at 1 shot
    can be chosen and tested at 5.

    Training images are augmented (cfg.augment): each is a random crop of itself zero-padded by a few
    pixels, and CIFAR-FS's are mirrored with probability 1/2 (AUGMENTATION) and, with cfg.jitter, their
    colours jittered (random_color_jitter). Validation and test images never are.

    `splits` maps train/val/test to uint8 arrays (classes, images per class, C, H, W); each is moved
    to a device the first time that device is asked for and kept there, so sampling is a few
    batched tensor operations with no per-image Python.
    """

    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, cfg, splits, class_names, mean, std):
        super().__init__(cfg)
        Q = cfg.query
        self.ways = dict(train=cfg.train_way or cfg.way, val=cfg.way, test=cfg.way)   # N of each split's episodes
        self.shots = dict(train=cfg.train_shot or cfg.shot, val=cfg.shot, test=cfg.shot)  # K of each split's
        for split, images in splits.items():
            if self.shots[split] + Q > images.shape[1]:
                option = "train_shot" if split == "train" and cfg.train_shot else "shot"
                raise ValueError(f"{option_flag(option, self.shots[split])} and {option_flag('query', Q)} need "
                                 f"{self.shots[split] + Q} images of a class, and {cfg.name} has {images.shape[1]}; "
                                 f"lower {option_flag(option)} or --query.")
            if self.ways[split] > images.shape[0]:
                option = "train_way" if split == "train" and cfg.train_way else "way"
                raise ValueError(f"{option_flag(option, self.ways[split])} exceeds the {images.shape[0]} classes of the "
                                 f"{cfg.name} {split} split; lower --{option.replace('_', '-')}.")
        self.splits, self.class_names = splits, class_names
        self.image_shape = tuple(splits["train"].shape[2:])
        self.d_in = self.d_out = self.ways["train"]                  # labels 0..W-1
        self.seq_len = max(self.ways[s] * (self.shots[s] + Q) for s in SPLITS)   # the longest episode
        self.augmentation = AUGMENTATION[cfg.name] if cfg.augment else None   # (padding, flip), training images only
        self.jitter = cfg.jitter                                     # colour jitter's strength, training images only
        self.mean = torch.tensor(mean).view(-1, 1, 1)                # (C, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)                  # (C, 1, 1)
        self.on_device = {}                                          # (split, device) -> uint8 tensor

    def split_images(self, split, device):
        """The split's uint8 images on `device`, moved there once."""
        key = (split, torch.device(device))
        if key not in self.on_device:
            self.on_device[key] = torch.from_numpy(self.splits[split]).to(device)
        return self.on_device[key]

    def sample(self, batch_size, split="train", device="cpu", generator=None):
        check_request(batch_size, split)
        B, N, K, Q = batch_size, self.ways[split], self.shots[split], self.cfg.query
        data = self.split_images(split, device)                            # (classes, per_class, C, H, W) uint8
        rng = dict(device=device, generator=generator)
        # the largest N of iid uniform keys: N distinct indices, uniformly chosen, in random order
        classes = torch.rand(B, data.shape[0], **rng).topk(N, dim=1).indices           # (B, N)
        drawn = torch.rand(B, N, data.shape[1], **rng).topk(K + Q, dim=2).indices      # (B, N, K+Q)
        labels = torch.arange(N, device=device).view(1, N, 1).expand(B, N, K + Q)      # (B, N, K+Q)

        def shuffled(part):                                          # (B, N*count) labels and picks
            label = labels[:, :, part].reshape(B, -1)
            pick = drawn[:, :, part].reshape(B, -1)
            order = torch.rand(label.shape, **rng).argsort(1)
            return label.gather(1, order), pick.gather(1, order)

        support_label, support_pick = shuffled(slice(0, K))
        query_label, query_pick = shuffled(slice(K, K + Q))
        target = torch.cat([support_label, query_label], 1)          # (B, T) int64
        pick = torch.cat([support_pick, query_pick], 1)              # (B, T) which image of its class
        images = data[classes.gather(1, target), pick]               # (B, T, C, H, W) uint8
        images = self.prepare(images.flatten(0, 1), split, generator).view(images.shape)   # (B, T, C, H, W) float
        x = F.one_hot(target, self.d_in).float()                     # (B, T, W): N-way shows labels 0..N-1
        x[:, N * K:] = 0                                             # query labels are not shown
        mask = torch.zeros(B, N * (K + Q), dtype=torch.bool, device=device)
        mask[:, N * K:] = True
        return Batch(x, images, target, mask, N * K if self.cfg.isolate_queries else None)

    def prepare(self, images, split, generator=None):
        """uint8 images (n, C, H, W) as the model reads them (n, C, H, W): scaled to [0, 1] and normalised by the
        dataset's mean and std per channel; training images augmented first (cfg.augment, cfg.jitter)."""
        training = split == "train"
        if self.augmentation is not None and training:
            images = random_crop_and_flip(images, *self.augmentation, generator)
        images = images.float() / 255                                # (n, C, H, W) in [0, 1]
        if self.jitter and training:
            images = random_color_jitter(images, self.jitter, generator)
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    @staticmethod
    def among_shown(out, batch):
        """out (B, T, W) with the logits of the labels no support token shows set to -inf, so that an
        episode's loss and accuracy choose among its own classes; a no-op where all W are shown."""
        shown = (batch.x * ~batch.mask[..., None]).amax(1) > 0       # (B, W) labels of the support
        return out.float().masked_fill(~shown[:, None, :], float("-inf"))

    def loss(self, out, batch):
        return super().loss(self.among_shown(out, batch), batch)

    def token_metric(self, out, batch):
        return super().token_metric(self.among_shown(out, batch), batch)


# Training images: (padding, flip) of random_crop_and_flip. CIFAR-FS as CIFAR is usually trained (and as
# Duan et al. train, who also jitter colours): a crop of the image zero-padded by 4 pixels, mirrored half
# the time. Omniglot: shifts by up to 2 pixels and no mirror (a mirrored character can be another one);
# on an H200, 8,000 steps at batch 256 on Vinyals's split (README, "Few-shot on the literature's splits"),
# they took the test accuracy from 98.42 to 98.70 and 98.56 in two runs (Hebbian) and from 98.60 to 98.86
# (static): each within its 95% interval (+-0.35), all the same way.
AUGMENTATION = {"omniglot": (2, False), "cifar_fs": (4, True)}


def crop_and_flip(images, top, left, flip, padding):
    """Each image zero-padded by `padding` pixels on every side, cropped back to its size at (top, left) of
    the padded image, and mirrored left to right where `flip`: torchvision's RandomCrop(size, padding) and
    RandomHorizontalFlip, with their random draws given. images (N, C, H, W); top, left (N,) int64 in
    [0, 2 padding] (padding, padding: no shift); flip (N,) bool -> (N, C, H, W)."""
    N, C, H, W = images.shape
    arange = dict(device=images.device)
    padded = F.pad(images, (padding,) * 4)                                       # (N, C, H + 2p, W + 2p)
    rows = top[:, None] + torch.arange(H, **arange)                              # (N, H) rows of the crop
    cols = left[:, None] + torch.arange(W, **arange)                             # (N, W) its columns
    cols = torch.where(flip[:, None], cols.flip(1), cols)                        # mirrored: right to left
    return padded[torch.arange(N, **arange).view(N, 1, 1, 1), torch.arange(C, **arange).view(1, C, 1, 1),
                  rows.view(N, 1, H, 1), cols.view(N, 1, 1, W)]                  # (N, C, H, W)


def random_crop_and_flip(images, padding, flip=True, generator=None):
    """crop_and_flip with every image's shift uniform in [-padding, padding] pixels each way and, if flip, a
    mirror with probability 1/2, drawn on the images' device: data augmentation without torchvision.
    images (N, C, H, W)."""
    N, rng = images.size(0), dict(device=images.device, generator=generator)
    top, left = torch.randint(0, 2 * padding + 1, (2, N), **rng)
    return crop_and_flip(images, top, left, (torch.rand(N, **rng) < 0.5) & flip, padding)


# Colour jitter (--jitter s, CIFAR-FS), as torchvision's ColorJitter(s, s, s) acts on a float image and as
# MetaOptNet trains CIFAR-FS (s = 0.4, after the crop): brightness, contrast and saturation, in a random
# order per image, each a blend of the image with a target by a factor f drawn from [1 - s, 1 + s],
# clipped to [0, 1]: f image + (1 - f) target, the target black (brightness), the mean of the image's grey
# (contrast) or its grey image (saturation). Grey is torchvision's luma, 0.2989 R + 0.587 G + 0.114 B.
GREY = (0.2989, 0.587, 0.114)


def color_jitter(images, factors, order):
    """images (N, 3, H, W) in [0, 1]; factors (N, 3) of brightness, contrast and saturation; order (N, 3) a
    permutation of 0, 1, 2 per image, the order in which they act -> (N, 3, H, W) in [0, 1]."""
    for step in range(3):
        which = order[:, step].view(-1, 1, 1, 1)                                 # (N, 1, 1, 1) 0, 1 or 2
        grey = torch.einsum("nchw,c->nhw", images, images.new_tensor(GREY))[:, None]   # (N, 1, H, W)
        target = torch.where(which == 2, grey, grey.mean((2, 3), keepdim=True) * (which == 1))  # grey, its mean, or 0
        f = factors.gather(1, which.view(-1, 1)).view(-1, 1, 1, 1)               # (N, 1, 1, 1)
        images = (f * images + (1 - f) * target).clamp(0, 1)
    return images


def random_color_jitter(images, strength, generator=None):
    """color_jitter with every factor uniform in [1 - strength, 1 + strength] and a random order per image,
    drawn on the images' device. images (N, 3, H, W) in [0, 1]."""
    N, rng = images.size(0), dict(device=images.device, generator=generator)
    factors = 1 + strength * (2 * torch.rand(N, 3, **rng) - 1)                 # (N, 3)
    return color_jitter(images, factors, torch.rand(N, 3, **rng).argsort(1))


# ----------------------------------------------------------------------------------------------
# Real data: the official archives, downloaded when missing, decoded once and cached.

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
OMNIGLOT_FILES = {  # archive -> (official url, published md5, alphabets, characters)
    "images_background.zip": (OMNIGLOT_URL + "images_background.zip", "68d2efa1b9178cc56df9314c21c6e718", 30, 964),
    "images_evaluation.zip": (OMNIGLOT_URL + "images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811", 20, 659),
}
OMNIGLOT_DRAWINGS = 20              # drawings of every character
OMNIGLOT_SIZE = 28                  # the 105x105 drawings are resized to this
OMNIGLOT_VAL_CHARACTERS = 100       # Lake's split: background characters held out for validation
OMNIGLOT_VAL_SEED = 0               # fixes which ones, for every run
OMNIGLOT_VINYALS_TEST = 423         # Vinyals's split: the last characters of the evaluation archive test,
OMNIGLOT_VINYALS_VAL_ALPHABETS = (  # and the characters of these background alphabets validate
    "Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
CIFAR_FILES = {  # archive -> (official url, published md5)
    "cifar-100-python.tar.gz": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                                "eb9058c3a382ffc7106e4002c42a8d85"),
}
CIFAR_CLASSES, CIFAR_IMAGES = 100, 600      # classes, and images per class with train and test merged
CIFAR_MEAN = (0.5074, 0.4867, 0.4411)       # channel statistics of CIFAR-100 train + test
CIFAR_STD = (0.2675, 0.2566, 0.2763)
CIFAR_FS_SPLIT = {  # the class split of Bertinetto et al. 2019 (CIFAR-FS), 64 / 16 / 20 classes
    "train": """dolphin seal aquarium_fish ray trout orchid sunflower tulip bottle bowl can cup plate apple
        mushroom orange pear clock keyboard chair couch bee caterpillar cockroach bear lion tiger wolf
        bridge castle house road skyscraper cloud forest mountain elephant kangaroo porcupine possum
        raccoon skunk lobster spider boy girl dinosaur lizard snake turtle hamster mouse rabbit shrew
        squirrel oak_tree palm_tree pine_tree willow_tree bus train lawn_mower streetcar tank""".split(),
    "val": """beaver otter flatfish shark lamp television beetle butterfly sea camel cattle crab crocodile
        maple_tree motorcycle tractor""".split(),
    "test": """whale poppy rose sweet_pepper telephone bed table wardrobe leopard plain chimpanzee fox snail
        worm baby man woman bicycle pickup_truck rocket""".split(),
}
CACHE_VERSION = 1                   # bump when the decoded arrays change, so old caches are not reused


def data_folder(data_dir=None) -> Path:
    return Path(data_dir or os.environ.get("PLASTIC_DATA") or "data").expanduser()


def cache_folder(folder: Path) -> Path:
    """Beside the archives when that folder is writable, else $PLASTIC_CACHE, else ~/.cache/plastic."""
    # a folder without write permission bits counts as read-only even for root, who could write anyway
    if os.access(folder, os.W_OK) and folder.stat().st_mode & 0o222:
        return folder
    return Path(os.environ.get("PLASTIC_CACHE") or Path.home() / ".cache" / "plastic").expanduser()


def md5sum(path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, path):
    """Copy `url` into the file `path`; tests replace this function, so they never touch the network."""
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as file:
        while chunk := response.read(1 << 20):
            file.write(chunk)


def download_checked(url, path: Path, md5):
    """Download to a temporary file beside `path`, check the published md5, then rename it into place,
    so an interrupted or corrupted download never looks like a complete file."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    os.close(handle)
    try:
        print(f"downloading {url} to {path}")
        download(url, partial)
        found = md5sum(partial)
        if found != md5:
            raise ValueError(f"the download of {url} has md5 {found}, not the published {md5}, so it "
                             f"was deleted; try again, or place the official file in {path.parent} by hand.")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def remove_if_empty(folders: list[Path]) -> None:
    """Remove `folders`, deepest first, while they are empty (rmdir removes no other), so that a failed
    download leaves no folders behind (a mistyped --data-dir made them) and never touches a file."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return


def fetch(folder: Path, files: dict) -> list[Path]:
    """The paths of `files` (name -> (url, md5, ...)) in `folder`; missing ones are downloaded."""
    folder = Path(os.path.abspath(folder))                           # "new/../data" names data, and makes no new/
    missing = [name for name in files if not (folder / name).exists()]
    if missing and all((folder.parent / name).exists() for name in missing):  # the data folder given one level low
        above = f"at {folder.parent.parent.resolve()}" if folder.parent.name == folder.name else \
            f"at a folder whose {folder.name}/ holds them"
        raise FileNotFoundError(f"{' and '.join(missing)} are in {folder.parent.resolve()}, but are looked for in its "
                                f"subfolder {folder.name}/: point PLASTIC_DATA (or --data-dir) {above}.")
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    for name in missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            download_checked(files[name][0], folder / name, files[name][1])
        except BaseException as error:                               # no network or write access, a bad md5, Ctrl-C
            remove_if_empty(created)
            if not isinstance(error, OSError):
                raise
            absent = [name for name in files if not (folder / name).exists()]
            them = "them" if len(absent) > 1 else "it"
            raise FileNotFoundError(
                f"{' and '.join(absent)} not found in {folder.resolve()} and could not be downloaded "
                f"({error}); place {them} there, or point PLASTIC_DATA (or --data-dir) at a folder whose "
                f"{folder.name}/ holds {them}.") from error
    return [folder / name for name in files]


def read_cache(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz cache, read in full, so that a damaged file fails here (its zip CRC)."""
    with np.load(path) as stored:
        return {key: stored[key] for key in stored.files}


def load_dataset(name, folder: Path, files: dict, decode) -> dict[str, np.ndarray]:
    """The arrays `decode(*archives)` returns, from the cache when archives of these exact contents were
    decoded before. The cache is named by the archives' md5s (0.3 s for CIFAR-100's 168 MB), not their
    times: a copied or re-extracted dataset keeps its cache, where a new time left a new cache each time."""
    archives = fetch(folder, files)
    digests = [md5sum(path) for path in archives]
    stamp = hashlib.md5(repr([(path.name, digest) for path, digest in zip(archives, digests)]).encode()).hexdigest()[:10]
    cache = cache_folder(folder) / f"{name}_v{CACHE_VERSION}_{stamp}.npz"
    if cache.exists():
        try:
            return read_cache(cache)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # truncated, or bytes changed
            cache.unlink()
            print(f"the cache {cache} was damaged ({error}), so it was deleted; decoding the archives again")
    start = time.time()
    for path, found in zip(archives, digests):                       # placed by hand: md5 reported, not required
        published = files[path.name][1]
        verdict = ("the published md5" if found == published else
                   "not the published one: a re-packed copy, or a damaged one; its contents are checked instead")
        print(f"decoding {path} (md5 {found}, {verdict})")
    arrays = decode(*archives)
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.part")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:                            # a file object, so savez adds no suffix
            np.savez(file, **arrays)
        os.replace(partial, cache)
    except OSError as error:                                         # a full disk, or no write access
        partial.unlink(missing_ok=True)
        print(f"decoded in {time.time() - start:.1f} s; not cached ({error}): set PLASTIC_CACHE to a folder "
              f"with room, or each run decodes the archives again")
        return arrays
    print(f"decoded in {time.time() - start:.1f} s; cached in {cache}")
    return arrays


def omniglot_drawing(png: bytes) -> np.ndarray:
    """A black-on-white 105x105 PNG -> (28, 28) uint8 with bright strokes, area-averaged (antialiased)."""
    drawing = Image.open(io.BytesIO(png)).convert("L").resize((OMNIGLOT_SIZE,) * 2, Image.Resampling.BOX)
    return 255 - np.asarray(drawing)


def decode_omniglot(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(characters, 20, 28, 28) uint8 drawings and the 'Alphabet/characterNN' names, from one official zip
    laid out as <top folder>/<Alphabet>/characterNN/<id>_<drawing>.png."""
    _, _, alphabets, characters = OMNIGLOT_FILES[path.name]
    try:
        with zipfile.ZipFile(path) as archive:
            members = {}                                             # 'Alphabet/characterNN' -> png names
            for member in sorted(archive.namelist()):
                parts = member.split("/")
                if member.endswith(".png") and len(parts) >= 3:
                    members.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(member)
            found = (len({name.split("/")[0] for name in members}), len(members),
                     sorted({len(pngs) for pngs in members.values()}))
            if found != (alphabets, characters, [OMNIGLOT_DRAWINGS]):
                raise ValueError(f"{path} is not the official {path.name}: expected {alphabets} alphabets and "
                                 f"{characters} characters of {OMNIGLOT_DRAWINGS} drawings, found {found[0]} "
                                 f"and {found[1]} of {found[2]}; replace it with the official file.")
            images = np.stack([np.stack([omniglot_drawing(archive.read(png)) for png in pngs])
                               for pngs in members.values()])        # (characters, 20, 28, 28)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged ({error}); delete it so it is downloaded again, "
                         f"or replace it with the official file.") from error
    return images, np.array(list(members))


def load_omniglot(data_dir=None) -> dict[str, np.ndarray]:
    """background (964, 20, 28, 28), evaluation (659, 20, 28, 28) uint8 and their character names."""
    def decode(background, evaluation):
        (b_images, b_names), (e_images, e_names) = decode_omniglot(background), decode_omniglot(evaluation)
        return dict(background=b_images, background_names=b_names, evaluation=e_images, evaluation_names=e_names)
    return load_dataset(f"omniglot_{OMNIGLOT_SIZE}px", data_folder(data_dir) / "omniglot", OMNIGLOT_FILES, decode)


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's pickles hold: dicts, lists, strings, ints and numpy arrays.

    A pickle can name any function to be called while it loads (os.system included); this one
    refuses every global except the three numpy needs to rebuild an array, whatever the checksum.
    """

    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR pickle holds only numpy "
                                         f"arrays, lists and strings, so this file is damaged or malicious.")
        return super().find_class(module, name)


def decode_cifar100(path: Path) -> dict[str, np.ndarray]:
    """images (100, 600, 3, 32, 32) uint8, train and test merged, classes in fine-label order; names (100,)."""
    parts = {}
    try:
        # a stream, so the .gz is read once; gzip, not tarfile's "r|gz", checks its CRC at the end
        with gzip.open(path) as stream, tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 22) as archive:
            for member in archive:
                if member.isfile() and Path(member.name).name in ("train", "test", "meta"):
                    unpickler = CifarUnpickler(archive.extractfile(member), encoding="latin1")
                    parts[Path(member.name).name] = unpickler.load()
            while stream.read(1 << 22):                             # the rest, to the CRC
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} is damaged ({error}); delete it so it is downloaded again, "
                         f"or replace it with the official file.") from error
    wrong = (f"{path} is not the official {path.name}: expected train, test and meta with {CIFAR_CLASSES} "
             f"classes of {CIFAR_IMAGES} images; replace it with the official file.")
    try:
        data = np.concatenate([parts["train"]["data"], parts["test"]["data"]])      # (N, 3072) uint8
        labels = np.array(parts["train"]["fine_labels"] + parts["test"]["fine_labels"])
        names = np.array(parts["meta"]["fine_label_names"])
        per_class = np.bincount(labels, minlength=CIFAR_CLASSES)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(wrong) from error
    if (data.dtype != np.uint8 or data.shape != (len(labels), 3 * 32 * 32) or len(names) != CIFAR_CLASSES
            or len(per_class) != CIFAR_CLASSES or (per_class != CIFAR_IMAGES).any()):
        raise ValueError(wrong)
    order = np.argsort(labels, kind="stable")                        # class by class, in fine-label order
    images = data[order].reshape(CIFAR_CLASSES, CIFAR_IMAGES, 3, 32, 32)
    return dict(images=images, names=names)


def load_cifar100(data_dir=None) -> dict[str, np.ndarray]:
    """images (100, 600, 3, 32, 32) uint8 and the 100 fine class names."""
    return load_dataset("cifar100_32px", data_folder(data_dir) / "cifar100", CIFAR_FILES, decode_cifar100)


# ----------------------------------------------------------------------------------------------
# Class splits and the one way to build any task.

def omniglot_splits(data, rotations=True, split="vinyals", train_on_val=False):
    """Arrays (classes, 20, 1, 28, 28) and class names ('Alphabet/characterNN') of train, val and test.
    "vinyals" (Vinyals et al. 2016, the literature's split): the 1,623 characters of both archives in archive
    order; the last 423 test, the characters of five background alphabets validation (172), the other 1,028
    train. "lake" (Lake et al. 2015): background characters train (a fixed seeded set of them validation),
    every evaluation character tests, so every test alphabet is new. train_on_val: the validation characters
    train too (with Vinyals's split, its 1,200 characters), and still validate. Rotations by 90/180/270
    degrees make new classes of the training characters only."""
    images = np.concatenate([data["background"], data["evaluation"]])   # (characters, 20, 28, 28), archive order
    names = np.concatenate([data["background_names"], data["evaluation_names"]])
    background = np.arange(len(images)) < len(data["background"])
    if split == "vinyals":
        if OMNIGLOT_VINYALS_TEST > len(data["evaluation"]):
            raise ValueError(f"only {len(data['evaluation'])} evaluation characters, but Vinyals's split tests on the "
                             f"last {OMNIGLOT_VINYALS_TEST}; use the official images_evaluation.zip.")
        test = np.arange(len(images)) >= len(images) - OMNIGLOT_VINYALS_TEST
        val = background & np.isin([name.split("/")[0] for name in names], OMNIGLOT_VINYALS_VAL_ALPHABETS)
    else:
        if OMNIGLOT_VAL_CHARACTERS >= background.sum():
            raise ValueError(f"only {background.sum()} background characters, but {OMNIGLOT_VAL_CHARACTERS} are "
                             f"held out for validation; use the official images_background.zip.")
        held_out = np.random.default_rng(OMNIGLOT_VAL_SEED).permutation(background.sum())[:OMNIGLOT_VAL_CHARACTERS]
        test, val = ~background, np.isin(np.arange(len(images)), held_out)
    chosen = {"train": ~test if train_on_val else ~(test | val), "val": val, "test": test}
    splits = {part: images[which] for part, which in chosen.items()}
    class_names = {part: list(names[which]) for part, which in chosen.items()}
    if rotations:                                                    # a rotated character is a new class
        splits["train"] = np.concatenate([np.rot90(splits["train"], k, axes=(2, 3)) for k in range(4)])
        class_names["train"] = [f"{name} rotated {90 * k}" for k in range(4) for name in class_names["train"]]
    return {part: images[:, :, None] for part, images in splits.items()}, class_names   # add C = 1


def cifar_fs_splits(data, train_on_val=False):
    """The CIFAR-FS classes of each split: arrays (classes, 600, 3, 32, 32) and class names. train_on_val: the
    16 validation classes train too (80), and still validate."""
    names = dict(CIFAR_FS_SPLIT, train=CIFAR_FS_SPLIT["train"] + (CIFAR_FS_SPLIT["val"] if train_on_val else []))
    index = {name: i for i, name in enumerate(data["names"])}
    splits = {split: data["images"][[index[name] for name in chosen]] for split, chosen in names.items()}
    return splits, {split: list(chosen) for split, chosen in names.items()}


def make_task_from_config(cfg: TaskConfig) -> Task:
    if cfg.name == "copy":
        return Copy(cfg)
    if cfg.name == "regression":
        return Regression(cfg)
    if cfg.name == "cue_reward":
        return CueReward(cfg)
    if cfg.name == "omniglot":                                       # images in [0, 1], strokes bright
        splits, class_names = omniglot_splits(load_omniglot(cfg.data_dir), cfg.rotations, cfg.omniglot_split,
                                              cfg.train_on_val)
        return FewShot(cfg, splits, class_names, mean=(0.0,), std=(1.0,))
    splits, class_names = cifar_fs_splits(load_cifar100(cfg.data_dir), cfg.train_on_val)
    return FewShot(cfg, splits, class_names, mean=CIFAR_MEAN, std=CIFAR_STD)


def make_task(name, **options) -> Task:
    """make_task("omniglot", way=5, shot=1) builds the task; ValueError names a bad option."""
    known = {field.name for field in fields(TaskConfig)} - {"name"}
    if unknown := sorted(set(options) - known):
        raise ValueError(f"unknown task option {unknown[0]!r}; the options are {', '.join(sorted(known))}.")
    return make_task_from_config(TaskConfig(name=name, **options))
