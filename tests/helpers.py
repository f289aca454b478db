"""Small shared test fixtures: a tiny CNN that trains in a second, a slow one and a diverging one;
an ImageFolder of random images."""

import os
import signal
import time
from pathlib import Path

import numpy as np
from torch import nn


def nontrivial_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm2d of ``model`` the non-trivial statistics and affine parameters of a
    trained network (in place)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data = torch.rand(mod.num_features, generator=g) + 0.5
            mod.bias.data = torch.randn(mod.num_features, generator=g) * 0.1
            mod.running_mean = torch.randn(mod.num_features, generator=g) * 0.1
            mod.running_var = torch.rand(mod.num_features, generator=g) + 0.5
    return model


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class SlowCNN(TinyCNN):
    """TinyCNN whose every forward pass in eval mode takes ``RECOMMENDER_TEST_SLOW_S`` seconds
    more (default 0): a trial (its evaluation) lasts long enough for a test to interrupt it."""

    def forward(self, x):
        if not self.training:
            time.sleep(float(os.environ.get("RECOMMENDER_TEST_SLOW_S", "0")))
        return super().forward(x)


class DivergingCNN(TinyCNN):
    """TinyCNN whose logits overflow float32 while training (a baseline whose training
    diverges: the loss is not finite)."""

    def forward(self, x):
        out = super().forward(x)
        return out * 1e38 if self.training else out


def step_space(family: str) -> str:
    """A search space of one architecture, no pruning (sparsity 0) and fp32, whose free continuous
    dimension ``prune.step`` makes every candidate distinct: replayed or lockstep proposals show."""
    return f"""\
family: {family}
description: one architecture, no pruning, fp32; prune.step is a free continuous dimension
arch: {{}}
prune:
  method: {{choices: [unstructured-l1]}}
  sparsity: {{value: 0.0}}
  step: {{low: 0.05, high: 0.95}}
quant:
  scheme: {{choices: [fp32]}}
warm_start: []
"""


def interruptible_child() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: restore the default action.
    A test run started in the background of a non-interactive shell inherits SIGINT *ignored*
    (POSIX), and a Python started that way installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def random_image(rng, size: tuple[int, int]):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_folder(root: Path, classes: int = 3, per_class: int = 12, size=(20, 20), fmt="png",
                seed: int = 0) -> Path:
    """An ImageFolder of random images: ``classes`` folders of ``per_class`` images of ``size``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            random_image(rng, size).save(d / f"img{i:03d}.{fmt}")
    return root


#: A search space of a few tiny CIFAR-ResNet ghost nets (seconds to train at smoke fidelity).
TINY_SPACE = """
family: cifar-resnet
arch:
  stem: {value: dws}
  stem_width: {value: 16}
  block: {value: ghost}
  widths: {choices: [[16, 24, 40, 88], [10, 22, 42, 86]]}
  inner: {value: [32, 64, 128, 256]}
  drop_last: {value: true}
  head: {value: nofc}
  width_multiplier: {choices: [0.25, 0.5, 1.0]}
prune:
  method: {choices: [none, unstructured-l1]}
  sparsity: {low: 0.3, high: 0.6, step: 0.3, when: {method: unstructured-l1}}
quant:
  scheme: {choices: [fp32]}
