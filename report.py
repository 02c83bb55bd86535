"""
Turn run folders into the README's tables and plots.

    python report.py results          # prints the markdown tables; writes results/window-*.png
    python report.py runs             # train.py's default output: runs/<task>-<rule>/

Every finished run leaves a results.json in its folder, at any depth below the folder given. The
folders above a run name it: the first is the experiment, the rest the setting, and a last one
named seed<k> the seed, as in results/<experiment>/<setting>/seed<k>/<task>-<rule>/ (train.py's
--out-dir is results/<experiment>/<setting>/seed<k>); a run directly below the folder given (runs/)
belongs to an experiment named after that folder. Runs of one experiment, setting, task and rule
that differ only by seed are one row: the mean over seeds of each run's test metric, and the 95%
confidence interval of that mean (t distribution over seeds; with one seed, the run's own interval
over its test episodes). Runs of one row that differ in more than their seed (their results.json's
configs say so) are averaged all the same, and the cell names the options they differ in: give each
setting a folder of its own. The knock-out column is the same test with plasticity off (eta = 0). A run's
retests (retest.py: retest-<way>way-<shot>shot-<query>query.json beside its results.json) are rows of
their own, "retested 5-way 5-shot, 3 queries per class", averaged over seeds the same way.

    python report.py --paired RUN_A RUN_B   # A - B on the same test episodes, with its 95% interval

Runs of one seed on one kind of device are tested on the same episodes (their results.json's
episodes_md5 and images_md5, the md5 of the episodes' targets and of their images, or inputs_md5 in a
task without images, say so), whatever their rule, batch or training classes. Their difference
episode by episode, mean +- 1.96 std / sqrt(n), is far narrower than either run's own interval, so it
tells a difference of a tenth of a point from noise where the runs' means cannot. Runs tested before
images_md5 was kept are paired where their inputs_md5 agree, the md5 of their tokens and images (whose
label tokens are as wide as the training episodes, so runs trained on other numbers of classes are
not, until fingerprint.py gives them images_md5); runs before inputs_md5 where their targets, task and
Omniglot split agree (the split from the run's config, or for a retest from its run's
results.json beside it): Lake's split and Vinyals's draw the same targets from other images. RUN is a
run folder, or a results.json or retest-*.json file; runs tested before per-episode scores were kept
cannot be paired.
(A plastic run against its own knock-out is paired the same way in its results.json: plasticity_mean.)

    python report.py --paired A0 B0 --paired A1 B1 --paired A2 B2   # one pair per seed, then over the seeds

Given once per seed, --paired prints each seed's line and then the mean of the seeds' differences with
its 95% interval over seeds (t distribution), as the rows above average runs: the question a reader asks
of two settings, once each seed's episodes have said how far apart its two runs are. Where two pairs were
tested on the same episodes (one seed given twice), or their A runs (or B runs) differ in more than the
seed (another rule, option, or retest's episode sizes), a line says so in place of the mean: each pair
then asks another question, and their mean answers none.
"""

import argparse
import io
import itertools
import json
import math
import os
import re
import sys
from collections import defaultdict

from plastic import FAST_WEIGHT_OPTIONS, RULE_COEF_INIT, RULES, Config
from tasks import FEW_SHOT, TASKS

PROTOTYPES = "prototypes"  # pretrain.py's encoders, each scored alone as a nearest-prototype classifier: a column where there are any
RETEST_FILE = r"retest-\d+way-\d+shot-\d+query\.json"  # retest.py's tests of a run's best.pt, in its folder
# t(0.975, n - 1) for n values, from a table of Student's t; t_95 goes on beyond it
T_95 = {2: 12.71, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262, 11: 2.228,
        12: 2.201, 13: 2.179, 14: 2.160, 15: 2.145, 16: 2.131, 17: 2.120, 18: 2.110, 19: 2.101, 20: 2.093, 21: 2.086,
        22: 2.080, 23: 2.074, 24: 2.069, 25: 2.064, 26: 2.060, 27: 2.056, 28: 2.052, 29: 2.048, 30: 2.045, 31: 2.042}


# What load_runs reads of a results.json (train.py's or pretrain.py's) and of a retest-*.json
RESULTS_KEYS = ("task", "rule", "metric", "test_mean", "test_ci95", "params", "train_time_s")  # what a table row shows
RETEST_KEYS = ("way", "shot", "query", "test_mean", "test_ci95")  # the rest of a retest's row is its run's


