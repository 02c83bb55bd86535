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
    with pytest.raises(train.UsageError, match="shot \\+ query = 5 exceeds the 4 images per omniglot class; lower --shot or --query"):
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
    for name, config in (("damaged", "{not json"), ("other", "{}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        (tmp_path / name / "best.pt").write_bytes(b"")
    for argv, message in [([str(tmp_path / "empty")], "holds no config.json"),
                          ([str(tmp_path / "nowhere")], f"there is no {tmp_path / 'nowhere'}; give a run folder"),
                          ([str(tmp_path / "copy-none" / "results.json")], "copy-none/results.json is a file; give the run folder that train.py wrote"),
                          ([str(tmp_path / "damaged")], "config.json is not readable JSON"),
                          ([str(tmp_path / "other")], "config.json is not a train.py run's config"),
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
    path.write_text("{not json")
    assert retest.main([str(run_dir), "--device", "cpu"]) == 2, "an unreadable file is refused too"
    assert "cannot read as a retest" in capsys.readouterr().err and path.read_text() == "{not json"
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
    says False, not today's default True): a retest at the run's own sizes gives its final test again."""
    run_dir, results = trained(tmp_path, "hebbian", isolate_queries=False)
    config = json.loads((run_dir / "config.json").read_text())
    del config["task"]["isolate_queries"]
    (run_dir / "config.json").write_text(json.dumps(config))
    again = retest.retest(retest.RetestConfig(run=str(run_dir), device="cpu"))
    for key in ("by_position", "by_episode", "knockout_by_episode", "inputs_md5"):
        assert again[key] == results[key], f"the retest's {key} {again[key]} is not the run's own {results[key]}"
