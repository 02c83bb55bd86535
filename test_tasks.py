"""Tests of tasks.py: the samplers, the dataset loaders, and the real archives when present.

    python -m pytest test_tasks.py -q            # everything (offline; real data skipped if absent)
    python -m pytest test_tasks.py -m tasks      # one part: tasks | data | realdata

Loader tests build tiny archives in the official layouts in a temporary folder. Real-data tests read
$PLASTIC_DATA, else ../shared/data where it exists, else ./data (where a run downloads); their decoded
cache goes to $PLASTIC_CACHE or ~/.cache/plastic when that folder is read-only, so only the first run
decodes the archives.
"""

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tasks
from tasks import SPLITS, FewShot, TaskConfig, make_task

HERE = Path(__file__).resolve().parent
REAL_DATA = Path(os.environ.get("PLASTIC_DATA")  # else ../shared/data beside the clone, else ./data, where a run downloads
                 or next((d for d in (HERE.parent / "shared" / "data", HERE / "data") if d.is_dir()), HERE / "data"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs offline: a download fails as it would without network."""
    def refuse(url, path):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(tasks, "download", refuse)


# ----------------------------------------------------------------------------------------------
# Samplers (marker: tasks)

def coded_task(way=3, shot=2, query=2, classes=(7, 5, 4), per_class=6, mean=(0.0,), std=(1.0,), train_way=None,
               isolate_queries=True, train_shot=None):
    """A few-shot task on 2x2 images that spell out who they are: pixel (0, 0) is the class
    (100 * split number + class index), pixel (0, 1) the image's number within its class; not augmented,
    so that the pixels stay where they are."""
    splits, names = {}, {}
    for number, (split, n) in enumerate(zip(SPLITS, classes)):
        images = np.zeros((n, per_class, 1, 2, 2), np.uint8)     # (classes, per_class, C, H, W)
        images[:, :, 0, 0, 0] = 100 * number + np.arange(n)[:, None]
        images[:, :, 0, 0, 1] = np.arange(per_class)
        splits[split], names[split] = images, [f"{split}{i}" for i in range(n)]
    cfg = TaskConfig(name="omniglot", way=way, shot=shot, query=query, augment=False, train_way=train_way,
                     isolate_queries=isolate_queries, train_shot=train_shot)
    return FewShot(cfg, splits, names, mean, std)


def decode_codes(batch):
    """(B, T) class codes and (B, T) image numbers read back from a coded_task batch."""
    pixels = (batch.images[:, :, 0, 0] * 255).round().long()       # (B, T, 2)
    return pixels[..., 0], pixels[..., 1]


TASK_MAKERS = {
    "copy": lambda: make_task("copy"),
    "regression-linear": lambda: make_task("regression"),
    "regression-mlp": lambda: make_task("regression", mode="mlp"),
    "cue_reward": lambda: make_task("cue_reward"),
    "few-shot": coded_task,
}


@pytest.mark.tasks
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", TASK_MAKERS)
def test_batch_shapes_dtypes_devices(kind, device):
    task = TASK_MAKERS[kind]()
    batch = task.sample(4, "val", device=device)
    B, T = 4, task.seq_len
    assert batch.x.shape == (B, T, task.d_in), f"{kind}: x is {tuple(batch.x.shape)}, expected {(B, T, task.d_in)}"
    assert batch.x.dtype == torch.float32, f"{kind}: x is {batch.x.dtype}, expected float32"
    assert batch.mask.shape == (B, T) and batch.mask.dtype == torch.bool, f"{kind}: mask must be (B, T) bool"
    assert batch.mask.any(1).all(), f"{kind}: every sequence needs at least one position that counts"
    if task.metric_name == "accuracy":
        assert batch.target.shape == (B, T) and batch.target.dtype == torch.int64, \
            f"{kind}: target must be (B, T) int64"
        assert batch.images.shape == (B, T, *task.image_shape), f"{kind}: images are {tuple(batch.images.shape)}"
        assert batch.images.dtype == torch.float32, f"{kind}: images must be float32"
    else:
        assert batch.target.shape == (B, T, task.d_out), f"{kind}: target is {tuple(batch.target.shape)}"
        assert batch.target.dtype == torch.float32 and batch.images is None, f"{kind}: float32 targets, no images"
    for name in ("x", "target", "mask", "images"):
        tensor = getattr(batch, name)
        assert tensor is None or tensor.device.type == device, f"{kind}: {name} is on {tensor.device}, not {device}"


@pytest.mark.tasks
def test_defaults_follow_design():
    cfg = TaskConfig()
    assert (cfg.seq_len, cfg.delay, cfg.dim) == (20, 20, 1), "copy defaults are seq_len 20, delay 20, dim 1"
    assert (cfg.n_train, cfg.n_test, cfg.x_dim, cfg.noise, cfg.mode) == (20, 20, 12, 0.1, "linear"), \
        "regression defaults are 20 + 20 points in 12 dimensions, noise 0.1, linear"
    assert (cfg.n_cues, cfg.trial_len) == (5, 20), "cue_reward defaults are 5 cues over 20 steps"
    assert (cfg.way, cfg.shot, cfg.query, cfg.rotations) == (5, 1, 1, True), "few-shot default is 5-way 1-shot"
    built = {name: make_task(name) for name in ("copy", "regression", "cue_reward")}
    sizes = {name: (task.d_in, task.d_out, task.seq_len) for name, task in built.items()}
    assert sizes == {"copy": (3, 1, 60), "regression": (14, 1, 40), "cue_reward": (16, 1, 20)}, f"sizes {sizes}"
    assert make_task("copy", seq_len=5, delay=7, dim=3).seq_len == 17, "copy has 2 * seq_len + delay tokens"


@pytest.mark.tasks
def test_copy_recalls_what_was_stored():
    task = make_task("copy", seq_len=5, delay=3, dim=2)
    batch = task.sample(8, generator=torch.Generator().manual_seed(0))
    L, recall = 5, 8
    assert torch.equal(batch.target[:, recall:], batch.x[:, :L, :2]), \
        "recall targets must be the stored vectors, in order"
    assert batch.x[:, :L, :2].abs().max() <= 1, "stored values must lie in [-1, 1]"
    assert (batch.x[:, :L, 2] == 1).all() and (batch.x[:, L:, 2] == 0).all(), "store flag only on store steps"
    assert (batch.x[:, recall:, 3] == 1).all() and (batch.x[:, :recall, 3] == 0).all(), \
        "recall flag only on recall steps"
    assert (batch.x[:, L:, :2] == 0).all(), "nothing but flags after the store phase"
    assert batch.mask[:, recall:].all() and not batch.mask[:, :recall].any(), "mask exactly the recall steps"


@pytest.mark.tasks
def test_regression_targets_follow_one_linear_function_per_sequence():
    task = make_task("regression", n_train=10, n_test=6, x_dim=3, noise=0.1)
    batch = task.sample(64, generator=torch.Generator().manual_seed(0))
    x, y = batch.x[..., :3].double(), batch.target[..., 0].double()             # (B, T, 3), (B, T)
    design = torch.cat([x, torch.ones_like(x[..., :1])], -1)                    # (B, T, 4): affine fit
    fit = torch.linalg.lstsq(design, y[..., None]).solution
    residual = (design @ fit)[..., 0] - y
    assert residual.abs().max() < 1e-4, \
        f"targets are not one affine function of x per sequence (max residual {residual.abs().max():.2g})"
    assert y.mean(1).abs().max() < 1e-5 and (y.std(1, correction=0) - 1).abs().max() < 1e-4, \
        "targets must have zero mean and unit variance per sequence"
    noise = batch.x[:, :10, 3] - batch.target[:, :10, 0]
    assert 0.08 < noise.std() < 0.12, f"shown y must be target + noise of std 0.1, found std {noise.std():.3f}"
    assert (batch.x[:, 10:, 3:] == 0).all() and (batch.x[:, :10, 4] == 1).all(), \
        "test points show neither y nor the flag"
    assert batch.mask[:, 10:].all() and not batch.mask[:, :10].any(), "mask exactly the test points"
    other = task.sample(64, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other.target, batch.target), "every batch draws fresh functions"


@pytest.mark.tasks
def test_regression_mlp_is_not_linear():
    task = make_task("regression", mode="mlp", noise=0.0, x_dim=2)
    batch = task.sample(64, generator=torch.Generator().manual_seed(0))
    x, y = batch.x[..., :2].double(), batch.target[..., 0].double()
    design = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    residual = (design @ torch.linalg.lstsq(design, y[..., None]).solution)[..., 0] - y
    assert residual.pow(2).mean() > 1e-3, "mode mlp must give functions a linear fit cannot match"
    assert torch.equal(batch.x[:, :20, 2], batch.target[:, :20, 0]), "with noise 0 the shown y are the targets"


@pytest.mark.tasks
def test_regression_mlp_preactivations_have_unit_variance_about_a_unit_variance_bias(monkeypatch):
    """The docstring's random tanh network: within a sequence each hidden unit's pre-activation varies with
    variance ~1 over the points (x_dim 12 weights of variance 3/12 on x of variance 1/3), about a per-sequence
    bias of variance ~1; read from what tanh is given, over 256 sequences of 4 units."""
    seen, tanh = [], torch.tanh
    monkeypatch.setattr(tasks.torch, "tanh", lambda z: seen.append(z) or tanh(z))
    make_task("regression", mode="mlp", mlp_hidden=4).sample(256, generator=torch.Generator().manual_seed(0))
    (pre,) = seen                                                    # (B, T, hidden)
    within = pre.var(1, correction=0).mean().item()                  # expected 1 - 1/T = 0.975
    centres = pre.mean(1).var().item()                               # expected 1 + 1/T: the bias and the mean of x
    assert 0.85 < within < 1.15, f"pre-activations vary with variance {within:.3f} within a sequence, not ~1"
    assert 0.85 < centres < 1.2, f"the sequences' pre-activation centres have variance {centres:.3f}, not ~1 (the bias)"


@pytest.mark.tasks
def test_cue_reward_rewards_follow_their_cues():
    task = make_task("cue_reward", n_cues=3, cue_dim=4, trial_len=12, cue_noise=0.0)
    batch = task.sample(16, generator=torch.Generator().manual_seed(0))
    for b in range(16):
        cues = batch.x[b, :, :4]
        same_cue = (cues[:, None] == cues[None]).all(-1)                        # (T, T)
        same_reward = batch.target[b, :, 0][:, None] == batch.target[b, :, 0][None]
        assert (same_reward | ~same_cue).all(), f"sequence {b}: one cue must always give one reward"
        assert len(torch.unique(cues, dim=0)) <= 3, f"sequence {b}: more distinct cues than n_cues"
    assert torch.equal(batch.x[:, :6, 4], batch.target[:, :6, 0]), "the first half shows each cue's reward"
    assert (batch.x[:, 6:, 4] == 0).all() and (batch.x[:, 6:, 5] == 1).all(), \
        "the second half hides the reward and asks"
    assert batch.mask[:, 6:].all() and not batch.mask[:, :6].any(), "mask exactly the second half"
    assert batch.target.abs().max() <= 1, "rewards lie in [-1, 1]"
    odd = make_task("cue_reward", trial_len=5).sample(4, generator=torch.Generator().manual_seed(0))
    assert odd.mask[:, 2:].all() and not odd.mask[:, :2].any() and (odd.x[:, 2:, -2] == 0).all(), \
        "an odd trial shows rewards on its first floor(T/2) steps and asks on the rest"


@pytest.mark.tasks
def test_cue_reward_shows_all_its_cues_drawn_from_the_unit_cube():
    """Over 100 steps each sequence shows every one of its n_cues = 5 cues (missing one has probability
    ~1e-9), and cues lie in [0, 1]^cue_dim, spanning it."""
    batch = make_task("cue_reward", n_cues=5, cue_dim=4, trial_len=100, cue_noise=0.0).sample(
        32, generator=torch.Generator().manual_seed(0))
    cues = batch.x[..., :4]                                          # (B, T, cue_dim)
    for b in range(32):
        distinct = len(torch.unique(cues[b], dim=0))
        assert distinct == 5, f"sequence {b} shows {distinct} distinct cues in 100 steps, not its n_cues = 5"
    assert cues.min() >= 0 and cues.max() <= 1 and cues.min() < 0.1 and cues.max() > 0.9, \
        f"cues must span [0, 1], found [{cues.min():.2f}, {cues.max():.2f}]"


@pytest.mark.tasks
def test_each_sequence_draws_its_own_values_function_and_cues_in_their_ranges():
    """Within one batch every sequence has its own stored vectors (copy), function (regression, both modes)
    and cues (cue_reward), drawn over the whole of their ranges: stored values and rewards in [-1, 1] (both
    signs), x in [-1, 1]; mlp targets standardised per sequence as linear ones are."""
    g = lambda: torch.Generator().manual_seed(0)
    copy = make_task("copy", seq_len=5, delay=3, dim=2).sample(16, generator=g())
    regression = {mode: make_task("regression", mode=mode, noise=0.0, x_dim=2).sample(16, generator=g()) for mode in ("linear", "mlp")}
    cue = make_task("cue_reward", n_cues=3, cue_dim=4, trial_len=12, cue_noise=0.0).sample(16, generator=g())
    for name, rows in (("copy's stored vectors", copy.x[:, :5, :2]), ("cue_reward's cues", cue.x[:, :, :4])):
        assert not any(torch.equal(rows[0], rows[b]) for b in range(1, 16)), f"{name} must differ between sequences"
    for name, values in (("copy's stored values", copy.x[:, :5, :2]), ("cue_reward's rewards", cue.target)):
        assert values.abs().max() <= 1 and values.min() < -0.5 and values.max() > 0.5, f"{name} must span [-1, 1]"
    for mode, batch in regression.items():
        x, y = batch.x[..., :2].double(), batch.target[..., 0].double()
        design = torch.cat([x, torch.ones_like(x[..., :1])], -1)
        slopes = torch.linalg.lstsq(design, y[..., None]).solution[:, :2, 0]     # (B, 2) each sequence's affine fit
        directions = F.normalize(slopes, dim=-1)                                 # standardising rescales, not turns
        assert (directions[1:] - directions[0]).abs().max(1).values.min() > 1e-3, f"{mode}: each sequence needs its own function"
        assert x.abs().max() <= 1 and x.min() < -0.9 and x.max() > 0.9, f"{mode}: x drawn from [-1, 1]"
        assert y.mean(1).abs().max() < 1e-5 and (y.std(1, correction=0) - 1).abs().max() < 1e-4, \
            f"{mode}: targets must have zero mean and unit variance per sequence"


@pytest.mark.tasks
def test_cue_noise_is_gaussian_of_its_std_in_both_halves():
    """The same seed with cue_noise 0.1 and 0 draws the same cues: the difference is the noise, std 0.1 on
    every step of the trial, the second half (which asks) as the first (which shows the reward)."""
    clean, noisy = (make_task("cue_reward", cue_noise=noise).sample(64, generator=torch.Generator().manual_seed(0))
                    for noise in (0.0, 0.1))
    noise = noisy.x[..., :noisy.x.size(-1) - 2] - clean.x[..., :clean.x.size(-1) - 2]   # (B, T, cue_dim)
    half = noise.size(1) // 2
    for name, part in (("first", noise[:, :half]), ("second", noise[:, half:])):
        assert 0.09 < part.std() < 0.11 and part.mean().abs() < 0.01, f"{name} half: noise std {part.std():.3f}, not 0.1"
    assert torch.equal(clean.target, noisy.target), "noise changes the cues shown, not the rewards"
    apart = (noise[0] - noise[1]).std()                              # 0.1 * sqrt(2) for independent draws
    assert apart > 0.1, f"two sequences' noises differ by std {apart:.3f}, not 0.14: each sequence must draw its own"


@pytest.mark.tasks
def test_episode_layout_and_no_label_leak():
    N, K, Q = 3, 2, 2
    batch = coded_task(N, K, Q).sample(32, generator=torch.Generator().manual_seed(0))
    S = N * K
    assert torch.equal(batch.x[:, :S], F.one_hot(batch.target[:, :S], N).float()), "support inputs are one-hot labels"
    assert (batch.x[:, S:] == 0).all(), "query label inputs must be zero: no query label may leak into the inputs"
    assert batch.mask[:, S:].all() and not batch.mask[:, :S].any(), "mask exactly the queries"
    counts = F.one_hot(batch.target[:, S:], N).sum(1)
    assert (counts == Q).all(), "every label has Q queries"
    assert batch.context == S, f"the batch's context should be the {S} support tokens, got {batch.context}"


@pytest.mark.tasks
def test_the_context_is_each_splits_support_set_unless_queries_see_each_other():
    """With train_way, a training episode's support set is W*K tokens and a test one's N*K; without
    isolate_queries there is no context (a plain causal sequence, as runs before the option had)."""
    task = coded_task(way=3, shot=2, query=1, train_way=5)
    contexts = {split: task.sample(4, split, generator=torch.Generator().manual_seed(0)).context for split in SPLITS}
    assert contexts == dict(train=10, val=6, test=6), f"contexts should be W*K = 10 (train) and N*K = 6, got {contexts}"
    plain = coded_task(isolate_queries=False).sample(4, generator=torch.Generator().manual_seed(0))
    assert plain.context is None, f"isolate_queries=False should give no context, got {plain.context}"


@pytest.mark.tasks
def test_every_query_class_appears_k_times_in_the_support():
    N, K, Q = 3, 2, 2
    batch = coded_task(N, K, Q).sample(64, "train", generator=torch.Generator().manual_seed(1))
    codes, numbers = decode_codes(batch)
    S = N * K
    for b in range(64):
        support_classes = codes[b, :S].tolist()
        for t in range(S, S + N * Q):
            query_class = codes[b, t].item()
            times = support_classes.count(query_class)
            assert times == K, f"episode {b}: query class {query_class} is {times} times in the support, not {K}"
            holders = batch.target[b, :S][codes[b, :S] == query_class]
            assert (holders == batch.target[b, t]).all(), \
                f"episode {b}: the query's target is not its class's support label"
        assert len(set(support_classes)) == N, f"episode {b}: classes must be drawn without replacement"
        pairs = set(zip(codes[b].tolist(), numbers[b].tolist()))
        assert len(pairs) == N * (K + Q), f"episode {b}: an image is used twice (support and query must differ)"


@pytest.mark.tasks
def test_labels_permuted_and_order_shuffled_per_episode():
    N, K = 3, 2
    batch = coded_task(N, K, 1).sample(200, generator=torch.Generator().manual_seed(2))
    codes, _ = decode_codes(batch)
    support_codes, support_labels = codes[:, :N * K], batch.target[:, :N * K]
    first_class_label = [support_labels[b][support_codes[b] == support_codes[b].min()][0].item() for b in range(200)]
    assert len(set(first_class_label)) == N, "labels must be a fresh permutation per episode, not fixed by class"
    sorted_support = (batch.target[:, :N * K].diff(dim=1) >= 0).all(1)
    assert sorted_support.float().mean() < 0.2, "support order must be shuffled, not grouped by label"


@pytest.mark.tasks
def test_classes_and_images_are_drawn_uniformly_and_independently():
    """600 3-way episodes of 2 + 2 images from 7 classes of 6 images: every class and every image number
    comes up about equally often, and the images one class draws are its own: not those another class of the
    episode draws, nor those the same label draws in the other episodes of the batch (one draw shared by the
    classes or the episodes would repeat them)."""
    N, K, Q, B = 3, 2, 2, 600
    batch = coded_task(N, K, Q).sample(B, "train", generator=torch.Generator().manual_seed(4))
    codes, numbers = decode_codes(batch)
    class_counts = torch.bincount(codes.flatten(), minlength=7).double()
    share = class_counts / class_counts.sum()
    assert (share - 1 / 7).abs().max() < 0.04, f"the 7 classes should each be drawn 1/7 of the time, got {share.tolist()}"
    number_counts = torch.bincount(numbers.flatten(), minlength=6).double()
    share = number_counts / number_counts.sum()
    assert (share - 1 / 6).abs().max() < 0.03, f"the 6 images of a class should each be drawn 1/6 of the time, got {share.tolist()}"
    drawn = [[frozenset(numbers[b][batch.target[b] == label].tolist()) for label in range(N)] for b in range(B)]
    repeated_in_episode = sum(len(set(sets)) < N for sets in drawn) / B
    assert repeated_in_episode < 0.35, (f"{repeated_in_episode:.0%} of the episodes have two classes drawing the same "
                                        f"4 of 6 image numbers, expected about 20%: the classes share one draw")
    repeated_in_batch = sum(drawn[b][0] == drawn[b + 1][0] for b in range(B - 1)) / (B - 1)
    assert repeated_in_batch < 0.15, (f"{repeated_in_batch:.0%} of consecutive episodes give label 0 the same image "
                                      f"numbers, expected about 1/15: the episodes share one draw")


@pytest.mark.tasks
def test_no_position_tells_a_label():
    """At every position of an episode, support or query, each of the N labels comes up about 1/N of the time
    over a batch, and the episodes' query orders differ: queries left grouped by label, or one order shared by
    the batch, would let a model (with position embeddings) read a query's answer off its position."""
    N, K, Q, B = 3, 2, 2, 600
    batch = coded_task(N, K, Q).sample(B, "val", generator=torch.Generator().manual_seed(5))
    for t in range(N * (K + Q)):
        share = torch.bincount(batch.target[:, t], minlength=N).double() / B
        part = "query" if t >= N * K else "support"
        assert (share - 1 / N).abs().max() < 0.1, f"position {t} ({part}) has the labels in shares {share.tolist()}, not 1/{N} each"
    orders = {tuple(row) for row in batch.target[:, N * K:].tolist()}
    assert len(orders) > 60, f"only {len(orders)} query orders in {B} episodes: each episode must shuffle its own"


@pytest.mark.tasks
def test_rows_are_the_episodes_asked_for_with_the_batch_context():
    """Batch.rows, which evaluation uses to run its draws in slices, keeps every field of those episodes, the
    context (support set) included: without it the queries of a sliced batch would see each other."""
    batch = coded_task(3, 2, 1).sample(5, "test", generator=torch.Generator().manual_seed(0))
    part = batch.rows(1, 4)
    for name in ("x", "images", "target", "mask"):
        assert torch.equal(getattr(part, name), getattr(batch, name)[1:4]), f"rows(1, 4) must hold episodes 1-3's {name}"
    assert part.context == batch.context == 6, f"rows(1, 4) must keep the context 6 (the support set), got {part.context}"
    plain = make_task("copy", seq_len=2, delay=1).sample(3).rows(0, 2)
    assert plain.images is None and plain.context is None and plain.x.shape[0] == 2, \
        "rows of a task without images or context keep them None"


@pytest.mark.tasks
def test_augmented_and_jittered_training_episodes_follow_the_generator_alone():
    """Training images are cropped, mirrored and colour-jittered with draws from the generator given, never
    from torch's global random state: the same seed gives the same images whatever the global seed, and
    another seed other images (so a run's training episodes are reproducible from its seed)."""
    rng = np.random.default_rng(0)
    splits = {split: rng.integers(1, 256, (6, 4, 3, 8, 8), dtype=np.uint8) for split in SPLITS}
    names = {split: [f"{split}{i}" for i in range(6)] for split in SPLITS}
    task = FewShot(TaskConfig(name="cifar_fs", jitter=0.4), splits, names, (0.0,) * 3, (1.0,) * 3)
    images = {}
    with torch.random.fork_rng(devices=[]):
        for global_seed, seed in ((0, 1), (1, 1), (0, 2)):
            torch.manual_seed(global_seed)
            images[global_seed, seed] = task.sample(8, "train", generator=torch.Generator().manual_seed(seed)).images
    assert torch.equal(images[0, 1], images[1, 1]), "the global random state changed the augmented training images"
    assert not torch.equal(images[0, 1], images[0, 2]), "another generator seed gave the same training images"


@pytest.mark.tasks
def test_episodes_come_from_their_own_split():
    task = coded_task()
    for number, split in enumerate(SPLITS):
        codes, _ = decode_codes(task.sample(16, split))
        assert ((codes // 100) == number).all(), f"{split} episodes must use only {split} classes"


@pytest.mark.tasks
def test_generator_makes_sampling_reproducible():
    for kind, maker in TASK_MAKERS.items():
        task = maker()
        first, again = (task.sample(4, generator=torch.Generator().manual_seed(5)) for _ in range(2))
        other = task.sample(4, generator=torch.Generator().manual_seed(6))
        assert torch.equal(first.x, again.x) and torch.equal(first.target, again.target), \
            f"{kind}: the same seed gave a different batch"
        assert not (torch.equal(first.x, other.x) and torch.equal(first.target, other.target)), \
            f"{kind}: another seed gave the same batch"


@pytest.mark.tasks
def test_images_are_normalised_on_the_way_out():
    batch = coded_task(mean=(0.5,), std=(0.25,)).sample(2, generator=torch.Generator().manual_seed(0))
    pixels = batch.images[:, :, 0, 1, 1]                         # stored as 0
    assert torch.allclose(pixels, torch.full_like(pixels, -2.0)), "a 0 pixel must become (0 - mean) / std = -2"


@pytest.mark.tasks
def test_loss_and_metric_count_only_masked_positions():
    task = make_task("copy", seq_len=2, delay=1)
    batch = task.sample(2)
    out = batch.target.clone()
    out[~batch.mask] = 100.0                                    # unmasked outputs must not matter
    assert task.loss(out, batch).item() == 0 and (task.metric(out, batch) == 0).all(), "perfect recall has MSE 0"
    out[1][batch.mask[1]] += 2.0                                # second sequence off by 2 everywhere it counts
    assert torch.allclose(task.metric(out, batch), torch.tensor([0.0, 4.0])), "metric is the MSE of each sequence"
    assert torch.isclose(task.loss(out, batch), torch.tensor(2.0)), "loss is the MSE over every masked element"

    few = coded_task(3, 1, 1)
    batch = few.sample(2, generator=torch.Generator().manual_seed(0))
    logits = F.one_hot(batch.target, 3).float() * 10             # (B, T, way), right everywhere
    logits[1, 3:] = F.one_hot((batch.target[1, 3:] + 1) % 3, 3).float() * 10   # second episode wrong on queries
    assert torch.equal(few.metric(logits, batch), torch.tensor([1.0, 0.0])), "accuracy per episode, over its queries"
    expected = F.cross_entropy(logits[batch.mask], batch.target[batch.mask])
    assert torch.isclose(few.loss(logits, batch), expected), "loss is cross-entropy over the queries"
    assert few.metric_name == "accuracy" and few.higher_is_better, "few-shot reports accuracy, higher is better"
    assert task.metric_name == "mse" and not task.higher_is_better, "copy reports mse, lower is better"


@pytest.mark.tasks
@pytest.mark.parametrize("name, options, fragment", [
    ("sudoku", {}, "unknown task"),
    ("copy", {"lenght": 3}, "unknown task option 'lenght'"),
    ("copy", {"seq_len": 0}, "--seq-len 0 must be at least 1"),
    ("copy", {"delay": -1}, "--delay -1 must be 0 or more"),
    ("regression", {"mode": "cubic"}, "mode"),
    ("regression", {"noise": -0.1}, "--noise -0.1 must be 0 or more"),
    ("cue_reward", {"trial_len": 1}, "--trial-len 1 must be at least 2"),
    ("cue_reward", {"cue_noise": -0.1}, "--cue-noise -0.1 must be 0 or more"),
    ("omniglot", {"shot": 0}, "--shot 0 must be at least 1"),
    ("omniglot", {"query": 0}, "--query 0 must be at least 1"),
    ("omniglot", {"way": 1}, "--way 1 must be at least 2"),
    ("omniglot", {"way": 5, "train_way": 4}, "--train-way 4 must be at least --way 5"),
    ("omniglot", {"train_shot": 0}, "--train-shot 0 must be at least 1"),
    ("cifar_fs", {"jitter": 1.5}, "--jitter 1.5 must be between 0"),
    ("omniglot", {"jitter": 0.4}, "only cifar_fs has them; drop --jitter for omniglot"),
    ("cifar_fs", {"jitter": 0.4, "augment": False}, "--no-augment turns off; drop one of them"),
    ("copy", {"data_dir": "data"}, r"--data-dir data does nothing for copy: only the few-shot tasks \(omniglot, cifar_fs\) read it"),
])
def test_bad_options_raise_one_clear_sentence(name, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_task(name, **options)


@pytest.mark.tasks
def test_impossible_episodes_name_the_fix():
    fix = "--shot 4 and --query 3 need 7 images of a class, and omniglot has 6; lower --shot or --query"
    with pytest.raises(ValueError, match=fix):
        coded_task(way=2, shot=4, query=3)
    with pytest.raises(ValueError, match="exceeds the 5 classes of the omniglot val split"):
        coded_task(way=6)
    with pytest.raises(ValueError, match="unknown split"):
        make_task("copy").sample(2, "validation")
    with pytest.raises(ValueError, match="batch_size = 0 must be at least 1"):
        coded_task().sample(0)
    with pytest.raises(ValueError, match="--train-way 8 exceeds the 7 classes of the omniglot train split; lower --train-way"):
        coded_task(way=3, train_way=8)
    with pytest.raises(ValueError, match="--train-shot 4 and --query 3 need 7 images of a class, and omniglot has 6; lower --train-shot"):
        coded_task(way=2, shot=1, query=3, train_shot=4)


@pytest.mark.tasks
def test_train_shot_sets_the_support_of_training_episodes_and_shot_that_of_the_others():
    """--shot 3 --train-shot 1: a training episode shows each of its classes once before the queries, a
    validation or test one three times; the context is each split's support set, and the model is sized for
    the longest episode (a test one here)."""
    N, Q = 3, 1
    task = coded_task(way=N, shot=3, query=Q, train_shot=1)
    assert task.seq_len == N * (3 + Q), f"the longest episode is a test one of {N * (3 + Q)} tokens, not {task.seq_len}"
    for split, K in (("train", 1), ("val", 3), ("test", 3)):
        batch = task.sample(16, split, generator=torch.Generator().manual_seed(2))
        codes, _ = decode_codes(batch)
        S = N * K
        assert batch.x.shape[1] == S + N * Q and batch.context == S, \
            f"{split}: expected {S} support tokens then {N * Q} queries, got {batch.x.shape[1]} tokens, context {batch.context}"
        for b in range(16):
            for t in range(S, S + N * Q):
                times = codes[b, :S].tolist().count(codes[b, t].item())
                assert times == K, f"{split} episode {b}: a query's class is {times} times in the support, not {K}"


@pytest.mark.tasks
def test_train_way_trains_on_more_classes_and_tests_choose_among_their_own():
    """--train-way 5 with --way 3: training episodes are 5-way, validation and test ones 3-way with labels
    0..2 in 5-wide label inputs, and their loss and accuracy ignore the two labels their support never shows
    (against cross-entropy and argmax over the first 3 logits, by hand in float64)."""
    task = coded_task(way=3, shot=2, query=1, train_way=5)
    assert (task.d_in, task.d_out, task.seq_len) == (5, 5, 15), "the model is sized for the training episodes"
    generator = torch.Generator().manual_seed(0)
    train = task.sample(4, "train", generator=generator)
    codes, _ = decode_codes(train)
    assert train.x.shape == (4, 15, 5) and train.mask.shape == (4, 15), "a training episode is 5-way: 10 support, 5 queries"
    assert all(len(set(c.tolist())) == 5 for c in codes), "a training episode draws 5 classes"
    for split in ("val", "test"):
        batch = task.sample(6, split, generator=generator)
        codes, _ = decode_codes(batch)
        assert batch.x.shape == (6, 9, 5) and batch.mask.shape == (6, 9), f"a {split} episode is 3-way, in 5-wide labels"
        assert (batch.x[..., 3:] == 0).all() and (batch.target < 3).all(), f"a {split} episode uses labels 0..2 only"
        assert all(len(set(c.tolist())) == 3 for c in codes), f"a {split} episode draws 3 classes"
        logits = torch.randn(6, 9, 5, generator=generator)
        logits[..., 3:] += 100.0                                 # the hidden labels would win every argmax
        among = logits.double()[..., :3]
        log_p = among - among.exp().sum(-1, keepdim=True).log()  # (B, T, 3)
        nll = -log_p.gather(-1, batch.target[..., None])[..., 0]
        assert torch.isclose(task.loss(logits, batch).double(), nll[batch.mask].mean(), atol=1e-6), \
            f"{split}: the loss is not the cross-entropy among the episode's 3 labels"
        right = (among.argmax(-1) == batch.target).double()
        assert torch.allclose(task.metric(logits, batch).double(), (right * batch.mask).sum(1) / batch.mask.sum(1)), \
            f"{split}: the accuracy does not choose among the episode's 3 labels"
    logits = torch.randn(4, 15, 5, generator=generator)
    plain = F.cross_entropy(logits[train.mask], train.target[train.mask])
    assert torch.isclose(task.loss(logits, train), plain), "with every label shown the loss is plain cross-entropy"


@pytest.mark.tasks
def test_evaluation_episodes_do_not_depend_on_the_training_classes():
    """A model trained on 5 classes and one trained on 7 (--train-way) are tested on the same episodes for
    the same seed: the same images, labels and masks, the label inputs only wider. retest.py's scores of a
    20-way model at 5 ways pair with a 5-way model's by episode (README, 5-way 5-shot and 20-way)."""
    narrow, wide = coded_task(way=3, train_way=5), coded_task(way=3, train_way=7)
    for split in ("val", "test"):
        a, b = (task.sample(8, split, generator=torch.Generator().manual_seed(3)) for task in (narrow, wide))
        assert torch.equal(a.images, b.images) and torch.equal(a.target, b.target) and torch.equal(a.mask, b.mask), \
            f"{split}: the training classes changed the episodes drawn"
        assert torch.equal(a.x, b.x[..., :5]) and (b.x[..., 5:] == 0).all(), \
            f"{split}: the label inputs differ beyond their width"


def reference_crop_and_flip(image, top, left, flip, padding):
    """One (C, H, W) image by hand: zero-pad, slice, mirror."""
    C, H, W = image.shape
    padded = np.zeros((C, H + 2 * padding, W + 2 * padding), image.dtype)
    padded[:, padding:padding + H, padding:padding + W] = image
    crop = padded[:, top:top + H, left:left + W]
    return crop[:, :, ::-1] if flip else crop


@pytest.mark.tasks
def test_crop_and_flip_equals_padding_slicing_and_mirroring_by_hand():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (40, 3, 6, 5), dtype=np.uint8)   # no zero pixel: padding shows as 0
    top, left = rng.integers(0, 2 * 2 + 1, (2, 40))
    flip = rng.random(40) < 0.5
    found = tasks.crop_and_flip(torch.from_numpy(images), torch.from_numpy(top), torch.from_numpy(left),
                                torch.from_numpy(flip), padding=2).numpy()
    for i in range(40):
        want = reference_crop_and_flip(images[i], top[i], left[i], flip[i], 2)
        assert np.array_equal(found[i], want), f"image {i} (top {top[i]}, left {left[i]}, flip {flip[i]}) differs"
    centre = torch.full((40,), 2)
    mirrored = tasks.crop_and_flip(torch.from_numpy(images), centre, centre, torch.ones(40, dtype=torch.bool), 2)
    assert torch.equal(mirrored, torch.from_numpy(images).flip(-1)), "a flipped, unshifted image is its mirror"
    same = tasks.crop_and_flip(torch.from_numpy(images), centre, centre, torch.zeros(40, dtype=torch.bool), 2)
    assert torch.equal(same, torch.from_numpy(images)), "unshifted and unflipped, an image stays itself"


@pytest.mark.tasks
@pytest.mark.parametrize("name, padding, flips", [("cifar_fs", 4, True), ("omniglot", 2, False)])
def test_augmentation_changes_only_training_episodes_by_a_crop_and_flip(name, padding, flips):
    """A few-shot task with and without augmentation, sampled from the same seed: validation and test episodes
    are identical; every training image is one of the shifts by up to `padding` pixels of its original,
    mirrored or not (CIFAR-FS) or never mirrored (Omniglot), and shifts and mirrors both occur."""
    rng = np.random.default_rng(0)
    splits = {split: rng.integers(1, 256, (6, 4, 3, 8, 8), dtype=np.uint8) for split in SPLITS}
    names = {split: [f"{split}{i}" for i in range(6)] for split in SPLITS}
    plain, augmented = (FewShot(TaskConfig(name=name, augment=augment), splits, names, (0.0,) * 3, (1.0,) * 3)
                        for augment in (False, True))
    assert augmented.augmentation == (padding, flips) and plain.augmentation is None, "--no-augment turns it off"
    for split in SPLITS:
        a, b = (task.sample(16, split, generator=torch.Generator().manual_seed(1)) for task in (plain, augmented))
        assert a.images.shape == b.images.shape == (16, 10, 3, 8, 8), f"{split}: augmentation keeps the shapes"
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x", "target", "mask")), \
            f"{split}: augmentation must not change the episode, only its images"
        if split != "train":
            assert torch.equal(a.images, b.images), f"{split} images must never be augmented"
            continue
        originals = (a.images.flatten(0, 1) * 255).round().to(torch.uint8)   # mean 0, std 1: pixel / 255
        found = (b.images.flatten(0, 1) * 255).round().to(torch.uint8)
        kinds = set()
        for original, image in zip(originals.numpy(), found.numpy()):
            shifts = range(2 * padding + 1)
            matches = [(top, left, flip) for top in shifts for left in shifts for flip in (False, True)
                       if np.array_equal(image, reference_crop_and_flip(original, top, left, flip, padding))]
            assert matches, f"an augmented training image must be a crop of its original, shifted by up to {padding}"
            kinds |= {((top, left) != (padding, padding), flip) for top, left, flip in matches}
        assert any(shifted for shifted, _ in kinds), "160 training images must include shifted ones"
        assert {flip for _, flip in kinds} == ({False, True} if flips else {False}), \
            "CIFAR-FS images are mirrored half the time, Omniglot's never"


@pytest.mark.tasks
def test_the_crops_padding_is_black_before_normalisation():
    """The crop pads with black pixels, which normalisation then maps to -mean / std = -2 (here mean 0.5, std
    0.25), as torchvision's RandomCrop before Normalize does: padding after normalising would show the mean."""
    splits = {split: np.full((6, 4, 3, 8, 8), 200, np.uint8) for split in SPLITS}
    names = {split: [f"{split}{i}" for i in range(6)] for split in SPLITS}
    task = FewShot(TaskConfig(name="cifar_fs"), splits, names, (0.5,) * 3, (0.25,) * 3)
    images = task.sample(16, "train", generator=torch.Generator().manual_seed(0)).images
    drawn, black = (200 / 255 - 0.5) / 0.25, (0 - 0.5) / 0.25
    is_drawn, is_black = (images - drawn).abs() < 1e-5, (images - black).abs() < 1e-5
    assert (is_drawn | is_black).all(), f"a training pixel is neither the image's {drawn:.3f} nor black padding's {black}"
    assert is_black.any(), "160 training images shifted by up to 4 pixels must show some black padding"


@pytest.mark.tasks
@pytest.mark.parametrize("flip", [True, False])
def test_random_crop_and_flip_draws_every_shift_and_mirrors_half_the_images(flip, monkeypatch):
    """The draws random_crop_and_flip hands to crop_and_flip, over 4,000 images: each image its own shift,
    every shift from 0 to 2 padding pixels taken about equally often each way, and a mirror with probability
    1/2 (never without flip)."""
    drawn = []
    monkeypatch.setattr(tasks, "crop_and_flip", lambda images, top, left, mirror, padding: drawn.append((top, left, mirror)))
    tasks.random_crop_and_flip(torch.zeros(4000, 1, 4, 4), padding=2, flip=flip, generator=torch.Generator().manual_seed(0))
    (top, left, mirror), = drawn
    for name, shift in (("top", top), ("left", left)):
        counts = torch.bincount(shift, minlength=5).tolist()
        assert len(counts) == 5 and min(counts) > 700, f"{name} shifts 0-4 should each occur about 800 times, got {counts}"
    assert (top != left).float().mean() > 0.7, "the two directions are drawn apart, image by image"
    share = mirror.float().mean().item()
    assert (0.45 < share < 0.55) if flip else share == 0, f"mirrored share {share:.3f}, expected {0.5 if flip else 0}"


def reference_color_jitter(image, factors, order):
    """One (3, H, W) float64 image by hand, torchvision's ColorJitter on a float image with its draws given:
    brightness, contrast, saturation (0, 1, 2) in `order`, each factor * image + (1 - factor) * target,
    clipped to [0, 1]."""
    for op in order:
        grey = 0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2]          # (H, W)
        target = [np.zeros_like(image), np.full_like(image, grey.mean()), np.broadcast_to(grey, image.shape)][op]
        image = np.clip(factors[op] * image + (1 - factors[op]) * target, 0, 1)
    return image


@pytest.mark.tasks
def test_color_jitter_equals_torchvisions_formulas_by_hand():
    rng = np.random.default_rng(0)
    images = rng.random((30, 3, 5, 4))
    factors = rng.uniform(0.3, 1.7, (30, 3))                # beyond 0.6-1.4, so that the clipping acts
    order = np.stack([rng.permutation(3) for _ in range(30)])
    found = tasks.color_jitter(*map(torch.from_numpy, (images, factors, order))).numpy()
    for i in range(30):
        want = reference_color_jitter(images[i], factors[i], order[i])
        assert np.allclose(found[i], want, atol=1e-12), f"image {i} (factors {factors[i]}, order {order[i]}) differs"
    x, ones, fixed = torch.from_numpy(images), torch.ones(30, 3, dtype=torch.float64), torch.tensor([[0, 1, 2]] * 30)
    assert torch.equal(tasks.color_jitter(x, ones, fixed), x), "factors of 1 leave every image as it is"
    grey = tasks.color_jitter(x, torch.tensor([[1.0, 1.0, 0.0]] * 30, dtype=torch.float64), fixed)
    assert torch.allclose(grey, grey[:, :1].expand_as(grey)), "saturation 0 leaves a grey image, its channels equal"
    flat = tasks.color_jitter(x, torch.tensor([[1.0, 0.0, 1.0]] * 30, dtype=torch.float64), fixed)
    assert torch.allclose(flat, flat[:, :1, :1, :1].expand_as(flat)), "contrast 0 leaves one grey level"
    dark = tasks.color_jitter(x, torch.tensor([[0.0, 1.0, 1.0]] * 30, dtype=torch.float64), fixed)
    assert (dark == 0).all(), "brightness 0 leaves a black image"
    later = tasks.color_jitter(x, torch.from_numpy(factors), torch.tensor([[2, 1, 0]] * 30))
    assert not torch.allclose(later, tasks.color_jitter(x, torch.from_numpy(factors), fixed)), "the order matters"


@pytest.mark.tasks
@pytest.mark.parametrize("strength", [0.4, 0.1])
def test_jitter_recolours_only_training_images_with_factors_and_orders_as_drawn(monkeypatch, strength):
    """CIFAR-FS with and without --jitter s, sampled from the same seed: the episodes and their crops are the
    same, validation and test images untouched, and every training image is color_jitter of its plain
    augmented self with factors in [1 - s, 1 + s] (ColorJitter's range) and a permutation for order, as they
    were drawn."""
    rng = np.random.default_rng(0)
    splits = {split: rng.integers(1, 256, (6, 4, 3, 8, 8), dtype=np.uint8) for split in SPLITS}
    names = {split: [f"{split}{i}" for i in range(6)] for split in SPLITS}
    plain, jittered = (FewShot(TaskConfig(name="cifar_fs", jitter=jitter), splits, names, (0.0,) * 3, (1.0,) * 3)
                       for jitter in (0.0, strength))
    drawn, color_jitter = [], tasks.color_jitter

    def recorded(images, factors, order):
        drawn.append((images, factors, order))
        return color_jitter(images, factors, order)

    monkeypatch.setattr(tasks, "color_jitter", recorded)
    for split in SPLITS:
        drawn.clear()
        a, b = (task.sample(16, split, generator=torch.Generator().manual_seed(1)) for task in (plain, jittered))
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x", "target", "mask")), \
            f"{split}: jitter must not change the episode, only its images"
        if split != "train":
            assert torch.equal(a.images, b.images) and not drawn, f"{split} images must never be jittered"
            continue
        (images, factors, order), = drawn
        assert torch.equal(images, a.images.flatten(0, 1)), "jitter acts on the cropped and mirrored images"
        low, high = 1 - strength, 1 + strength
        assert factors.min() >= low and factors.max() <= high, f"factors drawn from [{low}, {high}]"
        assert factors.min() < 1 - 0.75 * strength and factors.max() > 1 + 0.75 * strength, \
            f"480 factors should span [{low}, {high}], got [{factors.min():.2f}, {factors.max():.2f}]: images " \
            f"are darkened and brightened alike"
        assert (order.sort(1).values == torch.arange(3)).all() and len(set(map(tuple, order.tolist()))) > 1, \
            "each image's order is a permutation, and they differ"
        assert torch.allclose(b.images.flatten(0, 1), color_jitter(images, factors, order)), \
            "training images are the jittered ones"
        assert not torch.allclose(a.images, b.images), "jitter must change the training images"


def thirteen_alphabets(monkeypatch):
    """13 background alphabets A0-A12 of 10 characters, 7 evaluation characters, random drawings; Vinyals's
    rule here tests on the last 3 characters and validates on alphabets A1 and A2."""
    monkeypatch.setattr(tasks, "OMNIGLOT_VINYALS_TEST", 3)
    monkeypatch.setattr(tasks, "OMNIGLOT_VINYALS_VAL_ALPHABETS", ("A1", "A2"))
    rng = np.random.default_rng(0)
    return {"background": rng.integers(0, 256, (130, 20, 28, 28), dtype=np.uint8),
            "background_names": np.array([f"A{i // 10}/character{i % 10 + 1:02d}" for i in range(130)]),
            "evaluation": rng.integers(0, 256, (7, 20, 28, 28), dtype=np.uint8),
            "evaluation_names": np.array([f"E/character{i + 1:02d}" for i in range(7)])}


@pytest.mark.tasks
@pytest.mark.parametrize("split, sizes", [("lake", (30, 100, 7)), ("vinyals", (114, 20, 3))])
def test_omniglot_splits_are_disjoint_and_rotations_are_new_classes(split, sizes, monkeypatch):
    """thirteen_alphabets: Lake's split validates on 100 background characters, trains on the other 30 and
    tests on the evaluation ones; Vinyals's tests on the last 3, validates on A1 and A2, trains on the other 114."""
    data = thirteen_alphabets(monkeypatch)
    splits, names = tasks.omniglot_splits(data, rotations=True, split=split)
    train, val, test = sizes
    assert {s: len(v) for s, v in splits.items()} == {"train": 4 * train, "val": val, "test": test}, \
        f"expected {train} x 4 rotations / {val} / {test} classes"
    assert splits["train"].shape[1:] == (20, 1, 28, 28), "split arrays are (classes, images, C, H, W)"
    characters = {s: {n.split(" rotated")[0] for n in v} for s, v in names.items()}
    assert not characters["train"] & characters["val"], "a validation character is also a training character"
    assert not (characters["train"] | characters["val"]) & characters["test"], "test characters must be unseen"
    assert sum(map(len, characters.values())) == 137, "every character belongs to one split"
    assert not any("rotated" in n for n in names["val"] + names["test"]), "only training characters are rotated"
    index = names["train"].index(names["train"][0].replace("rotated 0", "rotated 90"))
    assert np.array_equal(splits["train"][index], np.rot90(splits["train"][0], 1, axes=(2, 3))), \
        "a rotated class must hold the rotated drawings of its character"
    all_names = list(data["background_names"]) + list(data["evaluation_names"])
    images = {name: drawings for name, drawings in zip(all_names, np.concatenate([data["background"], data["evaluation"]]))}
    assert all(np.array_equal(splits["test"][i, :, 0], images[n]) for i, n in enumerate(names["test"])), \
        "each test class must hold its own character's drawings"
    if split == "vinyals":
        assert names["test"] == ["E/character05", "E/character06", "E/character07"], "the last characters test"
        assert characters["val"] == {n for n in all_names if n.split("/")[0] in ("A1", "A2")}, "A1 and A2 validate"
    assert names == tasks.omniglot_splits(data, split=split)[1], "the split is the same in every run"
    assert len(tasks.omniglot_splits(data, rotations=False, split=split)[0]["train"]) == train, \
        f"without rotations: the {train} training characters"


@pytest.mark.tasks
@pytest.mark.parametrize("split", ["vinyals", "lake"])
def test_train_on_val_trains_on_the_validation_characters_too_and_leaves_validation_and_test_alone(split, monkeypatch):
    """thirteen_alphabets: with train_on_val every validation character is a training one as well, in its four
    rotations, beside the split's own training characters; validation and test are unchanged."""
    data = thirteen_alphabets(monkeypatch)
    (apart, apart_names), (joined, joined_names) = (tasks.omniglot_splits(data, split=split, train_on_val=on)
                                                    for on in (False, True))
    for part in ("val", "test"):
        assert joined_names[part] == apart_names[part] and np.array_equal(joined[part], apart[part]), \
            f"train_on_val must leave the {part} classes as they are"
    characters = {n.split(" rotated")[0] for n in joined_names["train"]}
    assert characters == {n.split(" rotated")[0] for n in apart_names["train"]} | set(apart_names["val"]), \
        "the training characters are the split's own and its validation ones, no test character"
    assert len(joined_names["train"]) == 4 * len(characters), "each of them in four rotations"
    index = {name: i for i, name in enumerate(joined_names["train"])}
    for i, name in enumerate(apart_names["val"]):
        turned = joined["train"][index[f"{name} rotated 90"]]
        assert np.array_equal(turned, np.rot90(apart["val"][i], 1, axes=(2, 3))), \
            f"{name} rotated 90 must hold that validation character's drawings, rotated"
    assert not characters & set(apart_names["test"]), "a test character must never train"


@pytest.mark.tasks
def test_a_split_the_archives_are_too_small_for_is_refused(monkeypatch):
    """2 evaluation characters cannot give Vinyals's last 3 for test (that would test a background character),
    nor 4 background characters Lake's 4 for validation and some for training."""
    data = {"background": np.zeros((4, 2, 28, 28), np.uint8),
            "background_names": np.array([f"A/character{i + 1:02d}" for i in range(4)]),
            "evaluation": np.zeros((2, 2, 28, 28), np.uint8),
            "evaluation_names": np.array(["E/character01", "E/character02"])}
    monkeypatch.setattr(tasks, "OMNIGLOT_VINYALS_TEST", 3)
    with pytest.raises(ValueError, match="only 2 evaluation characters, but Vinyals's split tests on the last 3"):
        tasks.omniglot_splits(data, split="vinyals")
    monkeypatch.setattr(tasks, "OMNIGLOT_VAL_CHARACTERS", 4)
    with pytest.raises(ValueError, match="only 4 background characters, but 4 are held out for validation"):
        tasks.omniglot_splits(data, split="lake")


@pytest.mark.tasks
def test_cifar_fs_split_is_64_16_20_disjoint_and_picks_by_name():
    split = tasks.CIFAR_FS_SPLIT
    assert [len(split[s]) for s in SPLITS] == [64, 16, 20], "CIFAR-FS has 64 / 16 / 20 classes"
    assert len(set(split["train"]) | set(split["val"]) | set(split["test"])) == 100, "the splits overlap"
    names = np.array(sorted(split["train"] + split["val"] + split["test"]))
    images = np.arange(100, dtype=np.uint8)[:, None, None, None, None] * np.ones((1, 2, 3, 1, 1), np.uint8)
    splits, class_names = tasks.cifar_fs_splits({"images": images, "names": names})
    for s in SPLITS:
        picked = [names[i] for i in splits[s][:, 0, 0, 0, 0]]
        assert picked == split[s] == class_names[s], f"{s}: the images must be those of the named classes"
    splits, class_names = tasks.cifar_fs_splits({"images": images, "names": names}, train_on_val=True)
    for s, want in (("train", split["train"] + split["val"]), ("val", split["val"]), ("test", split["test"])):
        picked = [names[i] for i in splits[s][:, 0, 0, 0, 0]]
        assert picked == want == class_names[s], f"train_on_val, {s}: the 64 training classes and the 16 " \
            f"validation ones train, and validation and test stay as they are"


@pytest.mark.tasks
def test_make_task_passes_train_on_val_and_rotations_to_the_split(monkeypatch):
    """make_task, as train.py builds its task, gives train_on_val to each dataset's split: Omniglot on
    thirteen_alphabets trains on 114 + 20 characters in four rotations, CIFAR-FS on 64 + 16 classes; and
    --no-rotations to Omniglot's: 114 training classes, not 4 x 114."""
    data = thirteen_alphabets(monkeypatch)
    monkeypatch.setattr(tasks, "load_omniglot", lambda data_dir: data)
    names = np.array(sorted(sum(tasks.CIFAR_FS_SPLIT.values(), [])))
    monkeypatch.setattr(tasks, "load_cifar100", lambda data_dir: {"images": np.zeros((100, 2, 3, 32, 32), np.uint8),
                                                                   "names": names})
    for name, want in (("omniglot", (4 * 134, 20, 3)), ("cifar_fs", (80, 16, 20))):
        found = tuple(len(make_task(name, way=2, train_on_val=True).class_names[s]) for s in SPLITS)
        assert found == want, f"{name} with train_on_val: {found} train / val / test classes, expected {want}"
    found = len(make_task("omniglot", way=2, rotations=False).class_names["train"])
    assert found == 114, f"without rotations Omniglot trains on its 114 characters alone, found {found} classes"


@pytest.mark.tasks
def test_train_on_val_is_refused_for_a_task_without_validation_classes():
    """Only the few-shot tasks have validation classes to train on; the others refuse it, naming the fix."""
    for name in ("copy", "regression", "cue_reward"):
        with pytest.raises(ValueError, match=f"{name} has none; drop --train-on-val"):
            TaskConfig(name=name, train_on_val=True)


@pytest.mark.cli
def test_option_flag_is_the_command_line_that_sets_the_field():
    """Refusals name options as the command line gives them, not as the dataclasses call them."""
    cases = ((("shot", 5), "--shot 5"), (("omniglot_split", "lake"), "--split lake"), (("name", "copy"), "--task copy"),
             (("augment", True), "--augment"), (("augment", False), "--no-augment"), (("eta", None), "--eta"),
             (("encoder_widths", (96, 192)), "--encoder-widths 96 192"), (("plastic_blocks", [1, 3]), "--plastic-blocks 1 3"))
    for (name, value), flag in cases:
        assert tasks.option_flag(name, value) == flag, f"{name}={value!r} is set by {flag}, not {tasks.option_flag(name, value)}"


# ----------------------------------------------------------------------------------------------
# Loaders on tiny archives (marker: data)

def drawing_png(rows):
    """A 105x105 1-bit PNG, white paper with black ink on the first `rows` rows, as Omniglot's."""
    image = Image.new("1", (105, 105), 1)
    image.paste(0, (0, 0, 105, rows))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_omniglot_zip(path, alphabets, drawings=3):
    """Official layout: <top>/<Alphabet>/characterNN/<id>_<drawing>.png; character j has j*20+20 inked rows."""
    top = path.stem
    with zipfile.ZipFile(path, "w") as archive:
        for alphabet, characters in alphabets.items():
            for j in range(characters):
                for d in range(drawings):
                    name = f"{top}/{alphabet}/character{j + 1:02d}/{j:04d}_{d + 1:02d}.png"
                    archive.writestr(name, drawing_png(20 * j + 20))


@pytest.fixture
def tiny_omniglot(tmp_path, monkeypatch):
    """data_dir with 4 background characters (2 alphabets) and 2 evaluation characters, 3 drawings each."""
    folder = tmp_path / "omniglot"
    folder.mkdir()
    write_omniglot_zip(folder / "images_background.zip", {"Alpha": 3, "Beta": 1})
    write_omniglot_zip(folder / "images_evaluation.zip", {"Gamma": 2})
    files = {name: (url, md5, *counts) for (name, (url, md5, *_)), counts
             in zip(tasks.OMNIGLOT_FILES.items(), [(2, 4), (1, 2)])}
    monkeypatch.setattr(tasks, "OMNIGLOT_FILES", files)
    monkeypatch.setattr(tasks, "OMNIGLOT_DRAWINGS", 3)
    monkeypatch.setattr(tasks, "OMNIGLOT_VAL_CHARACTERS", 2)
    monkeypatch.setattr(tasks, "OMNIGLOT_VINYALS_TEST", 2)  # Vinyals's split: Alpha validates, Beta trains, Gamma tests
    monkeypatch.setattr(tasks, "OMNIGLOT_VINYALS_VAL_ALPHABETS", ("Alpha",))
    return tmp_path


CIFAR_NAMES = sorted(sum(tasks.CIFAR_FS_SPLIT.values(), []))


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 wrote its str (BINSTRING), as in CIFAR's own pickles; Python 3's
    protocol 2 would ask for _codecs.encode instead, which no CIFAR file does."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)
    dispatch[bytes] = save_python2_str


def cifar_pickle(labels, part):
    """A CIFAR-style batch: red plane = class, green plane = part (0 train, 1 test), blue = pixel index."""
    data = np.zeros((len(labels), 3, 1024), np.uint8)
    data[:, 0], data[:, 1], data[:, 2] = np.array(labels)[:, None], part, np.arange(1024) % 256
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump({
        "batch_label": "tiny", "fine_labels": list(labels), "coarse_labels": [0] * len(labels),
        "filenames": [f"{i}.png" for i in range(len(labels))], "data": data.reshape(len(labels), 3072)})
    assert b"_codecs" not in buffer.getvalue(), "the test pickle must need only what CIFAR's pickles need"
    return buffer.getvalue()


def write_cifar_tar(path, members):
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """data_dir with a CIFAR-100 archive of 3 images per class: 2 in train (shuffled), 1 in test."""
    folder = tmp_path / "cifar100"
    folder.mkdir()
    train_labels = np.random.default_rng(0).permutation(np.repeat(np.arange(100), 2)).tolist()
    meta = pickle.dumps({"fine_label_names": CIFAR_NAMES, "coarse_label_names": ["x"] * 20}, protocol=2)
    write_cifar_tar(folder / "cifar-100-python.tar.gz",
                    {"meta": meta, "train": cifar_pickle(train_labels, 0), "test": cifar_pickle(list(range(100)), 1)})
    monkeypatch.setattr(tasks, "CIFAR_IMAGES", 3)
    return tmp_path


@pytest.mark.data
def test_omniglot_decodes_with_bright_strokes_and_caches(tiny_omniglot, monkeypatch, capsys):
    data = tasks.load_omniglot(tiny_omniglot)
    md5 = tasks.md5sum(tiny_omniglot / "omniglot" / "images_background.zip")
    assert f"md5 {md5}" in capsys.readouterr().out, "the md5 of a hand-placed archive must be reported"
    assert data["background"].shape == (4, 3, 28, 28) and data["background"].dtype == np.uint8, \
        "background must be (characters, drawings, 28, 28) uint8"
    assert data["evaluation"].shape == (2, 3, 28, 28), "evaluation (characters, drawings, 28, 28)"
    expected = ["Alpha/character01", "Alpha/character02", "Alpha/character03", "Beta/character01"]
    assert list(data["background_names"]) == expected, "names must be 'Alphabet/characterNN', sorted"
    first = data["background"][0, 0]                            # ink on rows 0..19 of 105 -> rows 0..4 of 28
    assert first[:5].min() == 255 and first[6:].max() == 0, "strokes must be bright (255) on a dark (0) background"
    for j, inked in enumerate((20, 40, 60)):                    # character j: ink on its first 20j + 20 of 105 rows
        drawing = data["background"][j, 0].astype(float)
        assert abs(drawing.mean() - 255 * inked / 105) < 1.5, \
            f"character {j}: mean {drawing.mean():.1f}, not the {255 * inked / 105:.1f} of its ink: not area-averaged"
    edges = data["background"][:2, 0]                           # ink ending mid-row: 20 / 3.75 and 40 / 3.75
    assert ((edges > 0) & (edges < 255)).any(1).all(), "a partly inked row must come out grey (antialiased), not 0 or 255"
    ink = data["background"][:3, 0].mean((1, 2))
    assert (np.diff(ink) > 0).all(), "each character must keep its own drawings"
    caches = list((tiny_omniglot / "omniglot").glob("omniglot_28px_v*.npz"))
    assert len(caches) == 1, f"one cache beside the writable archives, named with size and version, found {caches}"
    assert not list((tiny_omniglot / "omniglot").glob("*.part")), "no temporary file may be left behind"

    def no_decoding(path):
        raise AssertionError("decoded again although a cache exists")
    monkeypatch.setattr(tasks, "decode_omniglot", no_decoding)
    again = tasks.load_omniglot(tiny_omniglot)
    assert all(np.array_equal(data[k], again[k]) for k in data), "the cache must return exactly the decoded arrays"


@pytest.mark.data
def test_characters_come_in_name_order_whatever_order_the_zip_stores_them(tiny_omniglot):
    """A re-packed archive may store its members in any order; the characters still come in name order (the
    archive order Vinyals's split takes its last characters from), each with its own drawings."""
    want = tasks.load_omniglot(tiny_omniglot)
    path = tiny_omniglot / "omniglot" / "images_background.zip"
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:                  # the same members, stored last to first
        for name, payload in reversed(members):
            archive.writestr(name, payload)
    found = tasks.load_omniglot(tiny_omniglot)                   # other bytes: decoded again
    assert list(found["background_names"]) == list(want["background_names"]) == \
        ["Alpha/character01", "Alpha/character02", "Alpha/character03", "Beta/character01"], \
        f"characters must come in name order, got {list(found['background_names'])}"
    assert np.array_equal(found["background"], want["background"]), "each character must keep its own drawings"


@pytest.mark.data
def test_the_cache_follows_the_archives_contents_not_their_times(tiny_omniglot, tmp_path, monkeypatch):
    """An archive touched, or copied to another folder (new times, same bytes), is served from the cache of
    its contents; an archive whose bytes change is decoded again."""
    decoded = []
    decode = tasks.decode_omniglot
    monkeypatch.setattr(tasks, "decode_omniglot", lambda path: decoded.append(path.name) or decode(path))
    data = tasks.load_omniglot(tiny_omniglot)
    assert sorted(decoded) == ["images_background.zip", "images_evaluation.zip"], f"setup: both decoded, got {decoded}"
    folder = tiny_omniglot / "omniglot"
    os.utime(folder / "images_background.zip", (1e9, 1e9))
    monkeypatch.setenv("PLASTIC_CACHE", str(tmp_path / "unused"))
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy / "omniglot", copy_function=shutil.copy)   # new times; the cache goes along
    for where in (tiny_omniglot, copy):
        decoded.clear()
        again = tasks.load_omniglot(where)
        assert not decoded, f"{where}: decoded {decoded} again although archives of these contents were cached"
        assert all(np.array_equal(data[k], again[k]) for k in data), f"{where}: the cache must return the decoded arrays"
    with zipfile.ZipFile(folder / "images_background.zip", "a") as archive:
        archive.writestr("README.txt", "new bytes, the same drawings")
    decoded.clear()
    tasks.load_omniglot(tiny_omniglot)
    assert decoded == ["images_background.zip", "images_evaluation.zip"], \
        f"an archive whose bytes changed must be decoded again, got {decoded}"


@pytest.mark.data
def test_a_damaged_cache_is_named_deleted_and_rebuilt(tiny_omniglot, capsys):
    data = tasks.load_omniglot(tiny_omniglot)
    [cache] = (tiny_omniglot / "omniglot").glob("omniglot_28px_v*.npz")
    flipped = lambda b: b[:len(b) // 2] + bytes(255 - x for x in b[len(b) // 2:len(b) // 2 + 64]) + b[len(b) // 2 + 64:]
    damages = {"truncated": lambda b: b[:len(b) // 2], "bytes changed": flipped}
    for damage, change in damages.items():
        cache.write_bytes(change(cache.read_bytes()))
        capsys.readouterr()
        again = tasks.load_omniglot(tiny_omniglot)
        said = [line for line in capsys.readouterr().out.splitlines() if "was damaged" in line]
        assert len(said) == 1 and str(cache) in said[0] and "deleted" in said[0], \
            f"{damage}: one line must name the damaged cache and say it was deleted, got {said}"
        assert all(np.array_equal(data[k], again[k]) for k in data), f"{damage}: the archives must be decoded again"
        assert set(tasks.read_cache(cache)) == set(data), f"{damage}: the rebuilt cache must be whole again"


@pytest.mark.data
def test_a_hand_placed_archive_with_another_md5_is_reported_calmly(tiny_omniglot, capsys):
    tasks.load_omniglot(tiny_omniglot)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("decoding")]
    assert len(lines) == 2 and all("checked" in line for line in lines), f"each archive's line says it is checked: {lines}"
    alarming = [line for line in lines if any(word in line.lower() for word in ("mismatch", "error", "warning", "fail"))]
    assert not alarming, f"an md5 other than the published one is expected for a copy and must not alarm: {alarming}"


@pytest.mark.data
def test_omniglot_task_end_to_end_on_tiny_archives(tiny_omniglot):
    vinyals = make_task("omniglot", data_dir=str(tiny_omniglot), way=2)
    assert {s: len(v) for s, v in vinyals.class_names.items()} == {"train": 4, "val": 3, "test": 2}, \
        "Vinyals's split (the default): expected 1 x 4 rotations / 3 / 2 classes"
    task = make_task("omniglot", data_dir=str(tiny_omniglot), way=2, shot=1, query=2, omniglot_split="lake")
    assert {s: len(v) for s, v in task.class_names.items()} == {"train": 8, "val": 2, "test": 2}, \
        "Lake's split: expected 2 x 4 rotations / 2 / 2 classes"
    batch = task.sample(3, "test")
    assert batch.images.shape == (3, 6, 1, 28, 28) and task.image_shape == (1, 28, 28), \
        "omniglot images are (1, 28, 28)"
    assert 0 <= batch.images.min() and batch.images.max() <= 1, "omniglot images lie in [0, 1]"
    with pytest.raises(ValueError, match="exceeds the 2 classes of the omniglot val split"):
        make_task("omniglot", data_dir=str(tiny_omniglot), way=3, omniglot_split="lake")
    with pytest.raises(ValueError, match="unknown Omniglot split 'vinyal'; choose one of vinyals, lake"):
        make_task("omniglot", data_dir=str(tiny_omniglot), omniglot_split="vinyal")


@pytest.mark.data
def test_read_only_data_folder_caches_elsewhere(tiny_omniglot, tmp_path, monkeypatch):
    folder = tiny_omniglot / "omniglot"
    monkeypatch.setenv("PLASTIC_CACHE", str(tmp_path / "cache"))
    folder.chmod(0o555)
    try:
        tasks.load_omniglot(tiny_omniglot)
    finally:
        folder.chmod(0o755)
    assert not list(folder.glob("*.npz")), "nothing may be written into a read-only data folder"
    assert len(list((tmp_path / "cache").glob("omniglot_28px_*.npz"))) == 1, "the cache goes to $PLASTIC_CACHE"


@pytest.mark.data
def test_a_cache_that_cannot_be_written_leaves_nothing_and_the_data_loads(tiny_omniglot, monkeypatch, capsys):
    """A full disk while the cache is written: the decoded arrays are returned, the partial file is deleted,
    and one line says the data was not cached and what to do."""
    want = tasks.load_omniglot(tiny_omniglot)
    for cache in (tiny_omniglot / "omniglot").glob("*.npz"):
        cache.unlink()

    def full_disk(file, **arrays):
        file.write(b"the first bytes")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tasks.np, "savez", full_disk)
    found = tasks.load_omniglot(tiny_omniglot)
    assert all(np.array_equal(found[key], want[key]) for key in want), "the decoded data must still be returned"
    assert sorted(p.name for p in (tiny_omniglot / "omniglot").iterdir()) == sorted(tasks.OMNIGLOT_FILES), \
        "a cache that failed to be written must leave no file behind"
    out = capsys.readouterr().out
    assert "not cached (" in out and "set PLASTIC_CACHE" in out, f"one line must say the data was not cached, and why: {out}"


@pytest.mark.data
def test_data_dir_comes_from_argument_environment_or_default(tiny_omniglot, monkeypatch):
    monkeypatch.delenv("PLASTIC_DATA", raising=False)
    assert tasks.data_folder() == Path("data"), "default data folder is ./data"
    monkeypatch.setenv("PLASTIC_DATA", str(tiny_omniglot))
    assert tasks.data_folder() == tiny_omniglot, "without an argument, $PLASTIC_DATA"
    assert tasks.data_folder("elsewhere") == Path("elsewhere"), "an argument wins over $PLASTIC_DATA"
    assert tasks.load_omniglot()["background"].shape[0] == 4, \
        "the loaders must find the archives through $PLASTIC_DATA"


@pytest.mark.data
def test_wrong_structure_and_damaged_archives_are_refused(tiny_omniglot):
    folder = tiny_omniglot / "omniglot"
    write_omniglot_zip(folder / "images_background.zip", {"Alpha": 3, "Beta": 1}, drawings=2)
    with pytest.raises(ValueError, match="is not the official images_background.zip"):
        tasks.load_omniglot(tiny_omniglot)
    (folder / "images_background.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="is damaged"):
        tasks.load_omniglot(tiny_omniglot)
    write_omniglot_zip(folder / "images_background.zip", {"Alpha": 3, "Beta": 1})
    damaged = bytearray((folder / "images_background.zip").read_bytes())
    entry = damaged.index(b"PK\x01\x02")                          # the first member's central directory record
    damaged[entry + 8] |= 0x20                                       # its flag bit 5, which zipfile cannot read
    (folder / "images_background.zip").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="is damaged"):
        tasks.load_omniglot(tiny_omniglot)


@pytest.mark.data
def test_missing_files_without_network_name_files_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        tasks.load_omniglot(tmp_path)
    message = str(error.value)
    for part in ("images_background.zip", "images_evaluation.zip", str((tmp_path / "omniglot").resolve())):
        assert part in message, f"the message must name {part}: {message}"
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz not found in"):
        tasks.load_cifar100(tmp_path)
    assert not list(tmp_path.rglob("*.part")), "a failed download must leave no partial file"
    assert not list(tmp_path.iterdir()), f"a failed download must remove the folders it made: {list(tmp_path.rglob('*'))}"


@pytest.mark.data
def test_a_failed_download_removes_the_empty_folders_it_made_and_nothing_else(tmp_path, monkeypatch):
    """A mistyped --data-dir must not leave folders behind; a folder that was there, empty or not, and a file
    that did download, stay."""
    def failed(folder, **files):
        with pytest.raises((FileNotFoundError, ValueError)):
            tasks.fetch(folder, {name: ("https://example.invalid/" + name, md5) for name, md5 in files.items()})
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    assert failed(tmp_path / "dta" / "more" / "omniglot", a="0" * 32) == [], "the three folders it made must go"
    (tmp_path / "empty").mkdir()
    assert failed(tmp_path / "empty" / "omniglot", a="0" * 32) == ["empty"], "a folder that was there stays, if empty"
    assert failed(tmp_path / "new" / ".." / "empty" / "omniglot", a="0" * 32) == ["empty"], \
        "new/../empty names empty/: no new/ is made, and empty/ is not removed"
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    assert failed(tmp_path / "empty" / "omniglot", a="0" * 32) == ["empty", "empty/notes.txt"], "the user's file stays"

    content = b"the official bytes"
    first = tasks.hashlib.md5(content).hexdigest()
    monkeypatch.setattr(tasks, "download", lambda url, path: Path(path).write_bytes(content))
    assert failed(tmp_path / "bad", a="0" * 32) == ["empty", "empty/notes.txt"], \
        "a download of the wrong md5 removes its folders too"
    def second_fails(url, path):
        if url.endswith("/b"):
            raise ConnectionResetError("connection lost")
        Path(path).write_bytes(content)
    monkeypatch.setattr(tasks, "download", second_fails)
    assert failed(tmp_path / "new", a=first, b=first) == ["empty", "empty/notes.txt", "new", "new/a"], \
        "a file that downloaded stays, with its folder"


@pytest.mark.data
def test_a_data_folder_given_one_level_low_is_named_with_the_folder_to_give(tiny_omniglot):
    """--data-dir data/omniglot rather than data: the archives are there, one level above where they are
    looked for; the message names the folder to give, and nothing is downloaded or created."""
    with pytest.raises(FileNotFoundError, match=f"point PLASTIC_DATA \\(or --data-dir\\) at {tiny_omniglot.resolve()}"):
        tasks.load_omniglot(tiny_omniglot / "omniglot")
    assert not (tiny_omniglot / "omniglot" / "omniglot").exists(), "no folder may be created inside the data"


@pytest.mark.data
def test_download_is_checked_by_md5_and_atomic(tmp_path, monkeypatch):
    content = b"the official bytes"
    monkeypatch.setattr(tasks, "download", lambda url, path: Path(path).write_bytes(content))
    expected = {"file.bin": ("https://example.invalid/file.bin", tasks.hashlib.md5(content).hexdigest())}
    [path] = tasks.fetch(tmp_path, expected)
    assert path.read_bytes() == content, "a download with the published md5 is kept"

    monkeypatch.setattr(tasks, "download", lambda url, path: Path(path).write_bytes(b"corrupted"))
    with pytest.raises(ValueError, match="not the published .* so it was deleted"):
        tasks.fetch(tmp_path, {"other.bin": expected["file.bin"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"], "a corrupted download must be deleted"

    def interrupted(url, path):
        Path(path).write_bytes(b"half")
        raise ConnectionResetError("connection lost")
    monkeypatch.setattr(tasks, "download", interrupted)
    with pytest.raises(FileNotFoundError, match="other.bin not found"):
        tasks.fetch(tmp_path, {"other.bin": expected["file.bin"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"], "an interrupted download must leave nothing"

    def second_fails(url, path):
        if "first" not in url:
            raise ConnectionResetError("connection lost")
        Path(path).write_bytes(content)
    monkeypatch.setattr(tasks, "download", second_fails)
    two = {"a.bin": ("https://example.invalid/first", expected["file.bin"][1]), "b.bin": expected["file.bin"]}
    with pytest.raises(FileNotFoundError) as error:
        tasks.fetch(tmp_path, two)
    assert str(error.value).startswith("b.bin not found"), f"only the file still missing is named: {error.value}"


@pytest.mark.data
def test_cifar_decodes_class_by_class_and_caches(tiny_cifar, monkeypatch):
    data = tasks.load_cifar100(tiny_cifar)
    images = data["images"]
    assert images.shape == (100, 3, 3, 32, 32) and images.dtype == np.uint8, "(classes, images, 3, 32, 32) uint8"
    assert (images[:, :, 0] == np.arange(100)[:, None, None, None]).all(), \
        "class c must hold exactly the images labelled c"
    assert (images[:, :2, 1] == 0).all() and (images[:, 2, 1] == 1).all(), "train images first, then test"
    assert (images[0, 0, 2] == np.arange(1024).reshape(32, 32) % 256).all(), "pixels are row-major 32x32 planes"
    assert list(data["names"]) == CIFAR_NAMES, "the 100 fine names in label order"
    assert len(list((tiny_cifar / "cifar100").glob("cifar100_32px_v*.npz"))) == 1, "cache beside the archive"
    monkeypatch.setattr(tasks, "decode_cifar100", lambda path: pytest.fail("decoded again although a cache exists"))
    assert np.array_equal(tasks.load_cifar100(tiny_cifar)["images"], images), "the cache returns the decoded arrays"

    task = make_task("cifar_fs", data_dir=str(tiny_cifar), shot=1, query=2)
    batch = task.sample(2, "val")
    red = (batch.images[:, :, 0, 0, 0] * tasks.CIFAR_STD[0] + tasks.CIFAR_MEAN[0]) * 255
    val_codes = [CIFAR_NAMES.index(name) for name in tasks.CIFAR_FS_SPLIT["val"]]
    assert set(red.round().long().flatten().tolist()) <= set(val_codes), \
        "val episodes must use the CIFAR-FS val classes, normalised by the channel statistics"


@pytest.mark.data
def test_a_cifar_archive_whose_gzip_crc_fails_is_refused(tiny_cifar):
    """The archive is read as a stream; a changed byte that still inflates (here the stored CRC itself) must
    be caught by the gzip trailer's check, not decoded into changed pixels."""
    path = tiny_cifar / "cifar100" / "cifar-100-python.tar.gz"
    damaged = bytearray(path.read_bytes())
    damaged[-8] ^= 0xFF                                              # the CRC-32 of the trailer
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="is damaged .*CRC"):
        tasks.load_cifar100(tiny_cifar)
    assert not list((tiny_cifar / "cifar100").glob("*.npz")), "nothing may be cached from a damaged archive"


@pytest.mark.data
@pytest.mark.parametrize("wrong", ["unequal classes", "99 names"])
def test_a_cifar_archive_of_other_counts_is_refused_in_one_sentence(tiny_cifar, wrong):
    """200 training images, but class 0 with 3 and class 1 with 1; or 99 fine names: not the official file."""
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(100), 2)).tolist()
    names = CIFAR_NAMES
    if wrong == "unequal classes":
        labels[labels.index(1)] = 0
    else:
        names = CIFAR_NAMES[:99]
    meta = pickle.dumps({"fine_label_names": names, "coarse_label_names": ["x"] * 20}, protocol=2)
    write_cifar_tar(tiny_cifar / "cifar100" / "cifar-100-python.tar.gz",
                    {"meta": meta, "train": cifar_pickle(labels, 0), "test": cifar_pickle(list(range(100)), 1)})
    with pytest.raises(ValueError, match="is not the official cifar-100-python.tar.gz: expected train, test and meta"):
        tasks.load_cifar100(tiny_cifar)


@pytest.mark.data
def test_a_cifar_archive_is_read_to_its_crc_past_the_tars_end(tiny_cifar):
    """tarfile stops at the end-of-archive blocks; what follows them (here 12 MB of zero padding, three of the
    4 MB reads) must still be read, so that the gzip trailer's CRC is checked."""
    path = tiny_cifar / "cifar100" / "cifar-100-python.tar.gz"
    padded = gzip.compress(gzip.decompress(path.read_bytes()) + bytes(12 << 20), compresslevel=1)
    path.write_bytes(padded)
    assert tasks.load_cifar100(tiny_cifar)["images"].shape == (100, 3, 3, 32, 32), "setup: the padded archive loads"
    damaged = bytearray(padded)
    damaged[-8] ^= 0xFF                                              # the CRC-32 of the trailer
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="is damaged .*CRC"):
        tasks.load_cifar100(tiny_cifar)


@pytest.mark.data
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    payload = pickle.dumps(Exploit(), protocol=2)
    assert b"system" in payload, "the test pickle must ask for os.system"
    with pytest.raises(pickle.UnpicklingError, match="refused to load .*system"):
        tasks.CifarUnpickler(io.BytesIO(payload), encoding="latin1").load()
    folder = tmp_path / "cifar100"
    folder.mkdir()
    write_cifar_tar(folder / "cifar-100-python.tar.gz", {"train": payload, "test": payload, "meta": payload})
    with pytest.raises(ValueError, match="damaged or malicious"):
        tasks.load_cifar100(tmp_path)
    assert not marker.exists(), "the refused pickle must not have run anything"


# ----------------------------------------------------------------------------------------------
# The real archives (marker: realdata), skipped with a reason when they are absent

OMNIGLOT_REAL = [REAL_DATA / "omniglot" / name for name in tasks.OMNIGLOT_FILES]
CIFAR_REAL = REAL_DATA / "cifar100" / "cifar-100-python.tar.gz"
needs_omniglot = pytest.mark.skipif(not all(p.exists() for p in OMNIGLOT_REAL),
                                    reason=f"Omniglot archives not in {REAL_DATA}/omniglot (set PLASTIC_DATA)")
needs_cifar = pytest.mark.skipif(not CIFAR_REAL.exists(), reason=f"{CIFAR_REAL} absent (set PLASTIC_DATA)")
SMALL1 = REAL_DATA / "omniglot" / "images_background_small1.zip"
SPLIT_JSON = REAL_DATA / "cifar_fs_split.json"
LAKE_VALIDATION_MD5 = "e60d75ae586765fc9c74c03e7d849eb3"   # of the 100 sorted names OMNIGLOT_VAL_SEED 0 holds out
VINYALS_JSON = REAL_DATA / "omniglot" / "vinyals_split.json"


@pytest.fixture(scope="module")
def real_omniglot():
    return make_task("omniglot", data_dir=str(REAL_DATA))


@pytest.fixture(scope="module")
def real_cifar_fs():
    return make_task("cifar_fs", data_dir=str(REAL_DATA))


@pytest.mark.realdata
@needs_omniglot
def test_real_omniglot_counts_and_split(real_omniglot):
    data = tasks.load_omniglot(REAL_DATA)
    assert data["background"].shape == (964, 20, 28, 28), \
        f"background is {data['background'].shape}, expected 964 characters x 20 drawings"
    assert data["evaluation"].shape == (659, 20, 28, 28), \
        f"evaluation is {data['evaluation'].shape}, expected 659 characters x 20 drawings"
    alphabets = [len({n.split("/")[0] for n in data[k]}) for k in ("background_names", "evaluation_names")]
    assert alphabets == [30, 20], f"expected 30 background and 20 evaluation alphabets, found {alphabets}"
    assert np.median(data["evaluation"]) == 0 and data["evaluation"].max() == 255, \
        "strokes must be bright on a dark background"
    lake = make_task("omniglot", data_dir=str(REAL_DATA), omniglot_split="lake")
    for task, sizes in ((real_omniglot, (1028, 172, 423)), (lake, (864, 100, 659))):  # characters of each split
        found = {s: len(v) for s, v in task.class_names.items()}
        assert found == dict(zip(SPLITS, (4 * sizes[0], *sizes[1:]))), \
            f"{task.cfg.omniglot_split}: split sizes {found}, expected {sizes} characters (training ones x 4 rotations)"
        characters = {s: {n.split(" rotated")[0] for n in v} for s, v in task.class_names.items()}
        assert not characters["train"] & characters["val"], "validation characters must not be trained on"
        assert not (characters["train"] | characters["val"]) & characters["test"], "test characters must be unseen"
        assert not any("rotated" in n for n in task.class_names["val"] + task.class_names["test"]), \
            "only training characters are rotated"
    joined = make_task("omniglot", data_dir=str(REAL_DATA), train_on_val=True)  # Vinyals et al.'s 1,200 characters
    names = joined.class_names
    found = {s: len(v) for s, v in names.items()}
    assert found == {"train": 4 * 1200, "val": 172, "test": 423}, \
        f"train_on_val: split sizes {found}, expected the 1,028 + 172 characters x 4 rotations / 172 / 423"
    assert not {n.split(" rotated")[0] for n in names["train"]} & set(names["test"]), "test characters must be unseen"
    for split in ("val", "test"):  # so a run with it pairs, episode by episode, with one without it
        a, b = (task.sample(8, split, generator=torch.Generator().manual_seed(0)) for task in (real_omniglot, joined))
        assert torch.equal(a.images, b.images) and torch.equal(a.target, b.target), \
            f"train_on_val must leave the {split} episodes of a seed as they are"
    held_out = sorted(lake.class_names["val"])
    alphabets = len({name.split("/")[0] for name in held_out})
    assert alphabets >= 25, f"Lake's 100 validation characters come from {alphabets} alphabets: not a seeded random set"
    assert hashlib.md5("\n".join(held_out).encode()).hexdigest() == LAKE_VALIDATION_MD5, \
        f"Lake's validation characters are not the fixed set every Lake run chose its checkpoint on: {held_out[:3]} ..."
    for split in SPLITS:
        batch = real_omniglot.sample(8, split, generator=torch.Generator().manual_seed(0))
        assert batch.images.shape == (8, 10, 1, 28, 28), f"{split}: 5-way 1-shot episodes of (1, 28, 28) images"


@pytest.mark.realdata
@needs_omniglot
@pytest.mark.skipif(not VINYALS_JSON.exists(), reason=f"{VINYALS_JSON} absent (set PLASTIC_DATA)")
def test_vinyals_split_equals_the_published_lists(real_omniglot):
    """The default split, derived by its rule in tasks.omniglot_splits, against the published lists
    (vinyals_split.json, which equals torchmeta's): the same characters in every split."""
    published = json.loads(VINYALS_JSON.read_text())
    for split in SPLITS:
        listed = {f"{alphabet}/{character}" for archive in published[split].values()
                  for alphabet, characters in archive.items() for character in characters}
        found = {n.split(" rotated")[0] for n in real_omniglot.class_names[split]}
        assert found == listed, (f"{split}: {len(found - listed)} characters not in the published split, "
                                 f"{len(listed - found)} of it missing, e.g. {sorted(found ^ listed)[:3]}")


@pytest.mark.realdata
@needs_cifar
def test_real_cifar_fs_counts_and_split(real_cifar_fs):
    data = tasks.load_cifar100(REAL_DATA)
    assert data["images"].shape == (100, 600, 3, 32, 32), \
        f"images are {data['images'].shape}, expected 100 classes x 600 images x 3 x 32 x 32"
    assert list(data["names"]) == CIFAR_NAMES, "the fine class names, alphabetical as CIFAR-100 numbers them"
    sample = data["images"][:, ::20].astype(np.float32) / 255                     # every 20th image of each class
    mean, std = sample.mean((0, 1, 3, 4)), sample.std((0, 1, 3, 4))
    # this sample's statistics are within 0.0025 of all 60,000 images'; the constants' channels are 0.009 to 0.07 apart
    assert np.allclose(mean, tasks.CIFAR_MEAN, atol=0.004) and np.allclose(std, tasks.CIFAR_STD, atol=0.004), \
        f"channel means {mean} and stds {std} differ from the published CIFAR-100 statistics {tasks.CIFAR_MEAN}, {tasks.CIFAR_STD}"
    sizes = {s: len(v) for s, v in real_cifar_fs.splits.items()}
    assert sizes == {"train": 64, "val": 16, "test": 20}, f"CIFAR-FS split sizes {sizes}"
    names = real_cifar_fs.class_names
    train, val, test = (set(names[s]) for s in SPLITS)
    assert not train & val and not (train | val) & test, "the CIFAR-FS splits must not share a class"
    joined, _ = tasks.cifar_fs_splits(dict(data, images=data["images"][:, :2]), train_on_val=True)  # 2 images a class
    assert np.array_equal(joined["train"], np.concatenate([real_cifar_fs.splits[s][:, :2] for s in ("train", "val")])), \
        "train_on_val: the 64 training classes' images, then the 16 validation classes'"
    for split in SPLITS:
        batch = real_cifar_fs.sample(8, split, generator=torch.Generator().manual_seed(0))
        assert batch.images.shape == (8, 10, 3, 32, 32), f"{split}: 5-way 1-shot episodes of (3, 32, 32) images"


@pytest.mark.realdata
@needs_cifar
def test_real_cifar_fs_images_are_normalised_per_channel(real_cifar_fs, monkeypatch):
    """Every channel of the images a task yields has mean ~0 and std ~1: 2,560 training images (the 64
    training classes differ from the whole dataset, whose statistics the task uses, by under 0.03 std),
    without the augmentation's zero padding."""
    monkeypatch.setattr(real_cifar_fs, "augmentation", None)
    images = real_cifar_fs.sample(256, "train", generator=torch.Generator().manual_seed(0)).images
    per_channel = images.transpose(0, 2).flatten(1)                # (C, pixels of every image)
    mean, std = per_channel.mean(1), per_channel.std(1)
    assert torch.all(mean.abs() < 0.05), f"channel means {mean.tolist()} should be within 0.05 of 0"
    assert torch.all((std - 1).abs() < 0.05), f"channel stds {std.tolist()} should be within 0.05 of 1"


@pytest.mark.realdata
@pytest.mark.skipif(not SMALL1.exists(), reason=f"{SMALL1} absent (set PLASTIC_DATA)")
def test_published_md5_is_accepted_for_an_official_file(tmp_path, monkeypatch):
    official = SMALL1
    published = "e704a628b5459e08445c13499850abc4"
    assert tasks.md5sum(official) == published, "images_background_small1.zip must have its published md5"
    monkeypatch.setattr(tasks, "download", lambda url, path: shutil.copyfile(official, path))
    files = {official.name: (tasks.OMNIGLOT_URL + official.name, published, 5, 136)}
    monkeypatch.setattr(tasks, "OMNIGLOT_FILES", files)
    [path] = tasks.fetch(tmp_path, tasks.OMNIGLOT_FILES)
    assert tasks.md5sum(path) == published, "a download with the published md5 must be accepted as it is"
    images, names = tasks.decode_omniglot(path)
    assert images.shape == (136, 20, 28, 28) and len(set(names)) == 136, \
        "the official small set has 5 alphabets, 136 characters x 20 drawings"


@pytest.mark.realdata
@pytest.mark.skipif(not SPLIT_JSON.exists(), reason=f"{SPLIT_JSON} absent (set PLASTIC_DATA)")
def test_embedded_cifar_fs_split_matches_the_json():
    shipped = json.loads(SPLIT_JSON.read_text())
    assert shipped == tasks.CIFAR_FS_SPLIT, "the class lists in tasks.py must equal cifar_fs_split.json"
