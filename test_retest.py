"""
Tests of retest.py: a trained few-shot run tested again on episodes of other sizes.

    pytest test_retest.py           # a few seconds on a 2-core CPU

Tiny runs train 4 steps on the synthetic images of test_train.py (no real data, no network); the
reference for a retest is train.py's own final test, and train.evaluate on the same weights.
"""

import dataclasses
import json

import pytest
import torch

import retest
import train
from plastic import Config, PlasticGPT
from tasks import TaskConfig
from test_train import offline, no_network, synthetic_few_shot, tiny  # noqa: F401 (fixtures)

pytestmark = pytest.mark.train


def trained(tmp_path, rule="hebbian", model=None, **task_options):
    """A tiny Omniglot-like run (3-way 1-shot, one query per class), its folder and its results."""
    cfg = tiny(tmp_path, "omniglot", rule, model=model)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, **task_options))
    results = train.train(cfg)
    return tmp_path / f"omniglot-{rule}", results


@pytest.mark.parametrize("rule", ["none", "hebbian"])
def test_a_retest_at_the_runs_own_sizes_gives_its_final_test_again(tmp_path, offline, rule):
    run_dir, results = trained(tmp_path, rule)
    files = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    again = retest.retest(retest.RetestConfig(run=str(run_dir), device="cpu"))
    for key in ("test_mean", "test_ci95", "knockout_mean", "knockout_ci95", "by_position", "test_episodes"):
        assert again[key] == results[key], f"{rule}: the retest's {key} {again[key]} is not the run's own {results[key]}"
    assert again == json.loads((run_dir / "retest-3way-1shot-1query.json").read_text()), \
        "retest() should return what it writes"
    assert again["best_step"] == results["best_step"], "a retest records the step of the best.pt it tested"
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.name in files} == files, \
        "a retest changed a file of the run"


def reference(run_dir, results, **task_options):
    """train.evaluate on the run's best.pt over test episodes of the asked sizes, seed + 2 as the final test:
    the accuracy per position (an untrained model's mean is 1/way in every episode, its positions differ)
    and the knock-out's mean."""
    task = synthetic_few_shot(TaskConfig(**results["config"]["task"] | task_options))
    model = PlasticGPT(dataclasses.replace(Config(**results["config"]["model"]), max_len=task.seq_len))
    model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True)["model"])
    seed = results["config"]["train"]["seed"] + 2
    _, trace = train.evaluate(model, task, "test", results["test_episodes"], 4, "cpu", seed)
    knocked, _ = train.evaluate(model, task, "test", results["test_episodes"], 4, "cpu", seed, eta=0.0)
    return train.metric_by_position(trace), knocked.double().mean().item()


def test_more_shots_and_queries_lengthen_the_episodes_of_a_model_without_positions(tmp_path, offline):
    run_dir, results = trained(tmp_path, model=dict(positions=False))
    again = retest.retest(retest.RetestConfig(run=str(run_dir), shot=2, query=2, device="cpu"))
    assert len(again["by_position"]) == 3 * (2 + 2), "episodes of 3 classes of 2 + 2 images should have 12 tokens"
    assert [i for i, v in enumerate(again["by_position"]) if v is not None] == list(range(6, 12)), \
        "the scored positions should be the six queries after the six support images"
    by_position, knock_out = reference(run_dir, results, shot=2, query=2)
    assert again["by_position"] == pytest.approx(by_position, abs=1e-6) and again["knockout_mean"] == pytest.approx(knock_out, abs=1e-6), \
        f"the retest ({again['by_position']}, knock-out {again['knockout_mean']}) is not train.evaluate's ({by_position}, {knock_out})"


def test_a_model_with_positions_reads_no_longer_episodes_than_it_learned(tmp_path, offline):
    run_dir, _ = trained(tmp_path, model=dict(positions=True))
    with pytest.raises(train.UsageError, match="position embeddings for episodes of up to 6 tokens"):
        retest.retest(retest.RetestConfig(run=str(run_dir), shot=2, device="cpu"))


def test_a_model_with_positions_reads_test_episodes_up_to_its_longest_training_episode(tmp_path, offline):
    """Trained on 8-way episodes of 16 tokens and tested 3-way, the model reads 3-way 2-shot episodes (9
    tokens), though 8-way ones of 2 shots would be longer than it learned."""
    run_dir, _ = trained(tmp_path, model=dict(positions=True), train_way=8)
    again = retest.retest(retest.RetestConfig(run=str(run_dir), shot=2, device="cpu"))
    assert len(again["by_position"]) == 3 * (2 + 1), f"3-way 2-shot episodes should have 9 tokens, got {len(again['by_position'])}"