def read_json(path, keys):
    """A JSON object holding `keys`; a UsageError (one sentence) for a file that is not one."""
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is not readable JSON ({err}); move it out of the folder, or run it again.") from err
    missing = [k for k in keys if k not in found] if isinstance(found, dict) else list(keys)
    if missing:
        raise UsageError(f"{path} holds no {', '.join(missing)}, so it is not what train.py, pretrain.py or retest.py "
                         f"write; move it out of the folder.")
    return found


# Options added later, by (section, name): the tasks they act on, and what a run saved before them did
# (Lake's split, no augmentation, as many classes in training as in test, position embeddings, queries
# that see each other, only the training classes). For any other task the option changes nothing, so a
# saved run matches any value.
OPTIONS_ADDED = {("task", "omniglot_split"): (("omniglot",), "lake"), ("task", "augment"): (FEW_SHOT, False),
                 ("task", "train_way"): (FEW_SHOT, None), ("model", "positions"): (TASKS, True),
                 ("task", "isolate_queries"): (FEW_SHOT, False), ("task", "train_shot"): (FEW_SHOT, None),
                 ("model", "encoder_widths"): (FEW_SHOT, None), ("task", "jitter"): (("cifar_fs",), 0.0),
                 ("task", "train_on_val"): (FEW_SHOT, False)}


def with_options_added(saved: dict, otherwise: dict | None) -> dict:
    """The model and task sections of a saved config.json (train.py's), each option added since it was saved
    set to what the run did (OPTIONS_ADDED). An option that does not act on the run's task changed nothing, so
    it takes otherwise's value, whatever the config says (with otherwise None it is left out)."""
    saved = {section: dict(saved[section]) for section in ("model", "task")}
    for (section, k), (applies, before) in OPTIONS_ADDED.items():
        if saved["task"]["name"] in applies:
            saved[section].setdefault(k, before)
        elif otherwise is not None:
            saved[section][k] = otherwise[section][k]
        else:
            saved[section].pop(k, None)
    return saved


# Options that say how or where a run went, not what it trained or tested: the runs of one row may differ in them
HOW_RUN = ("seed", "device", "threads", "out_dir", "data_dir", "resume", "overwrite", "log_interval", "log_seconds",
           "checkpoint_minutes", "bench", "cuda_graph", "compile", "amp", "deterministic", "fast_form")


def as_run(name, value, options, rule):
    """An option's value as the run used it: a None train_way or train_shot is the test's way or shot, a None
    eta or coef_init the rule's own, and --init-encoder given or not (its path is the machine's)."""
    if name in ("train_way", "train_shot") and value is None:
        return options.get(name.removeprefix("train_"))
    if name == "eta" and value is None:
        return Config(rule=rule).base_rate()
    if name == "coef_init" and value is None:
        return RULE_COEF_INIT.get(rule)
    if name == "init_encoder":
        return value is not None
    return value


def differing_options(results):
    """{"section.option": its values} for each option that the runs of one row (one rule) set differently, from
    the configs in their results.json: a row should average runs that differ only by seed. Options of how or
    where a run went (HOW_RUN) do not count, nor, for the static model, those of the fast weights, nor, for the
    plastic ones, --match-params. An option that a config does not record (saved before the option existed) takes
    the value the run used (OPTIONS_ADDED); one of OPTIONS_ADDED that does not act on the run's task is not
    compared. train.py's config has sections (train, model, task); pretrain.py's is one flat dict."""
    values = defaultdict(set)
    for result in results:
        rule, config = result["rule"], result.get("config") or {}
        sections = {s: options for s, options in config.items() if isinstance(options, dict)}
        if {"model", "task"} <= sections.keys():  # train.py's
            sections |= with_options_added(sections, otherwise=None)
        elif not sections:
            sections = {None: config}
        ignored = HOW_RUN + (FAST_WEIGHT_OPTIONS if rule == "none" else ("match_params",))
        for section, options in sections.items():
            for name, value in options.items():
                if name not in ignored:
                    key = f"{section}.{name}" if section else name
                    values[key].add(json.dumps(as_run(name, value, options, rule)))
    return {name: sorted(found) for name, found in sorted(values.items()) if len(found) > 1}


