"""
Tests of pretrain.py: the nearest-prototype score against an explicit loop, the training images and their
classes, the folder train.py --init-encoder reads, the test episodes shared with train.py, bad input.

    pytest test_pretrain.py            # a few seconds on a 2-core CPU

The encoder trains on test_train's small synthetic image set (tasks.FewShot over random class patterns,
8 training, 4 validation and 4 test classes of 4 images), so no test needs the real data or the network.
"""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

import pretrain
import train
from plastic import Config
from pretrain import PretrainConfig
from tasks import TaskConfig
from test_train import DETERMINISTIC, deterministic_state, no_network, offline  # noqa: F401 (fixtures: few-shot tasks on test_train's synthetic images)

pytestmark = pytest.mark.train


def tiny(out_dir, **options) -> PretrainConfig:
    """A pre-training of a few steps on the synthetic CIFAR-FS, 3-way episodes (it has 4 test classes)."""
    return PretrainConfig(**dict(task="cifar_fs", steps=4, batch_size=16, eval_interval=2, eval_episodes=4,
                                 test_episodes=6, way=3, encoder_channels=8, device="cpu", out_dir=str(out_dir)) | options)


# ----------------------------------------------------------------------------------------------
# The nearest-prototype score


def prototype_accuracy_by_loop(features, labels, mask, way):
    """The reference, one episode and one query at a time in float64: a prototype is the mean of its
    class's support features; a query takes the class whose prototype has the highest cosine similarity."""
    accuracies = []
    for f, y, m in zip(features.double(), labels, mask):
        prototypes = [torch.stack([f[t] for t in range(len(y)) if not m[t] and y[t] == c]).mean(0) for c in range(way)]
        right = []
        for t in range(len(y)):
            if m[t]:
                cosines = [torch.dot(f[t], p) / (f[t].norm() * p.norm()) for p in prototypes]
                right.append(float(int(torch.stack(cosines).argmax()) == int(y[t])))
        accuracies.append(sum(right) / len(right))
    return torch.tensor(accuracies, dtype=torch.float64)


def test_prototype_accuracy_is_the_nearest_class_mean_in_cosine_similarity():
    generator = torch.Generator().manual_seed(0)
    B, N, K, Q, D = 6, 4, 3, 2, 5
    labels = torch.stack([torch.cat([torch.randperm(N * K, generator=generator) % N,
                                     torch.randperm(N * Q, generator=generator) % N]) for _ in range(B)])   # (B, T)
    mask = torch.zeros(B, N * (K + Q), dtype=torch.bool)
    mask[:, N * K:] = True
    centres = torch.randn(B, N, D, generator=generator, dtype=torch.float64)
    features = centres.gather(1, labels[..., None].expand(-1, -1, D)) + 1.5 * torch.randn(B, N * (K + Q), D, generator=generator, dtype=torch.float64)
    got = pretrain.prototype_accuracy(features, labels, mask, N)
    want = prototype_accuracy_by_loop(features, labels, mask, N)
    assert 0 < want.mean() < 1, "setup: the noise should make some queries wrong and some right"
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-12,
                               msg=lambda m: f"each episode's accuracy should be the explicit loop's: {m}")
    query_scaled = features.clone()
    query_scaled[:, N * K:] *= 7.0
    torch.testing.assert_close(pretrain.prototype_accuracy(query_scaled, labels, mask, N), got,
                               msg="a query's length should not change its answer (cosine similarity)")


# ----------------------------------------------------------------------------------------------
# The training images