def test_a_run_trained_at_more_shots_is_retested_at_queries_its_training_episodes_could_not_hold(tmp_path, offline):
    """Trained at 2 + 1 of the 4 images per class and tested at 1 + 1: a retest at 1 + 3 fits the test
    classes, and one at 1 + 4 is refused naming --shot and --query (not --train-shot, which it has not)."""
    run_dir, _ = trained(tmp_path, model=dict(positions=False), train_shot=2)
    again = retest.retest(retest.RetestConfig(run=str(run_dir), query=3, device="cpu"))
    assert len(again["by_position"]) == 3 * (1 + 3), f"3-way 1-shot episodes of 3 queries should have 12 tokens, got {len(again['by_position'])}"
    with pytest.raises(train.UsageError, match="--shot 1 and --query 4 need 5 images of a class, and omniglot has 4; lower --shot or --query"):
        retest.retest(retest.RetestConfig(run=str(run_dir), query=4, device="cpu"))


def test_the_way_goes_up_to_the_classes_of_the_training_episodes(tmp_path, offline):
    run_dir, results = trained(tmp_path, train_way=4)
    four = retest.retest(retest.RetestConfig(run=str(run_dir), way=4, device="cpu"))
    assert four["way"] == 4 and four["train_way"] == 4 and len(four["by_position"]) == 4 * 2, \
        f"a 4-way retest of a model trained 4-way should score 4-way episodes, got {four['way']}-way"
    by_position, _ = reference(run_dir, results, way=4)
    assert four["by_position"] == pytest.approx(by_position, abs=1e-6), \
        f"the 4-way retest's accuracy per position {four['by_position']} is not train.evaluate's {by_position}"
    with pytest.raises(train.UsageError, match="labels name at most 4; test --way 4 or fewer"):
        retest.retest(retest.RetestConfig(run=str(run_dir), way=5, device="cpu"))
    with pytest.raises(train.UsageError, match="^--way 1 must be at least 2"):  # the asked way's fault, not config.json's
        retest.retest(retest.RetestConfig(run=str(run_dir), way=1, device="cpu"))


def test_a_run_trained_at_fewer_shots_is_chosen_and_tested_at_its_shot(tmp_path, offline):
    """--shot 2 --train-shot 1 with position embeddings: the model reads the longer test episodes (3 classes of
    2 + 1 images), the final test scores their three queries, and a retest at the run's sizes gives it again,
    as train.evaluate does on best.pt."""
    run_dir, results = trained(tmp_path, model=dict(positions=True), shot=2, train_shot=1)
    assert len(results["by_position"]) == 3 * (2 + 1), "the final test's episodes should have 3 x (2 + 1) tokens"
    assert [i for i, v in enumerate(results["by_position"]) if v is not None] == [6, 7, 8], \
        "the final test should score the three queries after six support images"
    again = retest.retest(retest.RetestConfig(run=str(run_dir), device="cpu"))
    assert again["by_position"] == results["by_position"] and again["test_mean"] == results["test_mean"], \
        "a retest at the run's own sizes should give its final test again"
    by_position, _ = reference(run_dir, results)
    assert results["by_position"] == pytest.approx(by_position, abs=1e-6), \
        f"the final test's accuracy per position {results['by_position']} is not train.evaluate's {by_position}"


@pytest.mark.cli
def test_cli_refuses_bad_runs_and_numbers_with_exit_code_2_and_one_sentence(tmp_path, offline, capsys):
    train.train(tiny(tmp_path, "copy", "none"))
    (tmp_path / "empty").mkdir()
    for name, config in (("damaged", "{not json"), ("other", "{}"),
                         ("nameless", '{"train": {}, "model": {}, "task": {}}')):  # a task without its name
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        (tmp_path / name / "best.pt").write_bytes(b"")
    (tmp_path / "unvalidated").mkdir()  # stopped before its first validation: config.json, no best.pt
    (tmp_path / "unvalidated" / "config.json").write_text((tmp_path / "copy-none" / "config.json").read_text())
    for argv, message in [([str(tmp_path / "empty")], "holds no config.json"),
                          ([str(tmp_path / "nowhere")], f"there is no {tmp_path / 'nowhere'}; give a run folder"),
                          ([str(tmp_path / "copy-none" / "results.json")], "copy-none/results.json is a file; give the run folder that train.py wrote"),
                          ([str(tmp_path / "damaged")], "config.json is not readable JSON"),
                          ([str(tmp_path / "other")], "config.json is not a train.py run's config"),
                          ([str(tmp_path / "nameless")], "config.json is not a train.py run's config"),
                          ([str(tmp_path / "unvalidated")], "unvalidated holds no best.pt; give a run folder"),
                          ([str(tmp_path / "copy-none")], "is a copy run; retest.py retests few-shot runs"),
                          ([str(tmp_path / "copy-none"), "--shot", "0"], "--shot must be a number above 0, not 0")]:
        assert retest.main(argv + ["--device", "cpu"]) == 2, f"{argv} should exit with code 2"
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, f"{argv}: one sentence, got {err!r}"


