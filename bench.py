"""
Speed: milliseconds per training step of each rule, peak GPU memory, and the aten operations a step launches.

    python train.py --bench --task omniglot --batch-size 64                   # 40 tokens: ten classes of 1 + 3 images
    python train.py --bench --task copy --seq-len 20 --delay 40 --d-model 128 --n-layer 4   # 80 tokens

Every rule runs with the same settings and the training step of train.py (forward, backward, gradient
clipping, AdamW; sampling excluded), a CUDA graph on CUDA as in training, timed after warm-up. The
operations are counted on one eager forward and backward pass (no optimizer) under a dispatch mode that
sees every aten operation, those of autograd's backward included. They depend on the model and the
number of tokens, not on the batch size, and hardly on the device (an H100 counted 10 more than a CPU
at 80 tokens): a CPU counts what a GPU launches. On a GPU a step is launch-bound while it is short (a
few microseconds per operation), so the count is what the plastic rules' token loop has to bring down.
"""

import dataclasses
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train import (GRAPH_WARMUP, RULES, RunConfig, autocast, build_training, check_memory, deterministic_algorithms,
                   device_name, eager_step_on_side_stream, final_evaluations, load_task, pick_device, record_cuda_graph,
                   resolve, set_cpu_threads)


class OpCounter(TorchDispatchMode):
    """Inside `with OpCounter() as ops:` every aten operation dispatched (forward and backward) is counted:
    ops.counts maps an operation's name (e.g. "mm") to its calls, ops.total is their sum, and ops.computing
    leaves out the views (view, unsqueeze, transpose, slice, detach...), which only relabel memory: on a
    GPU each of the others launches a kernel (or more)."""

    def __init__(self):
        super().__init__()
        self.counts, self.views = Counter(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        if func.is_view:
            self.views.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.counts.values())

    @property
    def computing(self):
        return sum(n for name, n in self.counts.items() if name not in self.views)


def count_ops(model, task, batch, amp=False) -> OpCounter:
    """The aten operations of one forward pass, its loss and its backward pass, as training runs them (with
    --amp, under bfloat16 autocast). The gradients it leaves are cleared."""
    with OpCounter() as ops:
        with autocast(amp, batch.x.device):
            out, _ = model(batch.x, batch.images, fast_norm=False, context=batch.context)
        task.loss(out.float(), batch).backward()
    model.zero_grad(set_to_none=True)
    return ops


def time_steps(train_step, batches, device, timed_steps: int) -> float:
    """ms per step of `timed_steps` steps after two warm-up steps, waiting for the device at both ends."""
    for batch in batches[:2]:  # warm-up (eager) or the first replays of a CUDA graph
        train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for i in range(timed_steps):
        loss, _ = train_step(batches[i % len(batches)])
    loss.item()  # waits for the last step
    return 1000 * (time.perf_counter() - started) / timed_steps


def time_final_test(model, task, tc, device) -> float:
    """Seconds of a run's final test, train.final_evaluations (without final_test's fingerprint, printing and files)."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    synchronize()
    started = time.perf_counter()
    final_evaluations(model, task, tc, device)
    synchronize()
    return time.perf_counter() - started


def bench_rule(run: RunConfig, task, timed_steps: int) -> dict:
    """One rule's row of the table; what it held is free once it returns, before the next rule's memory check."""
    tc, device = run.train, pick_device(run.train.device)
    set_cpu_threads(tc, device)
    if device.type == "cuda":  # the last rule's cached blocks are free to this one
        torch.cuda.empty_cache()
    check_memory(run, task, device)
    if device.type == "cuda":  # peak memory of everything this rule allocates, the graph's pool included
        torch.cuda.reset_peak_memory_stats(device)
    model, optimizer, train_step, graphed = build_training(run, task, device)
    generator = torch.Generator(device=device).manual_seed(tc.seed)
    batches = [task.sample(tc.batch_size, "train", device, generator) for _ in range(4)]
    ops, tokens = count_ops(model, task, batches[0], tc.amp), batches[0].x.shape[1]  # a training episode's tokens
    if graphed:
        side_stream = torch.cuda.Stream(device)
        for batch in batches[:GRAPH_WARMUP]:
            eager_step_on_side_stream(train_step, batch, side_stream)
        train_step = record_cuda_graph(train_step, batches[0])
    ms = time_steps(train_step, batches, device, timed_steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    test_s = time_final_test(model, task, tc, device)
    return dict(rule=run.train.rule, params=model.num_params(), ms_per_step=ms, per_second=1000 * tc.batch_size / ms,
                peak_gib=peak, test_s=test_s, test_episodes=tc.test_episodes, ops=ops.total, ops_per_token=ops.total / tokens, computing_ops=ops.computing,
                device=device_name(device), torch=torch.__version__, cuda_graph=graphed,
                fast_form=run.model.fast_form, task=task.name, batch_size=tc.batch_size, tokens=tokens)


def bench(cfg: RunConfig, timed_steps: int = 20) -> list[dict]:
    """--bench: each rule's ms/step, sequences/s, peak GPU memory, the final test's seconds and aten operations
    per token; one table. --deterministic measures its kernels."""
    task = load_task(cfg.task)
    runs = [resolve(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rule=rule)), task) for rule in RULES]
    with deterministic_algorithms(cfg.train.deterministic):
        rows = [bench_rule(run, task, timed_steps) for run in runs]
    print_table(rows, cfg, timed_steps)
    return rows


def print_table(rows: list[dict], cfg: RunConfig, timed_steps: int) -> None:
    m = rows[0]
    print(f"bench: {m['task']}, batch {m['batch_size']}, {m['tokens']} tokens, d_model {cfg.model.d_model}, "
          f"{cfg.model.n_layer} layers, {m['fast_form']} fast weights, CUDA graph {'on' if m['cuda_graph'] else 'off'}, "
          f"{m['device']}, PyTorch {m['torch']}{', deterministic kernels' if cfg.train.deterministic else ''}; "
          f"{timed_steps} timed steps after warm-up; the final test ({m['test_episodes']:,} episodes "
          f"and the knock-out) in seconds, beside 1,000 training steps; aten operations of one forward and backward "
          f"pass, all and without views")
    print(f"{'rule':<9} {'params':>10} {'ms/step':>9} {'sequences/s':>12} {'peak GiB':>9} {'x none':>7} {'test s':>7} "
          f"{'1k steps s':>11} {'ops':>9} {'ops/token':>10} {'no views':>9}")
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"{r['rule']:<9} {r['params']:>10,} {r['ms_per_step']:>9.1f} {r['per_second']:>12,.0f} {peak:>9} "
              f"{r['ms_per_step'] / rows[0]['ms_per_step']:>7.1f} {r['test_s']:>7.1f} {r['ms_per_step']:>11.1f} "
              f"{r['ops']:>9,} {r['ops_per_token']:>10,.0f} "
              f"{r['computing_ops']:>9,}")


if __name__ == "__main__":  # the bench takes a run's options, so train.py parses them
    print("bench.py: it runs through train.py, with a run's options: python train.py --bench --task omniglot "
          "(the examples at the top of bench.py).", file=sys.stderr)
    sys.exit(2)