def load_runs(root):
    """{(experiment, setting, task, rule): [results, one per seed]}"""
    runs = defaultdict(list)
    for folder, _, files in sorted(os.walk(root)):
        if "results.json" not in files:
            continue
        above = os.path.relpath(os.path.dirname(os.path.abspath(folder)), os.path.abspath(root)).split(os.sep)
        above = [part for part in above if part not in (".", "..")]  # the folders between root and the run
        if above and re.fullmatch(r"seed\d+", above[-1]):
            above = above[:-1]
        experiment = above[0] if above else os.path.basename(os.path.abspath(root))
        setting = "/".join(above[1:]) or "-"
        result = read_json(os.path.join(folder, "results.json"), RESULTS_KEYS)
        runs[(experiment, setting, result["task"], result["rule"])].append(result)
        for name in sorted(files):  # retest.py's tests of the same model on other episodes: a row each
            if re.fullmatch(RETEST_FILE, name):
                retest = read_json(os.path.join(folder, name), RETEST_KEYS)
                steps = retest.get("best_step"), result.get("best_step")  # retests kept before best_step: trusted
                if None not in steps and steps[0] != steps[1]:
                    print(f"report.py: {os.path.join(folder, name)} left out: it tested best.pt of step "
                          f"{retest['best_step']}, and the run's best is now step {result['best_step']}; retest it.",
                          file=sys.stderr)
                    continue
                queries = "1 query" if retest["query"] == 1 else f"{retest['query']} queries"
                label = f"retested {retest['way']}-way {retest['shot']}-shot, {queries} per class"
                runs[(experiment, label if setting == "-" else f"{setting}, {label}", result["task"], result["rule"])
                     ].append(result | retest)  # the run's parameters and training time, the retest's numbers
    return runs


def t_95(n):
    """t(0.975, n - 1): T_95's value, or beyond 31 values the Cornish-Fisher expansion of t about the normal
    quantile, within 2e-4 of t there (Abramowitz and Stegun 26.7.5)."""
    if n in T_95:
        return T_95[n]
    z, df = 1.959964, n - 1
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def over_seeds(values, own_ci):
    """Mean and 95% CI half-width over seeds; a single run keeps its own CI over test episodes."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, own_ci[0]
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_95(n) * std / math.sqrt(n)


def number(mean, ci, metric):
    if metric == "accuracy":
        return f"{100 * mean:.2f} ± {100 * ci:.2f}"
    return f"{mean:.3g} ± {ci:.2g}"


def summary(results):
    metric = results[0]["metric"]
    test = over_seeds([r["test_mean"] for r in results], [r["test_ci95"] for r in results])
    text = number(*test, metric)
    if results[0].get("knockout_mean") is not None:
        knock = over_seeds([r["knockout_mean"] for r in results], [r["knockout_ci95"] for r in results])
        text += f" (knock-out {number(*knock, metric)})"
    minutes = sum(r["train_time_s"] for r in results) / len(results) / 60
    return text, results[0]["params"], len(results), minutes, test


def not_a_result(results) -> str:
    """Why a cell's runs are no result, as train.py says when it runs them: a smoke run's steps (under 100), or
    fewer test episodes than the protocol's 1,000; '' where the runs are neither (or kept no such record)."""
    from train import PROTOCOL_EPISODES, SMOKE_RUN  # here, not above: train.py imports this module
    configs = [r.get("config") if isinstance(r.get("config"), dict) else {} for r in results]
    steps = [c.get("train", c).get("steps") for c in configs]  # train.py's config, or pretrain.py's flat one
    steps = [n for n in steps if isinstance(n, int) and n < SMOKE_RUN["steps"]]
    episodes = [r["test_episodes"] for r in results if r.get("test_episodes", math.inf) < PROTOCOL_EPISODES["test_episodes"]]
    why = ([f"smoke run ({min(steps)} steps)"] if steps else []) + ([f"{min(episodes)} test episodes"] if episodes else [])
    return f"; **{', '.join(why)}: not a result**" if why else ""


def tables(runs):
    """Markdown: per experiment, a table per metric (train.py's default runs/ holds copy's MSE beside
    Omniglot's accuracy), a row per setting and task, a column per rule."""
    lines = []
    for experiment in sorted({key[0] for key in runs}):
        metrics = sorted({results[0]["metric"] for key, results in runs.items() if key[0] == experiment})
        columns = RULES + ((PROTOTYPES,) if any(e == experiment and r == PROTOTYPES for (e, _, _, r) in runs) else ())
        lines.append(f"\n### {experiment}")
        for metric in metrics:
            keys = sorted({(s, t) for (e, s, t, _), results in runs.items() if e == experiment and results[0]["metric"] == metric})
            lines += metric_table(runs, experiment, metric, keys, columns)
    return "\n".join(lines)