@pytest.mark.cli
def test_a_config_json_this_code_cannot_read_is_one_sentence_and_exit_code_2(tmp_path, offline, capsys):
    """A config.json edited by hand or written by another version of the code: a missing training option, an
    option this code does not know, a value of the wrong type."""
    run_dir, _ = trained(tmp_path, "none")
    saved = json.loads((run_dir / "config.json").read_text())
    edits = {"no-seed": lambda c: c["train"].pop("seed"), "unknown": lambda c: c["task"].update(new_option=3),
             "model-unknown": lambda c: c["model"].update(new_option=3), "text-way": lambda c: c["task"].update(way="five"),
             "no-layers": lambda c: c["model"].update(n_layer=0)}
    for name, edit in edits.items():
        config = json.loads(json.dumps(saved))
        edit(config)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        (tmp_path / name / "best.pt").write_bytes((run_dir / "best.pt").read_bytes())
        assert retest.main([str(tmp_path / name), "--device", "cpu"]) == 2, f"{name}: should exit with code 2"
        err = capsys.readouterr().err
        assert "config.json is not one this code reads" in err and err.count("\n") == 1, f"{name}: one sentence, got {err!r}"
        assert not list((tmp_path / name).glob("retest-*.json")), f"{name}: a refused retest wrote a file"


def test_a_retest_of_other_episodes_is_never_replaced_silently(tmp_path, offline, capsys):
    """The same retest again replaces its file (the same numbers); one of other episodes (another seed, or fewer
    episodes, as a quick check would be) is refused before it runs, in one sentence, the file untouched, and
    --overwrite replaces it; so does an unreadable file. The refused file's numbers stay the reported ones."""
    run_dir, _ = trained(tmp_path, "none")
    path = run_dir / "retest-3way-1shot-1query.json"
    first = retest.retest(retest.RetestConfig(run=str(run_dir), device="cpu"))
    assert retest.main([str(run_dir), "--device", "cpu"]) == 0, "the same retest again should replace its own file"
    capsys.readouterr()
    kept = path.read_bytes()
    for options in (["--seed", "5"], ["--test-episodes", "4"]):
        assert retest.main([str(run_dir), "--device", "cpu", *options]) == 2, f"{options}: other episodes, refused"
        err = capsys.readouterr().err
        assert "holds a retest of other episodes, 8 test episodes of seed 0 on cpu" in err and "--overwrite" in err \
            and err.count("\n") == 1, f"{options}: one sentence naming the file's episodes and the fix, got {err!r}"
        assert path.read_bytes() == kept, f"{options}: the refused retest should leave the file as it was"
    assert retest.main([str(run_dir), "--device", "cpu", "--seed", "5", "--overwrite"]) == 0, "--overwrite replaces it"
    assert json.loads(path.read_text())["seed"] == 5 and json.loads(path.read_text())["episodes_md5"] != first["episodes_md5"]
    for unreadable in ("{not json", "[]"):  # not JSON; JSON, but not a retest's object
        path.write_text(unreadable)
        assert retest.main([str(run_dir), "--device", "cpu"]) == 2, f"an unreadable file ({unreadable}) is refused too"
        err = capsys.readouterr().err
        assert "cannot read as a retest" in err and path.read_text() == unreadable, \
            f"{unreadable}: one sentence, the file untouched, got {err!r}"
    (run_dir / "best.pt").write_bytes((run_dir / "best.pt").read_bytes()[:1000])  # cut short
    assert retest.main([str(run_dir), "--device", "cpu", "--overwrite"]) == 2, "a damaged best.pt is refused"
    err = capsys.readouterr().err
    assert "best.pt is not a readable checkpoint" in err and err.count("\n") == 1, f"one sentence, got {err!r}"


