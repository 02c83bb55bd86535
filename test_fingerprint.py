"""
Tests of fingerprint.py: images_md5 added to few-shot tests kept before it, only where their episodes reproduce.

    pytest test_fingerprint.py      # a few seconds on a 2-core CPU

A tiny run trains 4 steps on the synthetic images of test_train.py (no real data, no network) and is
retested; its files then lose images_md5, as a run's from before commit 96ebd97 lack it. The reference
is the images_md5 that train.py and retest.py wrote themselves.
"""

import json

import pytest

import fingerprint
import pretrain
import retest
from test_pretrain import tiny as tiny_pretraining
from test_retest import trained
from test_train import offline, no_network  # noqa: F401 (fixtures)

pytestmark = pytest.mark.train


def without_images_md5(path):
    """path's test as it was kept, and the file rewritten without images_md5."""
    test = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in test.items() if k != "images_md5"}, indent=2))
    return test


def test_images_md5_comes_back_as_the_test_wrote_it_and_nothing_else_changes(tmp_path, offline, capsys):
    run_dir, _ = trained(tmp_path / "runs", "none", train_way=4, query=2)  # query != shot: each read as its own
    retest.retest(retest.RetestConfig(run=str(run_dir), way=4, device="cpu"))
    files = [run_dir / "results.json", run_dir / "retest-4way-1shot-2query.json"]
    kept = [without_images_md5(path) for path in files]
    files[0].write_text(json.dumps(json.loads(files[0].read_text()) | dict(images_md5=None), indent=2))  # null: as missing
    assert all(test["images_md5"] for test in kept), "train.py and retest.py should write images_md5"
    assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for path, test in zip(files, kept):
        assert json.loads(path.read_text()) == test, f"{path.name}: images_md5 should come back as written, the rest alike"
        assert f"{path}: images_md5 added (episodes_md5 and inputs_md5 reproduced)" in out, out
    assert "config.json:" not in out, f"only results.json and retest-*.json are tests: {out}"
    before = [path.read_bytes() for path in files]
    assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0
    assert [path.read_bytes() for path in files] == before and capsys.readouterr().out.count("has images_md5") == 2, \
        "a second pass should change nothing"


def test_tests_whose_episodes_do_not_reproduce_are_left_as_they_are(tmp_path, offline, capsys):
    run_dir, _ = trained(tmp_path, "none")
    path = run_dir / "results.json"
    test = without_images_md5(path)
    for changed in (dict(inputs_md5="0" * 32), dict(episodes_md5="0" * 32), dict(test_episodes=7)):
        path.write_text(json.dumps({k: v for k, v in test.items() if k != "images_md5"} | changed, indent=2))
        before = path.read_bytes()
        assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0
        assert path.read_bytes() == before, f"{changed}: a test whose episodes differ should be left as it is"
        assert "not reproduced" in capsys.readouterr().out, f"{changed}: it should say so"
    path.write_text(json.dumps({k: v for k, v in test.items() if k not in ("images_md5", "by_episode")}, indent=2))
    assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0
    assert "keeps no per-episode scores" in capsys.readouterr().out
    path.write_text(json.dumps({k: v for k, v in test.items() if k not in ("images_md5", "episodes_md5", "inputs_md5")}, indent=2))
    before = path.read_bytes()
    assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0
    assert path.read_bytes() == before, "a test without episodes_md5 has nothing to prove its episodes by: left as it is"
    assert "keeps no per-episode scores" in capsys.readouterr().out
    for changed, said in ((dict(task="copy"), "not a few-shot test: left alone"),
                          (dict(images_md5="0" * 32), "has images_md5")):
        path.write_text(json.dumps({k: v for k, v in test.items() if k != "images_md5"} | changed, indent=2))
        before = path.read_bytes()
        assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0
        assert path.read_bytes() == before, f"{changed}: should be left as it is"
        assert f"{path}: {said}" in capsys.readouterr().out, f"{changed}: it should say {said!r}"
    path.write_text('{"task": "omniglot", "by_ep')  # cut short, as by a full disk
    assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0, "one damaged file stops nothing"
    assert path.read_text() == '{"task": "omniglot", "by_ep'
    assert f"{path}: cannot read it or its run's config.json" in capsys.readouterr().out
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "results.json").write_text(json.dumps(test))  # no config.json beside it: not a run's
    assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0
    assert "loose" not in capsys.readouterr().out, "only results.json beside a config.json are tests"
    (run_dir / "retest-3way-1shot-1query.json").write_text("[1, 2]")  # JSON, but not a test
    assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0, "one file that is not a test stops nothing"
    assert "is not a JSON object: left alone" in capsys.readouterr().out
    path.write_text(json.dumps({k: v for k, v in test.items() if k != "images_md5"}, indent=2))
    before, config = path.read_bytes(), json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(config | dict(train={k: v for k, v in config["train"].items() if k != "seed"})))
    assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0, "a config.json this code cannot read stops nothing"
    assert path.read_bytes() == before and f"{path}: its run's config.json is not one this code reads" in capsys.readouterr().out


def test_a_pretrainings_test_gets_its_images_md5_back(tmp_path, offline, capsys):
    """pretrain.py's folder keeps its options flat (no "train"): its test is drawn with its own seed, as train.py's."""
    pretrain.pretrain(tiny_pretraining(tmp_path, seed=3))
    [path] = tmp_path.glob("*/results.json")
    test = without_images_md5(path)
    assert test["images_md5"], "pretrain.py should write images_md5"
    assert fingerprint.main([str(tmp_path), "--device", "cpu"]) == 0
    assert json.loads(path.read_text()) == test, "images_md5 should come back as pretrain.py wrote it, the rest alike"
    assert f"{path}: images_md5 added (episodes_md5 and inputs_md5 reproduced)" in capsys.readouterr().out


def test_a_missing_folder_is_one_sentence_and_exit_code_2(tmp_path, capsys):
    assert fingerprint.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and err.count("\n") == 1, f"one sentence, got {err!r}"


def test_a_folder_without_tests_is_one_sentence_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")  # no config.json beside it: not a run's test
    assert fingerprint.main([str(tmp_path)]) == 2, "a folder holding no test did nothing: not a success"
    err = capsys.readouterr().err
    assert "holds no test" in err and err.count("\n") == 1, f"one sentence, got {err!r}"
