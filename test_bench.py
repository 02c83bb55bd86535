"""Tests of bench.py: the timing of the training steps and the count of the aten operations they launch.

    pytest test_bench.py            # a few seconds on a 2-core CPU
"""

import runpy
import types
import weakref

import pytest
import torch

import bench
import train
from plastic import Config, PlasticGPT
from test_train import DETERMINISTIC, deterministic_state, record_deterministic_state, tiny


@pytest.mark.train
def test_bench_times_the_timed_steps_of_every_rule(tmp_path, monkeypatch, capsys):
    """With a clock that advances 5, 10 and 15 ms per training step of none, hebbian and gradient and 1 s per
    evaluation, the rules read 5, 10 and 15 ms/step and 4 sequences / 5, 10, 15 ms: bench() times exactly `timed_steps`
    steps, after its warm-up steps; and the final test as a run's: the test, then the knock-out for a plastic rule."""
    now, build_training, stepped = [0.0], train.build_training, []

    def steps_of_5_ms(run, task, device):
        model, optimizer, train_step, graphed = build_training(run, task, device)

        def step(batch):
            now[0] += 0.005 * (1 + list(train.RULES).index(run.train.rule))
            stepped.append((run.train.rule, batch.x.data_ptr()))
            return train_step(batch)
        return model, optimizer, step, graphed
    def evaluations_of_1_s(*args, **kwargs):
        now[0] += 1.0
        return torch.zeros(1), {}  # per-episode metric, trace
    monkeypatch.setattr(bench, "build_training", steps_of_5_ms)
    monkeypatch.setattr(train, "evaluate", evaluations_of_1_s)  # what train.final_evaluations calls
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    rows = bench.bench(tiny(tmp_path, batch_size=4), timed_steps=3)
    assert [r["rule"] for r in rows] == list(train.RULES), "one row per rule: none, hebbian, gradient"
    for r, ms in zip(rows, (5, 10, 15)):
        assert r["ms_per_step"] == pytest.approx(ms), f"{r['rule']}: 3 timed steps of {ms} ms should read {ms} ms/step, got {r['ms_per_step']}"
        assert r["per_second"] == pytest.approx(4000 / ms), f"{r['rule']}: 4 sequences per {ms} ms are {4000 / ms:.0f}/s, got {r['per_second']}"
        assert r["ops_per_token"] == pytest.approx(r["ops"] / r["tokens"]) and r["ops"] > 0, f"{r['rule']}: no operations counted"
        evaluations = 1 if r["rule"] == "none" else 2  # the test, and a plastic rule's knock-out
        assert r["test_s"] == pytest.approx(evaluations), f"{r['rule']}: the final test is {evaluations} evaluations of 1 s, got {r['test_s']}"
        steps = [batch for rule, batch in stepped if rule == r["rule"]]
        assert len(steps) == 2 + 3 and len(set(steps[2:])) == 3, \
            f"{r['rule']}: 2 warm-up steps, then 3 timed steps on 3 different batches, got {len(steps)} steps on {steps}"
        seq_len = train.load_task(tiny(tmp_path).task).seq_len
        assert r["tokens"] == seq_len, f"{r['rule']}: a training episode has {seq_len} tokens, not {r['tokens']}"
        assert 0 < r["computing_ops"] < r["ops"], f"{r['rule']}: without views {r['computing_ops']} of {r['ops']}"
    out = capsys.readouterr().out
    assert "ms/step" in out and "ops/token" in out, "bench prints its table with times and operation counts"
    header = out.splitlines()[0]
    assert f", PyTorch {torch.__version__};" in header and "deterministic" not in header, \
        f"the table's first line should name the PyTorch it timed, {torch.__version__}, and no deterministic kernels: {header}"
    assert all(r["torch"] == torch.__version__ for r in rows), "each row should record the PyTorch it timed"
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split() and line.split()[0] in train.RULES}
    for r, ms, per_second in zip(rows, ("5.0", "10.0", "15.0"), ("800", "400", "267")):  # params, ms/step, sequences/s,
        # peak GiB, x none, test s, 1k steps s (1,000 x ms = ms s), ops, ops/token, no views
        assert table[r["rule"]] == [f"{r['params']:,}", ms, per_second, "-", f"{float(ms) / 5:.1f}", f"{r['test_s']:.1f}", ms, f"{r['ops']:,}",
                                    f"{r['ops_per_token']:,.0f}", f"{r['computing_ops']:,}"], f"{r['rule']}'s row: {table[r['rule']]}"


