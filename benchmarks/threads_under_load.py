"""Training speed when the machine is not idle: seconds per optimiser step of one training under
each threading setting, on an idle machine and beside a busy process, measured side by side in
one run (each setting in a fresh process, so OpenMP reads its settings at start).

The step is a ResNet-101 (CIFAR stem) forward + backward + SGD step at batch 64 on 8 px inputs,
the ``proxy`` fidelity's baseline step on digits. Loads: ``idle``; ``spin`` (one Python busy loop,
one core taken); ``train`` (a second training with 2 threads, the two-studies-at-once case).

    python benchmarks/threads_under_load.py [--steps 12] [--loads idle,spin,train] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (name, environment, torch threads, interop threads)
SETTINGS = [
    ("2 threads (default)", {}, 2, 0),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, 2, 0),
    ("1 thread", {}, 1, 0),
]

CHILD = r"""
import statistics, sys, time, torch
sys.path.insert(0, {root!r})
from recommender.models import build_model
threads, interop, steps, model = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
if interop:
    torch.set_num_interop_threads(interop)
torch.manual_seed(0)
net = build_model(model, None, num_classes=10).train()
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
times = []
for i in range(steps + 2):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    if i >= 2:  # the first steps allocate
        times.append(time.perf_counter() - t0)
print(statistics.median(times), max(times))
"""

BURNERS = {
    "spin": [sys.executable, "-c", "while True: pass"],
    "train": None,  # a second training: the child itself with 2 threads and many steps
}


def run_child(env_extra: dict, threads: int, interop: int, steps: int, model: str) -> tuple[float, float]:
    env = {**os.environ, **env_extra}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(threads), str(interop), str(steps),
                          model], env=env, capture_output=True, text=True, check=True)
    med, worst = out.stdout.split()
    return float(med), float(worst)


def start_burner(load: str, model: str) -> subprocess.Popen | None:
    if load == "idle":
        return None
    if load == "spin":
        return subprocess.Popen(BURNERS["spin"])
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT)), "2", "0", "100000", model], env=env,
                            stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--model", default="resnet101")
    ap.add_argument("--loads", default="idle,spin,train")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    t_start = time.perf_counter()
    for load in args.loads.split(","):
        burner = start_burner(load, args.model)
        try:
            if burner is not None:
                time.sleep(3.0)  # let the burner reach its steady state
            for name, env, threads, interop in SETTINGS:
                med, worst = run_child(env, threads, interop, args.steps, args.model)
                rows.append({"load": load, "setting": name, "median_s": round(med, 3), "max_s": round(worst, 3)})
                print(f"{load:6s} {name:38s} median {med:.3f} s/step  max {worst:.3f}", flush=True)
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
    idle = {r["setting"]: r["median_s"] for r in rows if r["load"] == "idle"}
    print("\nslowdown against the same setting on an idle machine, and against the idle default:")
    base = idle.get(SETTINGS[0][0])
    for r in rows:
        if r["load"] != "idle" and r["setting"] in idle:
            r["slowdown"] = round(r["median_s"] / idle[r["setting"]], 2)
            r["vs_idle_default"] = round(r["median_s"] / base, 2) if base else None
            print(f"{r['load']:6s} {r['setting']:38s} {r['slowdown']:.2f}x its idle, {r['vs_idle_default']:.2f}x the "
                  "idle default")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "batch": 64, "input_px": 8, "steps": args.steps,
                                              "cpus": os.cpu_count(), "rows": rows,
                                              "seconds": round(time.perf_counter() - t_start, 1)}, indent=2))


if __name__ == "__main__":
    main()