def test_a_retest_records_the_seed_and_the_training_way_it_was_asked_for(tmp_path, offline):
    """--seed 0 retests a run of seed 1 on seed 0's episodes (0 is a seed, not 'the run's own'), and the file
    records the model's training way (4) beside the test's (3). The reference is train.episodes_fingerprint of
    seed 0 + 2, as the final test draws."""
    cfg = tiny(tmp_path, "omniglot", "none", seed=1)
    train.train(dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, train_way=4)))
    again = retest.retest(retest.RetestConfig(run=str(tmp_path / "omniglot-none"), way=3, seed=0, device="cpu"))
    want = train.episodes_fingerprint(synthetic_few_shot(dataclasses.replace(cfg.task, train_way=4)), "test", 8, "cpu", 2)
    assert again["seed"] == 0 and again["episodes_md5"] == want["episodes_md5"], \
        f"--seed 0 should draw seed 0's episodes, got seed {again['seed']}, episodes_md5 {again['episodes_md5']} (seed 0's: {want['episodes_md5']})"
    assert (again["way"], again["train_way"]) == (3, 4), \
        f"a 3-way retest of a model trained 4-way: way 3, train_way 4; got {again['way']}, {again['train_way']}"


def test_a_run_from_before_an_option_is_retested_as_it_ran(tmp_path, offline):
    """A config.json saved before isolate_queries existed is a run whose queries saw each other (report.OPTIONS_ADDED
    says False, not today's default True), and one saved before --amp trained without it: a retest at the run's own
    sizes gives its final test again."""
    run_dir, results = trained(tmp_path, "hebbian", isolate_queries=False)
    config = json.loads((run_dir / "config.json").read_text())
    del config["task"]["isolate_queries"], config["train"]["amp"]
    (run_dir / "config.json").write_text(json.dumps(config))
    again = retest.retest(retest.RetestConfig(run=str(run_dir), device="cpu"))
    for key in ("by_position", "by_episode", "knockout_by_episode", "inputs_md5"):
        assert again[key] == results[key], f"the retest's {key} {again[key]} is not the run's own {results[key]}"


def test_a_retest_file_is_named_by_its_episodes_and_records_what_was_tested(tmp_path, offline):
    """A 2-way 3-shot retest at 1 query with seed 1, of a run trained 4-way with seed 0 (every number another, so
    none can stand for another): retest-2way-3shot-1query.json holds the run folder, its task, rule and metric, the
    asked sizes and seed, the model's training way, the step of the best.pt tested, the device the test ran on by
    name (never 'auto'), the PyTorch it ran and the seconds it took."""
    run_dir, results = trained(tmp_path, "none", model=dict(positions=False), train_way=4)
    retest.retest(retest.RetestConfig(run=str(run_dir), way=2, shot=3, query=1, seed=1, device="auto"))
    path = run_dir / "retest-2way-3shot-1query.json"
    assert path.is_file(), f"the retest should write {path.name}, wrote {[p.name for p in run_dir.glob('retest-*')]}"
    saved = json.loads(path.read_text())
    want = dict(run=str(run_dir), task="omniglot", rule="none", way=2, shot=3, query=1, train_way=4, seed=1,
                best_step=results["best_step"], metric=results["metric"],
                device=train.device_name(train.pick_device("auto")), torch=torch.__version__)
    got = {key: saved.get(key) for key in want}
    assert got == want, f"the retest file records {got}, not {want}"
    assert isinstance(saved.get("seconds"), float) and saved["seconds"] > 0, \
        f"the retest file should record the test's seconds, got {saved.get('seconds')!r}"


def test_a_retest_prints_one_line_of_its_episodes_and_numbers(tmp_path, offline, capsys):
    """One line: the task, the episodes' sizes (3 queries, plural), the rule, the test's mean and interval as
    train.py prints them, and on fewer than the protocol's 1,000 episodes the note that says so."""
    run_dir, _ = trained(tmp_path, "none", model=dict(positions=False))
    capsys.readouterr()
    again = retest.retest(retest.RetestConfig(run=str(run_dir), query=3, device="cpu"))
    want = (f"omniglot 3-way 1-shot, 3 queries per class, rule none: test accuracy {again['test_mean']:.4g} ± "
            f"{again['test_ci95']:.2g} over 8 episodes (not the protocol's 1000: --test-episodes 1000 for results to "
            f"report)\n")
    out = capsys.readouterr().out
    assert out == want, f"the retest printed {out!r}, not {want!r}"