def test_training_images_are_their_classes_images_prepared_as_episodes_are(offline):
    """Without augmentation each sampled image is one of its class's images, normalised as FewShot.prepare
    does; the classes are drawn uniformly (all 8 come up in 400 draws, none more than twice its share)."""
    task = train.load_task(TaskConfig(name="cifar_fs", way=3, augment=False))
    images, classes = pretrain.sample_images(task, 400, "cpu", torch.Generator().manual_seed(0))
    assert images.shape == (400, 3, 16, 16) and classes.shape == (400,), f"shapes {tuple(images.shape)}, {tuple(classes.shape)}"
    prepared = task.prepare(torch.from_numpy(task.splits["train"]).flatten(0, 1), "val").view(8, 4, 3, 16, 16)
    for image, c in zip(images[:50], classes[:50]):
        assert any(torch.equal(image, candidate) for candidate in prepared[c]), f"an image labelled {int(c)} is none of its class's"
    counts = torch.bincount(classes, minlength=8)
    assert counts.min() > 0 and counts.max() < 100, f"classes should be drawn uniformly, got counts {counts.tolist()}"
    drawn = {(int(c), next(i for i, candidate in enumerate(prepared[c]) if torch.equal(image, candidate)))
             for image, c in zip(images, classes)}
    assert len(drawn) == 8 * 4, f"every image of every class should come up in 400 draws, {32 - len(drawn)} never did"


def test_training_images_are_augmented_as_training_episodes_are(offline, monkeypatch):
    """With augmentation (and colour jitter) on, the images go through the same FewShot.prepare as training
    episodes, with split "train" and the run's generator."""
    task = train.load_task(TaskConfig(name="cifar_fs", way=3, jitter=0.4))
    calls, prepare = [], task.prepare

    def recorded(images, split, generator=None):
        calls.append((split, generator))
        return prepare(images, split, generator)
    monkeypatch.setattr(task, "prepare", recorded)
    generator = torch.Generator().manual_seed(0)
    pretrain.sample_images(task, 8, "cpu", generator)
    assert calls == [("train", generator)], f"training images should be prepared as training episodes, got {calls}"


def test_training_images_come_from_the_runs_generator_alone(offline):
    """Two generators of one seed draw the same images and classes, whatever state the global RNG is in: every
    draw (class, image, augmentation) takes the generator passed in."""
    task = train.load_task(TaskConfig(name="cifar_fs", way=3))
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append(pretrain.sample_images(task, 64, "cpu", torch.Generator().manual_seed(0)))
    (images, classes), (images_again, classes_again) = draws
    assert torch.equal(classes, classes_again), "the classes drawn should depend on the generator alone, not the global RNG"
    assert torch.equal(images, images_again), "the images drawn should depend on the generator alone, not the global RNG"


# ----------------------------------------------------------------------------------------------
# The run: what it learns, what it writes, and the episodes it is tested on


def test_pretraining_learns_to_tell_the_training_classes_apart(tmp_path, offline):
    """Each synthetic class is one random pattern, so shifting it would make it another: without augmentation,
    40 steps take the training accuracy among the 8 classes from chance (1/8) to above 0.75 (0.87 measured)."""
    pretrain.pretrain(tiny(tmp_path, steps=40, batch_size=32, lr=1e-2, eval_interval=40, augment=False))
    log = [json.loads(line) for line in open(tmp_path / "pretrain-cifar_fs" / "log.jsonl")]
    first, last = log[0], [r for r in log if r["split"] == "train"][-1]
    assert first["metric"] < 0.3 and last["metric"] > 0.75, (
        f"training accuracy among 8 classes should rise from chance to above 0.75 in 40 steps: {first['metric']:.2f} -> {last['metric']:.2f}")


def test_best_pt_is_the_best_validated_encoder_and_init_encoder_reads_it(tmp_path, offline):
    results = pretrain.pretrain(tiny(tmp_path))
    run_dir = tmp_path / "pretrain-cifar_fs"
    assert sorted(os.listdir(run_dir)) == sorted(pretrain.RUN_FILES), f"the folder holds {sorted(os.listdir(run_dir))}"
    validations = [json.loads(line) for line in open(run_dir / "log.jsonl") if '"val"' in line]
    best = max(validations, key=lambda r: r["metric"])
    saved = torch.load(run_dir / "best.pt", weights_only=True)
    assert (saved["step"], results["best_step"], results["best_val"]) == (best["step"], best["step"], best["metric"]), (
        f"best.pt should be the first best validation, step {best['step']}; it is step {saved['step']}")
    encoder = train.read_encoder(str(run_dir), Config(image_shape=(3, 16, 16), encoder_channels=8), TaskConfig(name="cifar_fs"))
    for name, value in encoder.items():
        assert torch.equal(value, saved["model"]["encoder." + name]), f"--init-encoder should read best.pt's encoder.{name}"
    assert not any(name.startswith("classifier") for name in encoder), "--init-encoder should leave the classifier out"
    assert results["test_mean"] == pytest.approx(np.mean(results["by_episode"]), abs=1e-6), "test_mean should be the episodes' mean"