def metric_table(runs, experiment, metric, keys, columns):
    """The lines of one experiment's table of one metric: its (setting, task) rows, one cell per rule."""
    unit = "accuracy %" if metric == "accuracy" else "MSE"
    lines = [f"\ntest {unit}: mean ± 95% CI (over seeds; one seed: its own, over test episodes); params; seeds; minutes of training per run\n",
             "| setting | task | " + " | ".join(columns) + " |", "| --- | --- |" + " --- |" * len(columns)]
    for setting, task in keys:
        cells = []
        for rule in columns:
            if (experiment, setting, task, rule) not in runs:
                cells.append("-")
                continue
            results = runs[(experiment, setting, task, rule)]
            text, params, n, minutes, _ = summary(results)
            mixed = "; ".join(f"{name} {' and '.join(found)}" for name, found in differing_options(results).items())
            cells.append(f"{text}; {params / 1e6:.2f}M; {n}; {minutes:.1f} min" + not_a_result(results)
                         + (f"; **runs differ in {mixed}**" if mixed else ""))
        lines.append(f"| {setting} | {task} | " + " | ".join(cells) + " |")
    return lines


WINDOW_SETTING = r"(?:.*[-/])?w(\d+|full)"  # experiment window's settings: <task>-w<tokens> or -wfull


def save_plot(fig, path) -> None:
    """`fig` as a PNG of 256 colours, at 100 dpi. A plot's antialiased lines give it about a thousand colours;
    a palette of 256 keeps them to the eye (measured on the 353 plots in results/: 0.03 of 255 levels off on
    average at most, no pixel by more than 59) in 37% of the bytes, so results/ stays small enough to travel
    to a GPU machine with the code. The plots are opaque: a transparent background would turn black."""
    from PIL import Image
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette.save(path, optimize=True)


def window_plots(runs, root):
    """One plot per task of experiment 'window': test metric against the attention window, per rule, each
    window at one place on the axis (full attention last) whichever rules ran it. Settings that name no
    window (a retest's row) are not plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    windowed = {}  # (task, rule) -> {window: (mean, ci)}
    for (e, setting, t, r), results in runs.items():
        found = re.fullmatch(WINDOW_SETTING, setting)
        if e == "window" and found:
            windowed.setdefault((t, r), {})[found.group(1)] = summary(results)[4]
    for task in sorted({t for t, _ in windowed}):
        windows = sorted({w for (t, _), points in windowed.items() if t == task for w in points},
                         key=lambda w: math.inf if w == "full" else int(w))
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for rule in RULES:
            points = windowed.get((task, rule), {})
            if points:
                ran = sorted(points, key=windows.index)
                ax.errorbar([windows.index(w) for w in ran], [points[w][0] for w in ran],
                            [points[w][1] for w in ran], marker="o", capsize=3, label=rule)
        ax.set_xticks(range(len(windows)), windows)
        metric = next(r for k, r in runs.items() if k[0] == "window" and k[2] == task)[0]["metric"]
        ax.set(xlabel="attention window (tokens)", ylabel=f"test {metric}", title=task)
        if metric != "accuracy":
            ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        save_plot(fig, os.path.join(root, f"window-{task}.png"))
        plt.close(fig)


class UsageError(Exception):
    """A mistake in what was asked: one sentence, exit code 2."""


def run_config(test, file):
    """The config of the run a final test tested: its own (a results.json's), or for a retest-*.json that of the
    results.json beside it; None where nothing names it."""
    config = test.get("config")
    if config is None and os.path.basename(file) != "results.json":
        try:
            with open(os.path.join(os.path.dirname(file), "results.json")) as f:
                config = json.load(f).get("config")
        except (OSError, ValueError):
            config = None
    return config or None


def split_of(test, file):
    """The Omniglot split a final test drew its episodes from: a run's config names it (train.py's under
    "task", pretrain.py's at the top); None where nothing does."""
    config = run_config(test, file)
    if not config:
        return None
    return config["task"].get("omniglot_split") if isinstance(config.get("task"), dict) else config.get("split")


def episodes_differ(a, b):
    """Why two final tests did not score the same episodes, or None where they did: the same number, task and
    targets (episodes_md5), and the same images where both kept images_md5 (whatever their training classes),
    or else the same inputs where both kept inputs_md5, or else the same split (read_test's "split")."""
    if a.get("test_episodes") != b.get("test_episodes"):
        return f"{a.get('test_episodes')} and {b.get('test_episodes')} of them; test both on as many: --test-episodes"
    if a.get("task") != b.get("task"):
        return f"of {a.get('task')} and of {b.get('task')}"
    if a.get("episodes_md5") != b.get("episodes_md5"):
        return "other classes and images drawn: another seed, or other sizes of episode: way, shot, query"
    if a.get("images_md5") and b.get("images_md5"):
        same, why = a["images_md5"] == b["images_md5"], "from other images: another split, or another kind of device"
    elif "inputs_md5" in a and "inputs_md5" in b:
        same, why = a["inputs_md5"] == b["inputs_md5"], ("read as other inputs: by models trained on other numbers of "
                                                         "classes, or from other images")
    else:
        same, why = a["split"] == b["split"], "from another split"
    return None if same else f"the same classes drawn, {why}"


def same_episodes(a, b):
    """Whether two final tests scored the same episodes (episodes_differ says why not)."""
    return episodes_differ(a, b) is None


def final_test_file(path):
    """The file of a final test given as a run folder (its results.json) or as the file itself."""
    return os.path.realpath(os.path.join(path, "results.json") if os.path.isdir(path) else path)


def read_test(path):
    """A final test's numbers: a run folder's results.json, or a results.json or retest-*.json file, with
    the split its episodes came from ("split", split_of)."""
    file = final_test_file(path)
    try:
        with open(file) as f:
            test = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read a final test from {path} ({err}); give a run folder, a results.json or a "
                         f"retest-*.json.") from err
    if not (isinstance(test, dict) and all(k in test for k in ("metric", "test_mean", "test_episodes"))):
        raise UsageError(f"{path} holds no final test (metric, test_mean, test_episodes); give a run folder, a "
                         f"results.json or a retest-*.json.")
    if not test.get("by_episode"):
        raise UsageError(f"{path} keeps no per-episode scores (runs tested before they were kept); test it again "
                         f"(retest.py for a few-shot run) to pair it.")
    return test | dict(split=split_of(test, file), file=file)