@pytest.mark.train
def test_each_rules_memory_check_sees_the_last_rules_model_and_batches_freed(tmp_path, monkeypatch):
    """bench() checks each rule's memory before building it: by then the previous rule's model and training
    batches must be gone, or their memory would be counted as taken and a batch that fits refused."""
    held, build_training, sample = [], train.build_training, None

    def recorded_build(run, task, device):
        built = build_training(run, task, device)
        held.append(weakref.ref(built[0]))
        return built

    def recorded_task(task_cfg):
        nonlocal sample
        task = train.load_task(task_cfg)
        sample = task.sample
        task.sample = lambda *args, **kwargs: (lambda batch: held.append(weakref.ref(batch.x)) or batch)(sample(*args, **kwargs))
        return task

    def check(run, task, device):
        alive = [ref() for ref in held if ref() is not None]
        assert not alive, f"{run.train.rule}: the last rule's {[type(a).__name__ for a in alive]} still held at its memory check"
    monkeypatch.setattr(bench, "build_training", recorded_build)
    monkeypatch.setattr(bench, "load_task", recorded_task)
    monkeypatch.setattr(bench, "check_memory", check)
    bench.bench(tiny(tmp_path, batch_size=4), timed_steps=1)
    assert len(held) >= 3 * 5, f"setup: three models and their batches should have been recorded, got {len(held)}"