def test_it_is_tested_on_the_episodes_a_train_py_run_of_the_seed_is_tested_on(tmp_path, offline):
    """results.json's episodes_md5, inputs_md5 and by_episode as train.py writes them, so report.py --paired
    pairs the two; --query as train.py's (two here, the task's default one)."""
    results = pretrain.pretrain(tiny(tmp_path / "pre", seed=3, query=2))
    run = train.RunConfig(train=train.TrainConfig(rule="none", steps=2, batch_size=4, eval_interval=2, eval_episodes=4,
                                                  test_episodes=6, seed=3, device="cpu", out_dir=str(tmp_path / "gpt")),
                          model=Config(n_layer=1, n_head=2, d_model=8, encoder_channels=8),
                          task=TaskConfig(name="cifar_fs", way=3, shot=1, query=2))
    model_results = train.train(run)
    assert results["query"] == 2, f"results.json should record the episodes' 2 queries per class, not {results['query']}"
    assert (results["episodes_md5"], results["inputs_md5"]) == (model_results["episodes_md5"], model_results["inputs_md5"]), \
        "the test episodes should be train.py's of the same seed"
    assert len(results["by_episode"]) == model_results["test_episodes"] == 6


def test_results_json_holds_the_episodes_settings_and_the_confidence_interval(tmp_path, offline):
    """results.json on disk is what pretrain() returns: the episodes' way, shot and query (--query unset: the
    task's default, 1), the 6 test episodes (not the 4 of validation), the PyTorch it ran, test_ci95 = 1.96 * std / sqrt(n) of
    by_episode (recomputed here in float64), the run's folder and its config.json."""
    results = pretrain.pretrain(tiny(tmp_path))
    run_dir = tmp_path / "pretrain-cifar_fs"
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results)), \
        f"results.json should hold what pretrain() returns; differs in {[k for k in results if on_disk.get(k) != results[k]]}"
    settings = {key: on_disk[key] for key in ("task", "rule", "way", "shot", "query", "metric", "test_episodes", "torch")}
    want = dict(task="cifar_fs", rule="prototypes", way=3, shot=1, query=1, metric="accuracy", test_episodes=6,
                torch=torch.__version__)
    assert settings == want, f"results.json should record the test episodes' settings {want}, got {settings}"
    values = [float(v) for v in on_disk["by_episode"]]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert std > 0, "setup: the 6 test episodes should not all score the same"
    assert on_disk["test_ci95"] == pytest.approx(1.96 * std / math.sqrt(len(values)), abs=1e-5), \
        f"test_ci95 {on_disk['test_ci95']} is not 1.96 * std / sqrt(6) = {1.96 * std / math.sqrt(len(values))} of by_episode"
    assert on_disk["run_dir"] == str(run_dir), f"run_dir should be the run's folder {run_dir}, got {on_disk['run_dir']}"
    assert on_disk["config"] == json.loads((run_dir / "config.json").read_text()), "results.json's config should be config.json's"