def test_a_retest_of_other_episodes_is_refused_before_it_tests_anything(tmp_path, offline, monkeypatch):
    """retest() refuses to replace a retest file of other episodes unless told to (RetestConfig's overwrite is
    off, as the command line's --overwrite), and refuses before the test: another seed's quick check scores no
    episode and leaves the file as it was."""
    run_dir, _ = trained(tmp_path, "none")
    retest.retest(retest.RetestConfig(run=str(run_dir), device="cpu"))
    kept = (run_dir / "retest-3way-1shot-1query.json").read_bytes()
    evaluated, evaluate = [], train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *args, **kwargs: evaluated.append(args[2]) or evaluate(*args, **kwargs))
    with pytest.raises(train.UsageError, match="holds a retest of other episodes"):
        retest.retest(retest.RetestConfig(run=str(run_dir), seed=5, device="cpu"))
    assert not evaluated, f"the refused retest evaluated {len(evaluated)} times before it refused"
    assert (run_dir / "retest-3way-1shot-1query.json").read_bytes() == kept, "the refused retest changed the file"


def test_a_retest_runs_the_batch_it_is_given_on_the_runs_own_episodes(tmp_path, offline, monkeypatch):
    """--batch-size 3 for a run trained at 4: the 8 test episodes go through the model 3, 3 and 2 at a time, and
    each scores as in the run's final test (the episodes are drawn whatever the batch)."""
    run_dir, results = trained(tmp_path, "none")
    passes, forward = [], PlasticGPT.forward
    monkeypatch.setattr(PlasticGPT, "forward",  # each pass's episodes: x is (B, T, ...)
                        lambda self, x, *args, **kwargs: passes.append(x.shape[0]) or forward(self, x, *args, **kwargs))
    again = retest.retest(retest.RetestConfig(run=str(run_dir), batch_size=3, device="cpu"))
    assert passes == [3, 3, 2], f"8 episodes at --batch-size 3 should pass 3, 3 and 2 at a time, passed {passes}"
    assert again["by_episode"] == results["by_episode"], \
        f"the episodes' scores {again['by_episode']} are not the final test's {results['by_episode']}"


def test_a_retest_reads_the_images_from_the_data_dir_it_is_given(tmp_path, offline, monkeypatch):
    """--data-dir, for data moved since the run trained: the task is loaded from the folder given, not from the
    one the run's config.json names (here none)."""
    run_dir, _ = trained(tmp_path, "none")
    loaded = []
    monkeypatch.setattr(train, "make_task_from_config", lambda cfg: loaded.append(cfg.data_dir) or synthetic_few_shot(cfg))
    retest.retest(retest.RetestConfig(run=str(run_dir), data_dir=str(tmp_path / "moved"), device="cpu"))
    assert loaded == [str(tmp_path / "moved")], f"the task should be loaded once from {tmp_path / 'moved'}, was from {loaded}"


@pytest.mark.cli
def test_a_retest_file_that_cannot_be_written_is_one_sentence_after_the_printed_numbers(tmp_path, offline, capsys):
    """A folder where retest-*.json would go, with --overwrite (so it is not refused as unreadable first): the
    numbers are printed, then one sentence says the file cannot be written, and the exit code is 2."""
    run_dir, _ = trained(tmp_path, "none")
    (run_dir / "retest-3way-1shot-1query.json").mkdir()
    capsys.readouterr()
    assert retest.main([str(run_dir), "--device", "cpu", "--overwrite"]) == 2, "an unwritable file should exit with code 2"
    out, err = capsys.readouterr()
    assert "cannot write" in err and "retest-3way-1shot-1query.json" in err and err.count("\n") == 1 \
        and "Traceback" not in err, f"one sentence naming the file, got {err!r}"
    assert out.startswith("omniglot 3-way 1-shot, 1 query per class, rule none: test accuracy"), \
        f"the numbers should be printed before the refusal, got {out!r}"
    assert not list(run_dir.glob("*.tmp")), f"the failed write left {[p.name for p in run_dir.glob('*.tmp')]} in the run folder"


def test_a_best_pt_that_would_unpickle_more_than_weights_is_refused(tmp_path, offline):
    """best.pt is read as plain data and tensors (weights_only): one that also holds an object unpickling would
    build by running code the file names (here a dataclass) is refused in one sentence, not loaded; so is one of
    the model's weights without the step train.py records, before any episode is tested."""
    run_dir, _ = trained(tmp_path, "none")
    best = torch.load(run_dir / "best.pt", weights_only=True)
    torch.save(best | dict(config=Config()), run_dir / "best.pt")
    with pytest.raises(train.UsageError, match="best.pt is not a readable checkpoint of this run's model \\(UnpicklingError\\)"):
        retest.retest(retest.RetestConfig(run=str(run_dir), device="cpu"))
    torch.save(dict(model=best["model"]), run_dir / "best.pt")  # weights, but no step: not a checkpoint train.py wrote
    with pytest.raises(train.UsageError, match="best.pt is not a readable checkpoint of this run's model \\(KeyError\\)"):
        retest.retest(retest.RetestConfig(run=str(run_dir), device="cpu"))