def paired(a, b):
    """Mean and 95% interval half-width of a_i - b_i over the same episodes (train.mean_ci95's formula, here
    without torch, which report.py does not import), and how many episodes a scores above b, below, level."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    above, below = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return mean, 1.96 * std / math.sqrt(n), above, below, n - above - below


def shown(metric):
    """How --paired writes a value of `metric` (sign="+" for a difference): accuracy in points, MSE as it is."""
    if metric == "accuracy":
        return lambda v, sign="": f"{100 * v:{sign}.2f}"
    return lambda v, sign="": f"{v:{sign}.3g}"


def paired_line(path_a, path_b, a, b):
    """The line --paired prints for tests a and b (read_test of path_a and path_b): A - B over their shared test
    episodes, with both means; and A - B's mean and its metric, for the line over seeds."""
    differ = episodes_differ(a, b)
    if differ:
        unfingerprinted = (a.get("test_episodes"), a.get("task"), a.get("episodes_md5")) == \
            (b.get("test_episodes"), b.get("task"), b.get("episodes_md5")) and not (a.get("images_md5") and b.get("images_md5"))
        hint = (" (if they were trained on other numbers of classes, `python fingerprint.py` on their folders, on the "
                "kind of device that tested them, gives them the images_md5 that pairs them)") if unfingerprinted else ""
        raise UsageError(f"{path_a} and {path_b} were tested on different episodes ({differ}), so they cannot be "
                         f"paired; compare their intervals instead{hint}.")
    mean, ci, above, below, level = paired(a["by_episode"], b["by_episode"])
    percent, show = a["metric"] == "accuracy", shown(a["metric"])
    line = (f"A - B: {show(mean, '+')} ± {show(ci)}{' points' if percent else ''} of {a['metric']} (paired 95% "
            f"interval over the same {a['test_episodes']:,} test episodes); A {show(a['test_mean'])}, B "
            f"{show(b['test_mean'])}; A higher on {above}, lower on {below}, level on {level}")
    return line, mean, a["metric"]