def test_scores_are_best_pts_encoder_in_eval_mode_on_train_pys_seeded_episodes(tmp_path, offline):
    """results.json's by_episode, and the best validation in log.jsonl, recomputed by the explicit loop:
    best.pt's encoder with its batch-norm statistics (eval mode: no query's statistics reach another image)
    on train.draws' episodes of seed + 2 (test) and seed + 1 (validation)."""
    pc = tiny(tmp_path, seed=3)
    results = pretrain.pretrain(pc)
    task = train.load_task(pc.task_config())
    encoder = pretrain.Conv4(3, pc.widths())
    saved = torch.load(tmp_path / "pretrain-cifar_fs" / "best.pt", weights_only=True)["model"]
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in saved.items() if k.startswith("encoder.")})
    encoder.eval()

    def by_loop(split, episodes, seed):
        with torch.no_grad():
            return torch.cat([prototype_accuracy_by_loop(encoder(b.images.flatten(0, 1)).view(*b.target.shape, -1),
                                                         b.target, b.mask, pc.way)
                              for b in train.draws(task, split, episodes, torch.device("cpu"), seed)])
    test = by_loop("test", pc.test_episodes, pc.seed + 2)
    assert np.allclose(results["by_episode"], test.numpy(), atol=1e-6), \
        f"by_episode {results['by_episode']} is not best.pt's encoder on the test episodes of seed + 2: {test.tolist()}"
    best = next(json.loads(line) for line in open(tmp_path / "pretrain-cifar_fs" / "log.jsonl")
                if '"val"' in line and json.loads(line)["step"] == results["best_step"])
    val = by_loop("val", pc.eval_episodes, pc.seed + 1).mean().item()
    assert best["metric"] == pytest.approx(val, abs=1e-6), f"the best validation {best['metric']} is not {val} (seed + 1)"


def test_the_test_runs_on_the_first_strictly_best_validated_encoder(tmp_path, offline, monkeypatch):
    """Validation scores 0.5, 0.5, 0.2 at steps 2, 4, 6: a tie is no improvement, so best.pt is step 2's encoder
    and the test scores it (not step 6's, the last); best_val is 0.5."""
    scores, tested, evaluate = iter([0.5, 0.5, 0.2]), [], pretrain.evaluate_prototypes

    def scripted(encoder, task, split, episodes, device, seed):
        if split == "val":
            return torch.full((episodes,), next(scores))
        tested.append({name: value.clone() for name, value in encoder.state_dict().items()})
        return evaluate(encoder, task, split, episodes, device, seed)
    monkeypatch.setattr(pretrain, "evaluate_prototypes", scripted)
    results = pretrain.pretrain(tiny(tmp_path, steps=6))
    saved = torch.load(tmp_path / "pretrain-cifar_fs" / "best.pt", weights_only=True)["model"]
    assert (results["best_step"], results["best_val"]) == (2, pytest.approx(0.5)), \
        f"the best of 0.5, 0.5, 0.2 is step 2's 0.5 (a tie keeps the first), got step {results['best_step']} ({results['best_val']})"
    assert len(tested) == 1, f"one test, got {len(tested)}"
    different = [name for name, value in tested[0].items() if not torch.equal(value, saved["encoder." + name])]
    assert not different, f"the test should score best.pt's (step 2's) encoder, not the last; differs in {different}"
    assert results["train_time_s"] > 0, f"train_time_s should be the training's time, got {results['train_time_s']}"
    encoder_params = sum(p.numel() for p in pretrain.Conv4(3, tiny(tmp_path).widths()).parameters())
    assert results["params"] == encoder_params, f"params should count the encoder alone ({encoder_params}), got {results['params']}"