"""


# -- synthetic studies for the answer layer (no training) -------------------------------------------

def evaluation(acc: float, cost: float, base_acc: float, *, half: float = 0.5, metric: str = "params",
               lo: float | None = None, hi: float | None = None, ok: bool = True, **costs) -> dict:
    """A stored evaluation: accuracy ``acc`` (fraction) and primary cost ``cost`` (in ``metric``'s
    field), its drop against a ``base_acc`` baseline in pp with the interval [lo, hi] (default
    drop +- ``half``)."""
    from recommender.constraints import Budget

    field = Budget.parse({"params": "1M-params", "flops": "1M-flops", "size": "1MB", "latency": "1ms"}[metric]).cost_field
    drop = (base_acc - acc) * 100
    return {"recipe": {}, "ok": ok, "reason": "" if ok else "diverged", "accuracy": acc if ok else None,
            "acc_low": acc - 0.01, "acc_high": acc + 0.01, "drop_pp": drop if ok else None,
            "drop_low_pp": (drop - half if lo is None else lo) if ok else None,
            "drop_high_pp": (drop + half if hi is None else hi) if ok else None,
            "costs": {field: cost, **costs}, "fidelity": "proxy"}


def baseline(acc: float, *, n: int | None = None, costs: dict | None = None, low: float | None = None,
             high: float | None = None) -> dict:
    """A stored baseline of accuracy ``acc`` (fraction); with ``n``, a per-image correctness vector
    of ``n`` validation images."""
    from recommender.evaluation import Baseline

    correct = None
    if n:
        k = int(round(acc * n))
        correct = np.zeros(n, dtype=bool)
        correct[:k] = True
    return Baseline(acc, acc - 0.02 if low is None else low, acc + 0.02 if high is None else high,
                    costs or {"params": 1e7}, "trained", "proxy", correct).to_dict()


def synthetic_study(tmp_path: Path, *, base: float, max_drop: str, budgets: list[str], cands: dict,
                    rungs: dict | None = None, num_classes: int | None = 10, name: str = "s",
                    baseline_attr: dict | None = None, promoted: dict | None = None):
    """A study in SQLite as the search stores it, from fake evaluations.

    ``cands``: {trial: {rung: evaluation dict}} (rung 0 is required: the search's trial);
    ``rungs``: {k: baseline dict} for the rungs above 0 (their studies ``<name>.rung<k>``);
    ``promoted``: {k: [trials]} (default: the trials with an evaluation at rung k).
    """
    import optuna
    from dataclasses import asdict

    from recommender.constraints import MaxDrop, parse_budgets
    from recommender.feasibility import Feasibility

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / (name + '.db')}")
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"])
    md, bs = MaxDrop.parse(max_drop), parse_budgets(budgets)
    spec = {"model": "resnet18", "dataset": "digits", "fidelity": "proxy", "max_drop": asdict(md),
            "budgets": [asdict(b) for b in bs], "seed": 0}
    study.set_user_attr("spec", spec)
    study.set_user_attr("question", {**spec, "num_classes": num_classes, "image_size": None})
    study.set_user_attr("baseline", baseline_attr or baseline(base))
    study.set_user_attr("rungs", [{"index": 0, "label": "proxy (8 px, 6 ep)"}])
    fz = Feasibility(md, tuple(bs))
    base0 = (baseline_attr or {}).get("accuracy", base)
    assert sorted(cands) == list(range(len(cands))), "trials are numbered 0.. in the order they are added"
    for trial in sorted(cands):
        ev = cands[trial][0]
        cons = fz.constraint_values(ev["drop_pp"], ev["costs"], base0) if ev["ok"] else None
        if ev["ok"]:
            study.add_trial(optuna.trial.create_trial(
                values=[ev["accuracy"], bs[0].value(ev["costs"])],
                user_attrs={"recipe": {}, "evaluation": ev, "constraints": cons},
                constraints={f"c{i}": c for i, c in enumerate(cons)}))
        else:
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                      user_attrs={"recipe": {}, "evaluation": ev}))
    for k, battr in sorted((rungs or {}).items()):
        rst = optuna.create_study(storage=storage, study_name=f"{name}.rung{k}", direction="maximize")
        rst.set_user_attr("label", f"proxy+r{k}")
        rst.set_user_attr("baseline", battr)
        members = (promoted or {}).get(k) or [t for t in sorted(cands) if k in cands[t]]
        rst.set_user_attr("promoted", members)
        study.set_user_attr(f"promoted_{k}", members)
        for t in members:
            ev = cands[t].get(k)
            if ev is None:
                continue
            state = optuna.trial.TrialState.COMPLETE if ev["ok"] else optuna.trial.TrialState.FAIL
            rst.add_trial(optuna.trial.create_trial(
                state=state, value=ev["accuracy"] if ev["ok"] else None,
                user_attrs={"source_trial": t, "recipe": {}, "evaluation": ev}))
    return study