@pytest.mark.train
def test_op_counter_counts_every_forward_and_backward_operation():
    """y = sum(a @ b * c), counted by hand from autograd's formulas. Forward: mm, mul, sum. Backward: ones_like
    (the seed dy/dy), expand (sum's backward), two muls (the product's), two mms with a transpose each
    (a @ b's); how autograd seeds and stores the gradients (ones_like, detach) is its own business."""
    a, b, c = (torch.randn(3, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with bench.OpCounter() as forward_only:
        y = (a @ b * c).sum()
    assert dict(forward_only.counts) == {"mm": 1, "mul": 1, "sum": 1}, f"forward: {dict(forward_only.counts)}"
    with bench.OpCounter() as both:
        y = (a @ b * c).sum()
        y.backward()
    arithmetic = {name: both.counts[name] for name in ("mm", "mul", "sum", "expand", "t")}
    assert arithmetic == {"mm": 3, "mul": 3, "sum": 1, "expand": 1, "t": 2}, f"forward and backward: {dict(both.counts)}"
    assert {"expand", "t"} <= both.views <= {"expand", "t", "detach", "alias", "view"}, f"views: {both.views}"
    assert both.computing == both.total - sum(both.counts[name] for name in both.views), "without views: all but the views"
    assert both.computing >= 7, f"at least mm x3, mul x3 and sum are not views, got {both.computing}"


def tiny_step(rule):
    """What count_ops counts in the tests below: a tiny model of the rule, a task whose loss is the outputs'
    mean square, and a batch of 2 sequences of 4 tokens."""
    torch.manual_seed(0)
    model = PlasticGPT(Config(d_in=2, d_out=2, max_len=16, rule=rule, n_layer=2, n_head=2, d_model=16))
    task = types.SimpleNamespace(loss=lambda out, batch: out.pow(2).mean())
    return model, task, types.SimpleNamespace(x=torch.randn(2, 4, 2), images=None, context=None)


@pytest.mark.train
@pytest.mark.parametrize("rule", train.RULES)
def test_op_counts_include_the_backward_pass(rule):
    """count_ops counts a training step's backward pass too: GELU's backward, and more mms than the forward."""
    model, task, batch = tiny_step(rule)
    with bench.OpCounter() as forward:
        model(batch.x, fast_norm=False)
    both = bench.count_ops(model, task, batch)
    assert both.counts["gelu_backward"] > 0 and both.counts["mm"] > forward.counts["mm"], \
        f"{rule}: the backward pass is not counted ({dict(both.counts)})"


@pytest.mark.train
def test_op_count_is_a_training_forward_without_the_fast_weight_norm_its_loss_and_backward():
    """count_ops counts what an explicit training pass launches, written out here: the forward pass as training
    runs it (fast_norm=False: the norm of F_t is a diagnostic, computed only in evaluation), the loss, its backward."""
    model, task, batch = tiny_step("hebbian")
    counted = {}
    for fast_norm in (False, True):
        with bench.OpCounter() as ops:
            out, _ = model(batch.x, fast_norm=fast_norm)
            task.loss(out, batch).backward()
        model.zero_grad(set_to_none=True)
        counted[fast_norm] = dict(ops.counts)
    assert counted[False] != counted[True], "setup: the fast-weight norm should add operations"
    got = dict(bench.count_ops(model, task, batch).counts)
    assert got == counted[False], f"count_ops should count a training pass (fast_norm=False): {got} != {counted[False]}"


@pytest.mark.train
def test_op_count_with_amp_counts_the_forward_pass_under_autocast(monkeypatch):
    """count_ops(amp=True) runs the forward pass under train.autocast, as training does: with CPU bfloat16 autocast
    standing in for CUDA's (train.autocast is a no-op on a CPU), the casts to bfloat16 are counted, and without amp none."""
    monkeypatch.setattr(bench, "autocast", lambda amp, device: torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp))
    model, task, batch = tiny_step("none")
    casts = {amp: bench.count_ops(model, task, batch, amp).counts["_to_copy"] for amp in (False, True)}
    assert casts[False] == 0 and casts[True] > 0, f"casts to bfloat16 counted without and with amp: {casts}"


@pytest.mark.train
def test_bench_rows_count_ops_with_the_runs_amp_and_report_its_test_episodes(tmp_path, monkeypatch):
    """With --amp, bench() counts the operations under autocast as training runs them (a no-op on a CPU, so
    count_ops' argument is recorded), and each row's test_episodes is the final test's 8, not validation's 4."""
    amps, count_ops = [], bench.count_ops

    def recorded(model, task, batch, amp=False):
        amps.append(amp)
        return count_ops(model, task, batch, amp)
    monkeypatch.setattr(bench, "count_ops", recorded)
    rows = bench.bench(tiny(tmp_path, batch_size=4, amp=True, eval_episodes=4, test_episodes=8), timed_steps=1)
    assert amps == [True] * len(train.RULES), f"every rule's operations should be counted with --amp, got {amps}"
    assert [r["test_episodes"] for r in rows] == [8] * len(train.RULES), \
        f"each row should report the final test's 8 episodes, got {[r['test_episodes'] for r in rows]}"


@pytest.mark.train
def test_bench_refuses_a_step_that_cannot_fit_and_an_out_of_memory_is_one_sentence(tmp_path, monkeypatch, capsys):
    """--bench checks memory as a run does; memory running out anyway ends in one sentence and exit code 2."""
    monkeypatch.setattr(train.memory, "free_bytes", lambda device: 1000)
    with pytest.raises(train.UsageError, match="one training step needs about"):
        bench.bench(tiny(tmp_path, batch_size=4), timed_steps=1)
    monkeypatch.undo()

    def out_of_memory(cfg):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 921600000000 bytes.")
    monkeypatch.setattr(bench, "bench", out_of_memory)
    assert train.main(["--bench", "--task", "copy", "--device", "cpu", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: the memory ran out (") and "lower --batch-size" in err and err.count("\n") == 1, err


@pytest.mark.train
def test_op_counts_do_not_depend_on_the_batch_size_and_grow_linearly_with_tokens(tmp_path):
    """What the bench claims: a CPU counts what a GPU launches, whatever the batch (above 1: a batch of one
    skips a few operations). And each token adds the same number of operations: the token loop costs the
    same at every token, so the total is linear in the sequence length (a per-token cost that grew with t,
    as stacking the whole KV cache anew at every token did, shows as a second difference)."""
    counts = {}
    for rule in train.RULES:
        for T in (4, 8, 12):
            for B in (2, 5):
                torch.manual_seed(0)
                model = PlasticGPT(Config(d_in=2, d_out=2, max_len=16, rule=rule, n_layer=2, n_head=2, d_model=16))
                x = torch.randn(B, T, 2)
                task = types.SimpleNamespace(loss=lambda out, batch: out.pow(2).mean())
                counts[rule, T, B] = bench.count_ops(model, task, types.SimpleNamespace(x=x, images=None, context=None)).total
                assert all(p.grad is None for p in model.parameters()), "count_ops should clear the gradients it made"
        for T in (4, 8, 12):
            assert counts[rule, T, 2] == counts[rule, T, 5], f"{rule}, {T} tokens: batch 2 and 5 count {counts[rule, T, 2]} and {counts[rule, T, 5]}"
        first, second = counts[rule, 8, 2] - counts[rule, 4, 2], counts[rule, 12, 2] - counts[rule, 8, 2]
        assert first == second, f"{rule}: tokens 5-8 add {first} operations, tokens 9-12 add {second}: the cost per token grows with t"


@pytest.mark.train
def test_bench_measures_deterministic_kernels_when_asked(tmp_path, monkeypatch, capsys):
    """bench(--deterministic) times every rule under deterministic_algorithms, so its ms/step is their cost, and
    leaves the process's settings as it found them."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # a previous setting other than the default
    before, during = deterministic_state(), record_deterministic_state(monkeypatch, bench)
    bench.bench(tiny(tmp_path, batch_size=4, deterministic=True), timed_steps=1)
    assert during == [DETERMINISTIC] * len(train.RULES), f"each rule should be timed with deterministic kernels: {during}"
    header = capsys.readouterr().out.splitlines()[0]
    assert f"PyTorch {torch.__version__}, deterministic kernels;" in header, f"the table should say its kernels were deterministic: {header}"
    assert deterministic_state() == before, f"bench should restore {before}, left {deterministic_state()}"


@pytest.mark.cli
def test_bench_py_run_alone_points_to_train_py_with_exit_code_2(capsys):
    """The bench takes a run's options, which train.py parses: `python bench.py` says to run
    `python train.py --bench` in one sentence and exits with code 2, rather than doing nothing."""
    with pytest.raises(SystemExit) as done:
        runpy.run_path(bench.__file__, run_name="__main__")
    err = capsys.readouterr().err
    assert done.value.code == 2 and "python train.py --bench" in err and err.count("\n") == 1, \
        f"expected exit 2 and one sentence naming train.py --bench, got {done.value.code}: {err!r}"
