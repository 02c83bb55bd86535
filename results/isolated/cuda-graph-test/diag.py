# graphed against eager on CUDA, with and without --deterministic: per-step losses and the largest weight difference
import sys, tempfile, pathlib, torch
sys.path.insert(0, ".")
import train, test_train
from tasks import TaskConfig
train.make_task_from_config = test_train.synthetic_few_shot
for task, rule in (("copy", "none"), ("omniglot", "hebbian"), ("copy", "gradient")):
    for det in (False, True):
        res = {}
        for name, graphed in (("eager", False), ("eager2", False), ("graphed", True), ("graphed2", True)):
            d = pathlib.Path(tempfile.mkdtemp())
            train.train(test_train.tiny(d, task, rule, device="cuda", steps=8, warmup=4, log_interval=1, cuda_graph=graphed, deterministic=det))
            log = [r["loss"] for r in train.read_log(d / f"{task}-{rule}") if r["split"] == "train"]
            w = torch.load(d / f"{task}-{rule}" / "checkpoint.pt", weights_only=True)["model"]
            res[name] = (log, w)
        ref_log, ref_w = res["eager"]
        for name, (log, w) in res.items():
            dl = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(log, ref_log))
            dw = max(((w[k] - ref_w[k]).abs().max() / ref_w[k].abs().max().clamp_min(1e-12)).item() for k in w)
            worst = max(w, key=lambda k: (w[k] - ref_w[k]).abs().max().item())
            print(f"{task}/{rule} det={det} {name}: loss rel diff {dl:.2e}, weights max diff (rel to max) {dw:.2e} worst {worst}", flush=True)
        print("losses eager  ", [f"{x:.6f}" for x in ref_log]); print("losses graphed", [f"{x:.6f}" for x in res['graphed'][0]], flush=True)