def why_no_mean(tests):
    """Why the pairs' A - B should not be averaged over seeds, or None: two pairs tested on the same episodes
    (one seed counted twice), or pairs whose A runs (or B runs) differ in more than the seed (differing_options;
    the sizes of the episodes tested, a retest's or a final test's, count as options), so that each pair asks
    another question."""
    for i, j in itertools.combinations(range(len(tests)), 2):
        if same_episodes(tests[i][0], tests[j][0]) or same_episodes(tests[i][1], tests[j][1]):
            return f"pairs {i + 1} and {j + 1} were tested on the same episodes (one seed)"
    for side, name in ((0, "A"), (1, "B")):
        compared = []
        for pair in tests:
            test = pair[side]
            config = dict(run_config(test, test["file"]) or {})
            # the sizes of the episodes tested are part of what a test asks: a retest's own, a final test's its run's
            sizes = test if "config" not in test else config.get("task") if isinstance(config.get("task"), dict) else {}
            config["tested"] = {k: sizes.get(k) for k in ("way", "shot", "query")}
            compared.append(dict(rule=test.get("rule"), config=config))
        differ = differing_options(compared)  # the rule among them (train.rule)
        if differ:
            return f"their {name} runs differ in more than the seed ({', '.join(differ)})"
    return None


def over_pairs_line(differences, metric):
    """The line after several --paired pairs (one per seed): the mean of their A - B, and its 95% interval over
    the pairs (over_seeds: t distribution), each pair's own interval set aside as the rows' are."""
    mean, ci = over_seeds(differences, None)
    percent, show = metric == "accuracy", shown(metric)
    each = ", ".join(show(d, "+") for d in differences)
    return (f"over the {len(differences)} pairs: A - B {show(mean, '+')} ± {show(ci)}{' points' if percent else ''} of "
            f"{metric} (95% interval over the pairs, t distribution; the pairs' differences {each})")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print the markdown tables of every finished run below a folder "
                                                 "(and write <folder>/window-<task>.png for an experiment named window).")
    parser.add_argument("folder", nargs="?", default=None,
                        help="a folder holding run folders (each with a results.json) at any depth (default: results)")
    parser.add_argument("--paired", nargs=2, action="append", metavar=("RUN_A", "RUN_B"),
                        help="instead: A - B over the test episodes both runs scored (each a run folder, results.json "
                             "or retest-*.json); given once per seed, also the mean of A - B over the seeds (not where two pairs "
                             "share their test episodes, or their A runs or B runs differ in more than the seed: a "
                             "line says so)")
    args = parser.parse_args(argv)
    if args.paired and args.folder is not None:
        print(f"report.py: --paired compares the runs it names, and prints no tables of {args.folder}; drop the folder, "
              f"or run report.py on it alone.", file=sys.stderr)
        return 2
    if args.paired:
        try:
            tests = [(read_test(a), read_test(b)) for a, b in args.paired]  # first: a path that is no test says so
            files = [tuple(final_test_file(path) for path in pair) for pair in args.paired]  # a folder and its results.json alike
            twice = next((pair for pair, f in zip(args.paired, files) if files.count(f) > 1), None)
            if twice:
                raise UsageError(f"the pair {' '.join(twice)} is given twice, which would count it as two seeds; give "
                                 f"each seed's pair once.")
            alone = next((pair for pair, (a, b) in zip(args.paired, files) if a == b), None)
            if alone:
                raise UsageError(f"{alone[0]} and {alone[1]} are the same test, so A - B is zero by construction; pair "
                                 f"it with another run.")
            lines = [paired_line(*pair, *test) for pair, test in zip(args.paired, tests)]
            metrics = sorted({metric for _, _, metric in lines})
            if len(metrics) > 1:
                raise UsageError(f"the pairs measure different metrics ({' and '.join(metrics)}), so they cannot be "
                                 f"averaged; give pairs of one task.")
        except UsageError as err:
            print(f"report.py: {err}", file=sys.stderr)
            return 2
        for line, _, _ in lines:
            print(line)
        if len(lines) > 1:
            reason = why_no_mean(tests)
            print(f"no mean over the pairs: {reason}; a mean over seeds takes one pair per seed, each the same "
                  f"comparison." if reason else over_pairs_line([mean for _, mean, _ in lines], lines[0][2]))
        return 0
    root = "results" if args.folder is None else args.folder
    if not os.path.isdir(root):
        print(f"report.py: {root} is not a folder; give the folder that holds the runs (default: results).", file=sys.stderr)
        return 2
    try:
        runs = load_runs(root)
    except UsageError as err:
        print(f"report.py: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"report.py: no finished run (a folder with results.json) below {root}.", file=sys.stderr)
        return 2
    print(tables(runs))
    window_plots(runs, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
