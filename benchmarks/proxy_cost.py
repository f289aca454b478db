"""What one proxy epoch costs, and what each speed-up of the proxy training buys: training and
evaluation throughput of the ResNet-101 baseline and paper presets at the proxy resolutions
(digits at 8 px, cifar10-mini at 16 px), before and after, side by side in one process with the
same threads.

    python benchmarks/proxy_cost.py                          # all models and cells
    python benchmarks/proxy_cost.py --models paper-resnet101-11 --cells digits@8 --probes compile

Table 1, before/after (the same model, init and batches; steps interleaved A, B, A, B ... so a
change of machine load hits both alike; the median step is reported):

- before: the training loop as it was: every batch normalised and resized from uint8, the loss
  read back (``float(loss)``) and the logits checked for NaN on the host every step; evaluation
  with the same per-batch preparation, 256 images per batch.
- after: what ``train.train_model`` does now: batches sliced from the tensor prepared once per
  (dataset, resolution) (``ImageData.prepared``), the loss and NaN flags kept on the device and
  read every 25 steps; evaluation from the prepared tensor with the protocol's
  ``eval_batch_size`` (512; 1024 shown too).

Under each row, probes of the execution choices (train img/s of the "after" loop in float32,
contiguous, against the variant, interleaved): ``channels_last`` memory format, bf16 autocast, ``auto`` (what the protocol's
``auto`` execution picks on this device: bf16 + channels_last on a CUDA GPU, float32 on a CPU)
and ``torch.compile`` (compile time = the first compiled step minus an eager step; break-even =
compile time / time saved per step, compared with the steps of one proxy training: 6 epochs of
the protocol's training subset).

``--device cuda`` runs the same tables on a GPU (batches prepared on the host and copied, as
``train.train_model`` does); steps are timed in blocks of ``--block`` with the device
synchronised at the end of each block, so the "before" loop's per-step host sync costs what it
costs in training:

    python benchmarks/proxy_cost.py --device cuda --probes channels_last,bf16,auto

Timings share the CPU with whatever else runs: the load average is printed at the top and end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recommender.data import find_cifar10_mini, load_dataset  # noqa: E402
from recommender.devices import synchronize  # noqa: E402
from recommender.models import build_model  # noqa: E402
from recommender.protocol import get_protocol  # noqa: E402
from recommender.train import protocol_data, seed_everything, zero_init_residual  # noqa: E402


class Loop:
    """One training loop variant: ``step()`` fetches a batch and runs one SGD step."""

    def __init__(self, model, data, res, batch_size, *, host_sync: bool, channels_last=False,
                 amp=None, compiled=False, device="cpu"):
        self.model = model.to(device)
        self.data, self.res, self.bs = data, res, batch_size
        self.host_sync, self.channels_last, self.amp = host_sync, channels_last, amp
        self.device = device
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(model) if compiled else model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        self.gen = torch.Generator().manual_seed(0)
        self.it = None
        self.flags: list[torch.Tensor] = []
        model.train()

    def batch(self):
        while True:
            if self.it is None:
                self.it = self.data.train_batches(self.bs, self.res, generator=self.gen,
                                                  drop_last=True)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None

    def step(self) -> None:
        x, y = self.batch()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with ctx:
            logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y)
        if self.host_sync:  # the loop before: read the loss and check the logits every step
            lv = float(loss.detach())
            if not math.isfinite(lv) or not bool(torch.isfinite(logits.detach()).all()):
                raise RuntimeError("diverged")
        else:
            self.flags.append(torch.isfinite(loss.detach()) & torch.isfinite(logits.detach()).all())
            if len(self.flags) >= 25:
                assert bool(torch.stack(self.flags).all())
                self.flags = []
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def interleaved(loops: list[Loop], steps: int, warmup: int = 1, block: int = 1) -> list[float]:
    """Median seconds per step of each loop, blocks of ``block`` steps interleaved (warm-up blocks
    untimed). On a GPU the device is synchronised at the end of each block only, so that a loop
    that does not wait for the device every step is timed as it runs."""
    times: list[list[float]] = [[] for _ in loops]
    for i in range(warmup + steps):
        for k, loop in enumerate(loops):
            synchronize(loop.device)
            t0 = time.perf_counter()
            for _ in range(block):
                loop.step()
            synchronize(loop.device)
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) / block)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def eval_seconds(model, data, res, batch_size, images) -> tuple[float, int]:
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    synchronize(device.type)
    t0 = time.perf_counter()
    for x, _ in data.val_batches(batch_size, res):
        model(x.to(device, non_blocking=True))
        seen += x.shape[0]
        if seen >= images:
            break
    synchronize(device.type)
    return time.perf_counter() - t0, seen


def eval_ips(variants, images: int, rounds: int = 3) -> list[float]:
    """Images/s of each (model, data, res, batch size) evaluation, rounds interleaved (the first
    round untimed: it also builds the prepared tensors), median round."""
    times: list[list[float]] = [[] for _ in variants]
    for r in range(rounds + 1):
        for k, (model, data, res, bs) in enumerate(variants):
            sec, seen = eval_seconds(model, data, res, bs, images)
            if r:
                times[k].append(seen / sec)
    return [statistics.median(t) for t in times]


def fresh(spec: str, num_classes: int):
    seed_everything(0)
    model = build_model("resnet101", None if spec == "resnet101" else spec, num_classes=num_classes)
    zero_init_residual(model)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet101,paper-resnet101-11,paper-resnet101-13",
                    help="comma list: 'resnet101' (baseline) or preset names")
    ap.add_argument("--cells", default="digits@8,cifar10-mini@16",
                    help="comma list of dataset@px (the proxy resolutions)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant and cell")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-images", type=int, default=1024)
    ap.add_argument("--eval-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--block", type=int, default=None,
                    help="steps per timed block (default 1 on a CPU, 10 on a GPU, where the "
                         "device is synchronised once per block)")
    ap.add_argument("--probes", default="channels_last,bf16",
                    help="comma list of channels_last, bf16, auto (what the protocol's 'auto' "
                         "execution picks on this device), compile (minutes of compilation per "
                         "model on a 2-core CPU), or none")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    block = args.block or (10 if args.device == "cuda" else 1)
    where = (f"{torch.cuda.get_device_name()}, {args.threads} host threads" if args.device == "cuda"
             else f"{args.threads} threads")
    print(f"torch {torch.__version__}, {where}, load average "
          f"{os.getloadavg()[0]:.2f} (other processes share the cores), batch {args.batch_size}, "
          f"{args.steps} timed blocks of {block} step(s) per variant (interleaved), median block")
    proto = get_protocol("proxy", threads=args.threads, device=args.device)
    auto = proto.execution()
    variants = {"channels_last": ("channels_last", {"channels_last": True}),
                "bf16": ("bf16 autocast", {"amp": torch.bfloat16}),
                "auto": (f"auto ({'bf16' if auto.amp_dtype == torch.bfloat16 else 'fp16' if auto.amp_dtype else 'fp32'}"
                         f"{', ch_last' if auto.channels_last else ''})",
                         {"amp": auto.amp_dtype, "channels_last": auto.channels_last})}
    cells = []
    for cell in args.cells.split(","):
        name, px = cell.split("@")
        if name == "cifar10-mini":
            root = find_cifar10_mini()
            if root is None:
                print("cifar10-mini not found: skipped")
                continue
            full = load_dataset(f"imagefolder:{root}")
        else:
            full = load_dataset(name)
        d_after = protocol_data(full, proto)
        d_before = replace(d_after, prepared_cache_mb=0.0)  # no prepared tensors: per batch
        cells.append((name, int(px), d_before, d_after))
    probes = [p for p in args.probes.split(",") if p and p != "none"]
    head = (f"{'model':<20} {'dataset':<13} {'px':>3} | {'train img/s':>21} {'x':>5} | "
            f"{'eval img/s before':>17} {'after 512':>9} {'1024':>6} {'x':>5}")
    print("\nTable 1: before -> after (train: median step; eval: images/s)")
    print(head)
    print("-" * len(head))

    def probe_row(what: str, t0: float, t1: float, note: str = "") -> None:
        # printed as measured, so a run stopped at its time limit keeps what it finished
        i0, i1 = args.batch_size / t0, args.batch_size / t1
        print(f"    probe {what:<20} {i0:>9.1f} -> {i1:>9.1f} {i1 / i0:>5.2f} {note}", flush=True)
    for spec in args.models.split(","):
        for name, px, d_before, d_after in cells:
            m0 = fresh(spec, d_after.num_classes)
            before = Loop(copy.deepcopy(m0), d_before, px, args.batch_size, host_sync=True,
                          device=args.device)
            after = Loop(copy.deepcopy(m0), d_after, px, args.batch_size, host_sync=False,
                         device=args.device)
            tb, ta = interleaved([before, after], args.steps, block=block)
            ev_b, ev_a, ev_a2 = eval_ips([(before.model, d_before, px, 256),
                                          (after.model, d_after, px, 512),
                                          (after.model, d_after, px, 1024)], args.eval_images,
                                         args.eval_rounds)
            ib, ia = args.batch_size / tb, args.batch_size / ta
            print(f"{spec:<20} {name:<13} {px:>3} | {ib:>9.1f} -> {ia:>9.1f} {ia / ib:>5.2f} | "
                  f"{ev_b:>17.1f} {ev_a:>9.1f} {ev_a2:>6.1f} {ev_a / ev_b:>5.2f}", flush=True)
            steps_per_proxy = math.ceil(d_after.n_train / args.batch_size) * proto.epochs
            for probe in probes:
                base = Loop(copy.deepcopy(m0), d_after, px, args.batch_size, host_sync=False,
                            device=args.device)
                if probe in variants:
                    label, kw = variants[probe]
                    other = Loop(copy.deepcopy(m0), d_after, px, args.batch_size, host_sync=False,
                                 device=args.device, **kw)
                    t0, t1 = interleaved([base, other], args.steps, block=block)
                    probe_row(label, t0, t1)
                elif probe == "compile":
                    other = Loop(copy.deepcopy(m0), d_after, px, args.batch_size, host_sync=False,
                                 compiled=True, device=args.device)
                    base.step()
                    synchronize(args.device)
                    c0 = time.perf_counter()
                    other.step()  # compiles (forward and backward graphs)
                    synchronize(args.device)
                    first = time.perf_counter() - c0
                    t0, t1 = interleaved([base, other], args.steps, warmup=1, block=block)
                    compile_s = first - t0
                    saved = t0 - t1
                    even = f"after {compile_s / saved:.0f} steps" if saved > 0 else "never"
                    probe_row("torch.compile", t0, t1,
                              f"compile {compile_s:.0f} s, break-even {even} "
                              f"(one proxy training: {steps_per_proxy} steps)")
    print(f"\nload average now {os.getloadavg()[0]:.2f}; proxy subsets: "
          + ", ".join(f"{n}: {a.n_train} train / {a.n_val} val" for n, _, _, a in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