def test_train_on_val_classifies_the_validation_classes_too_and_keeps_the_last_encoder(tmp_path, offline, monkeypatch):
    """With --train-on-val the classifier tells apart the 8 training and 4 validation classes, and validation
    (0.9, 0.5, 0.1 at steps 2, 4, 6), on classes it trained on, chooses nothing: best.pt is step 6's encoder, and
    an encoder so trained starts only train.py runs that train on the validation classes too."""
    scores = iter([0.9, 0.5, 0.1])
    evaluate = pretrain.evaluate_prototypes
    monkeypatch.setattr(pretrain, "evaluate_prototypes", lambda encoder, task, split, episodes, device, seed:
                        torch.full((episodes,), next(scores)) if split == "val" else
                        evaluate(encoder, task, split, episodes, device, seed))
    results = pretrain.pretrain(tiny(tmp_path, steps=6, train_on_val=True))
    saved = torch.load(tmp_path / "pretrain-cifar_fs" / "best.pt", weights_only=True)
    assert saved["model"]["classifier.weight"].shape[0] == 12, \
        f"the classifier should tell apart 8 + 4 classes, not {saved['model']['classifier.weight'].shape[0]}"
    assert results["best_step"] == saved["step"] == 6, f"the last encoder (step 6) is kept, not step {results['best_step']}'s"
    run = str(tmp_path / "pretrain-cifar_fs")
    model_cfg = Config(image_shape=(3, 16, 16), encoder_channels=8)
    assert train.read_encoder(run, model_cfg, TaskConfig(name="cifar_fs", train_on_val=True)), "it starts a run with it"
    with pytest.raises(train.UsageError, match="trained on the validation classes too"):
        train.read_encoder(run, model_cfg, TaskConfig(name="cifar_fs"))


def test_validation_and_test_episodes_take_train_pys_default_queries():
    """--query left unset: the task's default of train.py (Omniglot 3 queries per class, CIFAR-FS 1), so that the
    test episodes are a train.py run's and report.py --paired pairs them."""
    for task, query in (("omniglot", 3), ("cifar_fs", 1)):
        got = PretrainConfig(task=task).task_config().query
        assert got == query, f"{task}: pretrain.py's episodes should have train.py's {query} queries per class, not {got}"


def test_a_smoke_run_validates_and_tests_on_fewer_episodes_and_says_so(tmp_path, offline, capsys):
    """As train.py's: a pre-training of under 100 steps validates and tests on 100 episodes unless given others
    (its batch is its own), records them in config.json and results.json, and says it is a smoke run; from 100
    steps the protocol's 500 and 1,000 episodes."""
    sizes = lambda pc: (pc.eval_episodes, pc.test_episodes, pc.batch_size)
    assert sizes(pretrain.resolve(PretrainConfig(steps=99))) == (100, 100, 256), "under 100 steps: 100 episodes each"
    assert sizes(pretrain.resolve(PretrainConfig(steps=100))) == (500, 1000, 256), "100 steps: the protocol's episodes"
    assert sizes(pretrain.resolve(PretrainConfig(steps=99, test_episodes=40))) == (100, 40, 256), "a given number stays"
    results = pretrain.pretrain(tiny(tmp_path, eval_episodes=None, test_episodes=None))
    config = json.loads((tmp_path / "pretrain-cifar_fs" / "config.json").read_text())
    assert results["test_episodes"] == len(results["by_episode"]) == 100, f"tested on {results['test_episodes']} episodes"
    assert (config["eval_episodes"], config["test_episodes"]) == (100, 100), "config.json should record what ran"
    out = capsys.readouterr().out
    assert "a smoke run (under 100 steps)" in out and "(eval_episodes 100, test_episodes 100)" in out, out
    assert "not the protocol's 1000: --test-episodes 1000 for results to report" in out, out


def test_default_episodes_are_a_train_py_runs_of_as_many_steps():
    """Left at their defaults, pretrain.py (4,000 steps) validates and tests on as many episodes as a train.py run
    (PROTOCOL_EPISODES: 500 and 1,000), of the same way and shot, so that report.py --paired pairs the two episode
    by episode."""
    pc, task = pretrain.resolve(PretrainConfig()), TaskConfig()
    got = dict(eval_episodes=pc.eval_episodes, test_episodes=pc.test_episodes, way=pc.way, shot=pc.shot)
    want = train.PROTOCOL_EPISODES | dict(way=task.way, shot=task.shot)
    assert got == want, f"pretrain.py's default episodes should be train.py's {want}, got {got}"


def test_each_logged_training_record_is_its_intervals_own(tmp_path, offline, monkeypatch):
    """4 steps validated at 2 and 4: records at steps 1, 2 and 4, each the mean loss of the steps since the record
    before (step 1; step 2; steps 3 and 4), not of every step so far."""
    losses, cross_entropy = [], pretrain.F.cross_entropy

    def recorded(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        losses.append(loss.item())
        return loss
    monkeypatch.setattr(pretrain.F, "cross_entropy", recorded)
    pretrain.pretrain(tiny(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "pretrain-cifar_fs" / "log.jsonl") if '"train"' in line]
    want = {1: losses[0], 2: losses[1], 4: (losses[2] + losses[3]) / 2}
    got = {r["step"]: r["loss"] for r in records}
    assert got == pytest.approx(want, rel=1e-5), f"each record's loss should be its interval's mean {want}, got {got}"


def test_the_first_steps_logged_loss_is_the_mean_cross_entropy_of_its_batch(tmp_path, offline):
    """Step 1's logged loss is the cross-entropy averaged over its 16 images (not summed), of the classifier
    built from the seed on the first images of the seeded stream: reproduced here from the task and seed."""
    pc = tiny(tmp_path, steps=1, seed=5)
    pretrain.pretrain(pc)
    records = [json.loads(line) for line in open(tmp_path / "pretrain-cifar_fs" / "log.jsonl")]
    logged = next(r["loss"] for r in records if r["split"] == "train")
    task = train.load_task(pc.task_config())
    torch.manual_seed(5)
    model = pretrain.Classifier(task.image_shape, pc.widths(), task.splits["train"].shape[0])
    images, labels = pretrain.sample_images(task, 16, "cpu", torch.Generator().manual_seed(5))
    logits = model(images).double()
    want = (logits.logsumexp(1) - logits.gather(1, labels[:, None])[:, 0]).mean().item()  # -log softmax, by hand
    assert logged == pytest.approx(want, rel=1e-5), f"step 1 logged {logged}, the batch's mean cross-entropy is {want}"


def test_validation_hands_the_encoder_back_in_training_mode(offline):
    """evaluate_prototypes runs in eval mode, and the steps after a validation train with batch statistics again."""
    pc = tiny("unused")
    task = train.load_task(pc.task_config())
    encoder = pretrain.Conv4(3, pc.widths())
    pretrain.evaluate_prototypes(encoder, task, "val", 4, torch.device("cpu"), 0)
    assert encoder.training, "after a validation the encoder must be back in training mode"


def test_steps_follow_train_pys_schedule_and_a_seed_repeats_the_run(tmp_path, offline, monkeypatch):
    """40 steps: 2 of linear warm-up (5%) to lr, then cosine decay to lr * min_lr_ratio at step 40, written out
    here; and a second pre-training of the same seed gives the same test scores."""
    rates, AdamW = [], torch.optim.AdamW

    class Recorded(AdamW):
        def step(self, *args, **kwargs):
            rates.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    pc = tiny(tmp_path / "a", steps=40, eval_interval=40, lr=1e-3, min_lr_ratio=0.1)
    results = pretrain.pretrain(pc)
    want = [1e-3 * s / 2 if s <= 2 else 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 38))) for s in range(1, 41)]
    assert rates == pytest.approx(want, rel=1e-6), f"the rates should warm up over 2 steps, then decay by cosine: {rates[:4]}..."
    torch.manual_seed(123)  # another global RNG state: the run must seed itself
    again = pretrain.pretrain(dataclasses.replace(pc, out_dir=str(tmp_path / "b")))
    assert again["by_episode"] == results["by_episode"], "the same seed should repeat the pre-training and its test scores"


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence, exit code 2, nothing lost


def exit_code(argv) -> int:
    """pretrain.py's exit code for argv: main()'s, or argparse's, which exits at once."""
    try:
        return pretrain.main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.cli
@pytest.mark.parametrize("argv, message", [
    (["--task", "copy"], "invalid choice: 'copy'"),
    (["--task", "omniglot", "--jitter", "0.4"], "only cifar_fs has them"),
    (["--lr", "0"], "--lr must be a number above 0"),
    (["--steps", "4", "--warmup", "5"], "--warmup 5 is not below --steps 4"),
    (["--encoder-widths", "96", "192"], "channels of the 4 Conv4 blocks"),
    (["--shot", "3", "--query", "2"], "--shot 3 and --query 2 need 5 images of a class, and cifar_fs has 4; lower --shot or --query"),
    (["--query", "0"], "--query must be a number above 0"),
    (["--test-episodes", "1"], "--test-episodes must be 2 or more (an interval needs two)"),
])
def test_bad_options_are_refused_in_one_sentence(tmp_path, offline, capsys, argv, message):
    code = exit_code(argv + ["--out-dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, f"{argv} should exit with 2, not {code}"
    assert message in err and err.count("\n") == 1, f"{argv} should give one line naming the fix, got: {err!r}"
    assert not os.listdir(tmp_path), f"{argv} wrote {os.listdir(tmp_path)}"


def test_a_task_without_images_is_refused_from_python_too(tmp_path):
    with pytest.raises(train.UsageError, match="--task must be one of omniglot, cifar_fs, not copy"):
        pretrain.pretrain(tiny(tmp_path, task="copy"))
    assert not os.listdir(tmp_path), f"a refused pre-training wrote {os.listdir(tmp_path)}"


def test_deterministic_holds_during_pretraining_is_recorded_and_undone_after(tmp_path, offline, monkeypatch):
    """pretrain.py --deterministic enters train.py's deterministic_algorithms: on while it trains, in
    config.json, and the previous settings back once main() returns."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # a previous setting other than the default
    before, during, sample_images = deterministic_state(), [], pretrain.sample_images

    def sample_and_record(*args, **kwargs):
        during.append(deterministic_state() | dict(warn_only=torch.is_deterministic_algorithms_warn_only_enabled()))
        return sample_images(*args, **kwargs)
    monkeypatch.setattr(pretrain, "sample_images", sample_and_record)
    argv = ["--out-dir", str(tmp_path), "--device", "cpu", "--steps", "2", "--eval-interval", "2", "--eval-episodes", "4",
            "--test-episodes", "6", "--way", "3", "--batch-size", "16", "--encoder-channels", "8", "--deterministic"]
    assert exit_code(argv) == 0
    assert during == [DETERMINISTIC] * 2, f"every step should run deterministic: {during}"
    assert deterministic_state() == before, f"main() should restore {before}, left {deterministic_state()}"
    assert json.loads((tmp_path / "pretrain-cifar_fs" / "config.json").read_text())["deterministic"] is True, \
        "config.json should record --deterministic"


def test_an_out_dir_that_cannot_hold_a_folder_is_refused_in_one_sentence(tmp_path, offline, capsys):
    """--out-dir naming a file: exit code 2 and one sentence naming --out-dir, not a traceback; the file is left as it was."""
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    code = exit_code(["--out-dir", str(blocker), "--device", "cpu", "--way", "3", "--steps", "2", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write the folder" in err and "--out-dir" in err and err.count("\n") == 1, \
        f"an unwritable --out-dir should exit with 2 and one sentence, got exit {code}: {err!r}"
    assert blocker.read_text() == "kept" and os.listdir(tmp_path) == ["a-file"], f"a refused run changed {os.listdir(tmp_path)}"


def test_an_earlier_pretraining_is_kept_without_overwrite(tmp_path, offline, capsys):
    pretrain.pretrain(tiny(tmp_path))
    run_dir = tmp_path / "pretrain-cifar_fs"
    before = {name: (run_dir / name).read_bytes() for name in pretrain.RUN_FILES}
    assert exit_code(["--out-dir", str(tmp_path), "--device", "cpu", "--steps", "2", "--way", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err, "the refusal should name --overwrite"
    assert all((run_dir / name).read_bytes() == data for name, data in before.items()), "a refused run changed the folder"
    pretrain.pretrain(tiny(tmp_path, steps=2, overwrite=True))
    assert json.loads((run_dir / "config.json").read_text())["steps"] == 2, "--overwrite should replace the earlier run"


def test_overwrite_removes_the_earlier_results_before_training(tmp_path, offline):
    """--overwrite removes the earlier pre-training's files first: a new run that then diverges leaves no
    results.json or best.pt of the old one beside its own config.json, for report.py or --init-encoder to take."""
    pretrain.pretrain(tiny(tmp_path))
    with pytest.raises(pretrain.Diverged):
        pretrain.pretrain(tiny(tmp_path, steps=2, lr=1e30, overwrite=True))
    left = sorted(os.listdir(tmp_path / "pretrain-cifar_fs"))
    assert left == ["config.json", "log.jsonl"], f"a diverged --overwrite run should leave its own two files, left {left}"


def test_memory_running_out_is_one_sentence_and_exit_code_2(tmp_path, offline, capsys, monkeypatch):
    def out_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 921600000000 bytes.")
    monkeypatch.setattr(pretrain, "sample_images", out_of_memory)
    code = exit_code(["--out-dir", str(tmp_path), "--device", "cpu", "--way", "3", "--steps", "2", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "the memory ran out" in err and "lower --batch-size (now 8)" in err and err.count("\n") == 1, \
        f"exit {code}, {err!r}"


def test_an_error_other_than_memory_is_raised_not_called_memory(tmp_path, offline, capsys, monkeypatch):
    """A RuntimeError that is a bug (a shape mismatch) reaches the traceback; only memory running out is one sentence."""
    def shape_bug(*args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x72 and 64x8)")
    monkeypatch.setattr(pretrain, "sample_images", shape_bug)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes"):
        exit_code(["--out-dir", str(tmp_path), "--device", "cpu", "--way", "3", "--steps", "2", "--batch-size", "8"])
    assert "memory ran out" not in capsys.readouterr().err, "a shape bug should not be reported as memory running out"


def test_ctrl_c_stops_with_exit_code_130_in_one_sentence(tmp_path, offline, capsys, monkeypatch):
    """Ctrl-C during the pre-training ends with the shell's code for it, 130, and one line saying what best.pt holds."""
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrain, "sample_images", interrupted)
    code = exit_code(["--out-dir", str(tmp_path), "--device", "cpu", "--way", "3", "--steps", "2", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 130 and "stopped by Ctrl-C" in err and "best.pt" in err and err.count("\n") == 1, \
        f"Ctrl-C should exit with 130 and one sentence, got exit {code}: {err!r}"


def test_a_diverging_loss_stops_naming_the_step_and_the_fix(tmp_path, offline, capsys):
    code = exit_code(["--out-dir", str(tmp_path), "--device", "cpu", "--way", "3", "--steps", "6", "--batch-size", "8",
                      "--encoder-channels", "8", "--lr", "1e30"])
    err = capsys.readouterr().err
    assert code == 1 and "the loss became nan at step" in err and "lower --lr" in err, f"exit {code}, {err!r}"


def test_report_py_shows_a_pretrained_encoder_in_a_column_of_its_own(tmp_path, offline):
    import report
    pretrain.pretrain(tiny(tmp_path / "exp"))
    table = report.tables(report.load_runs(str(tmp_path)))
    header = next(line for line in table.splitlines() if line.startswith("| setting"))
    rows = [line for line in table.splitlines() if line.startswith("| - | cifar_fs")]
    assert header.endswith("| prototypes |") and len(rows) == 1, f"a prototypes column and one row, got:\n{table}"
    results = json.loads((tmp_path / "exp" / "pretrain-cifar_fs" / "results.json").read_text())
    assert rows[0].split(" | ")[-1].startswith(f"{100 * results['test_mean']:.2f} ± "), f"its cell should hold its test accuracy:\n{table}"
