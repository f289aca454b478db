"""Proxy training, evaluation with intervals, paired drops, KD, fine-tune and calibration batches."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from recommender.data import find_cifar10_mini, load_dataset
from recommender.protocol import get_protocol
from recommender.train import (
    batches, evaluate, finetune_fn, paired_drop, seed_everything, teacher_logits, train_model,
    wilson_interval)

from helpers import TinyCNN  # noqa: E402

torch.set_num_threads(1)






class NaNModel(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3))) * float("nan")


def small_model(num_classes: int = 10) -> tuple[nn.Module, str]:
    """``paper-resnet101-11`` from the model catalog when it is importable, else a tiny CNN."""
    try:
        from recommender.models import build_model

        return build_model("resnet101", "paper-resnet101-11", num_classes=num_classes), \
            "paper-resnet101-11"
    except Exception:  # the catalog has not landed (or lacks the preset)
        return TinyCNN(num_classes), "tiny-cnn"


# 1 thread: the tests share 2 cores with other work.
SMOKE = get_protocol("smoke", threads=1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained_tiny(digits):
    seed_everything(0)
    model = TinyCNN()
    result = train_model(model, digits, SMOKE.replace(epochs=10, lr=0.1))
    return model, result


# --- training ---------------------------------------------------------------------------------

def test_smoke_training_beats_chance_on_digits(digits):
    seed_everything(0)
    model, name = small_model()
    proto = SMOKE.replace(epochs=4, train_size=768) if name != "tiny-cnn" else SMOKE.replace(epochs=3)
    result = train_model(model, digits, proto)
    ev = evaluate(model, digits, proto)
    assert result.ok, result.reason
    assert result.epochs_run == proto.epochs and result.images_per_s > 0
    assert ev.accuracy > 0.5, f"{name}: {ev.accuracy:.3f} after {result.seconds:.1f}s"
    assert ev.ci_low < ev.accuracy < ev.ci_high


def test_training_is_deterministic(digits, trained_tiny):
    model, result = trained_tiny
    seed_everything(0)
    again = TinyCNN()
    r2 = train_model(again, digits, SMOKE.replace(epochs=10, lr=0.1))
    assert r2.losses == result.losses
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_threads_restored(digits):
    before = torch.get_num_threads()
    train_model(TinyCNN(), digits, SMOKE.replace(epochs=1, train_size=64, threads=2))
    assert torch.get_num_threads() == before


def test_smoke_training_on_cifar10_mini_slice():
    root = find_cifar10_mini()
    if root is None:
        pytest.skip("cifar10-mini not found (set RECOMMENDER_CIFAR10_MINI)")
    data = load_dataset(f"imagefolder:{root}")
    proto = get_protocol("smoke", threads=1, train_size=1500, val_size=500, max_resolution=16,
                         epochs=4, lr=0.05, augment=True)
    seed_everything(0)
    model = TinyCNN(width=24)
    result = train_model(model, data, proto)
    ev = evaluate(model, data, proto)
    assert result.ok, result.reason
    assert ev.n == 500
    assert ev.accuracy > 0.2, f"{ev.accuracy:.3f}"  # chance is 0.1
    assert ev.ci_low > 0.1


def test_nan_loss_stops_with_reason(digits):
    result = train_model(NaNModel(), digits, SMOKE)
    assert not result.ok and "non-finite" in result.reason
    assert result.epochs_run == 0 and result.steps == 0


def test_huge_learning_rate_diverges(digits):
    seed_everything(0)
    result = train_model(TinyCNN(), digits, SMOKE.replace(lr=1e6, schedule="constant"))
    assert not result.ok and "diverged" in result.reason


# --- evaluation and intervals ----------------------------------------------------------------

def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert 0.0 < wilson_interval(10, 10)[0] < 1.0


def test_interval_shrinks_as_validation_grows(digits, trained_tiny):
    model, _ = trained_tiny
    small = evaluate(model, digits, SMOKE.replace(val_size=60))
    large = evaluate(model, digits, SMOKE.replace(val_size=400))
    assert small.n == 60 and large.n == 400
    assert np.array_equal(large.correct[:60], small.correct)  # the same first images
    assert (large.ci_high - large.ci_low) < (small.ci_high - small.ci_low)
    assert not model.training


def test_paired_drop():
    rng = np.random.default_rng(0)
    base = rng.random(1000) < 0.9
    same = paired_drop(base, base)
    assert same.drop_pp == 0.0 and same.ci_low_pp == 0.0 and same.ci_high_pp == 0.0
    assert same.prob_within(0.0) == 1.0
    cand = base.copy()
    cand[np.flatnonzero(base)[:50]] = False  # 5 pp worse
    d = paired_drop(base, cand, n_boot=4000, seed=1)
    assert d.drop_pp == pytest.approx(5.0)
    assert d.ci_low_pp < 5.0 < d.ci_high_pp and d.ci_low_pp > 3.0
    assert d.prob_within(2.0) < 0.01 and d.prob_within(8.0) > 0.99
    assert paired_drop(base, cand, seed=1).ci_low_pp == paired_drop(base, cand, seed=1).ci_low_pp
    # a bigger sample gives a narrower interval for the same rates
    big = paired_drop(np.tile(base, 4), np.tile(cand, 4))
    assert big.ci_high_pp - big.ci_low_pp < d.ci_high_pp - d.ci_low_pp
    with pytest.raises(ValueError):
        paired_drop(base, cand[:10])


# --- distillation, fine-tune, batches --------------------------------------------------------

def test_teacher_logits_and_distillation(digits, trained_tiny):
    teacher, _ = trained_tiny
    proto = SMOKE.replace(distill_alpha=0.7, distill_temperature=3.0, epochs=10, lr=0.1)
    logits = teacher_logits(teacher, digits, proto)
    assert logits.shape == (proto.train_size, 10) and torch.isfinite(logits).all()
    # the teacher is good on its training images
    sub = digits.subset(proto.train_size)
    assert float((logits.argmax(1) == sub.train_y).float().mean()) > 0.5
    seed_everything(1)
    student = TinyCNN(width=8)
    result = train_model(student, digits, proto, teacher_logits=logits)
    assert result.ok
    assert evaluate(student, digits, proto).accuracy > 0.5
    with pytest.raises(ValueError):
        train_model(TinyCNN(), digits, proto, teacher_logits=logits[:10])


def test_batches_and_finetune(digits, trained_tiny):
    model, _ = trained_tiny
    got = list(batches(digits, SMOKE, 12))  # more than one epoch of the 512-image subset
    assert len(got) == 12
    assert got[0][0].shape == (SMOKE.calibration_batch_size, 3, 8, 8)
    again = list(batches(digits, SMOKE, 2))
    assert torch.equal(again[0][0], got[0][0])

    import copy

    import torch.nn.utils.prune as prune

    m = copy.deepcopy(model)
    prune.l1_unstructured(m.features[0], "weight", amount=0.5)
    zeros = int((m.features[0].weight == 0).sum())
    before = [p.detach().clone() for p in m.parameters()]
    m.eval()
    ft = finetune_fn(digits, SMOKE)
    loss = ft(m, 5)
    assert np.isfinite(loss)
    assert not m.training  # mode restored
    assert int((m.features[0].weight == 0).sum()) >= zeros  # masks still applied
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert ft(m, 0) == 0.0


def test_smoke_protocol_is_fast(digits):
    seed_everything(0)
    t0 = time.perf_counter()
    train_model(TinyCNN(), digits, SMOKE)
    assert time.perf_counter() - t0 < 30


# --- deadline, sync-free NaN checks, execution settings -----------------------------------------

class LateNaN(nn.Module):
    """A tiny CNN whose output turns NaN from its ``bad_from``-th training forward on."""

    def __init__(self, bad_from: int):
        super().__init__()
        self.net = TinyCNN()
        self.calls = 0
        self.bad_from = bad_from

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.training and self.calls >= self.bad_from else out


def test_nan_found_later_still_names_its_step(digits):
    seed_everything(0)
    # 8 steps per epoch; the loss is read every 3 steps: step 5 is found at the read after step 6
    result = train_model(LateNaN(5), digits, SMOKE, check_every=3)
    assert not result.ok and "step 5/16" in result.reason and "epoch 1" in result.reason
    assert result.steps == 4 and result.epochs_run == 0


def test_reading_the_loss_rarely_changes_nothing(digits):
    runs = []
    for every in (1, 5, 1000):
        seed_everything(0)
        m = TinyCNN()
        r = train_model(m, digits, SMOKE, check_every=every)
        runs.append((r.losses, [t.clone() for t in m.state_dict().values()]))
    for losses, state in runs[1:]:
        assert losses == runs[0][0]
        assert all(torch.equal(a, b) for a, b in zip(state, runs[0][1]))


def test_deadline_stops_training_at_the_next_step(digits):
    seed_everything(0)
    done = time.monotonic() - 1.0
    r = train_model(TinyCNN(), digits, SMOKE, deadline=done)
    assert not r.ok and "time limit reached at step 0/16" in r.reason and r.steps == 0

    deadline = time.monotonic() + 2.0

    def slow_after_three(step, total, loss):
        while step == 3 and time.monotonic() < deadline:
            time.sleep(0.05)

    r = train_model(TinyCNN(), digits, SMOKE, deadline=deadline, progress=slow_after_three)
    assert not r.ok and "time limit reached at step 3/16" in r.reason and r.steps == 3
    assert train_model(TinyCNN(), digits, SMOKE, deadline=time.monotonic() + 600).ok


def test_finetune_deadline_raises_with_the_result(digits, trained_tiny):
    import copy

    from recommender.train import TimeLimitReached

    model, _ = trained_tiny
    ft = finetune_fn(digits, SMOKE, deadline=time.monotonic() - 1)
    with pytest.raises(TimeLimitReached) as err:
        ft(copy.deepcopy(model), 5)
    assert not err.value.result.ok and "time limit reached at step 0/5" in err.value.result.reason
    ft2 = finetune_fn(digits, SMOKE)  # per-call deadline
    assert np.isfinite(ft2(copy.deepcopy(model), 2, deadline=time.monotonic() + 600))
    with pytest.raises(TimeLimitReached):
        ft2(copy.deepcopy(model), 2, deadline=time.monotonic() - 1)


def test_cpu_bf16_and_channels_last_paths_run(digits):
    """The mixed-precision / channels_last code path (CUDA's defaults) on the CPU: it trains,
    evaluates, and gives the model back float32 in the default memory format."""
    proto = SMOKE.replace(device="cpu", precision="bf16", channels_last="on", epochs=1)
    ex = proto.execution()
    assert ex.amp_dtype == torch.bfloat16 and ex.channels_last and ex.device == "cpu"
    seed_everything(0)
    m = TinyCNN()
    r = train_model(m, digits, proto)
    assert r.ok, r.reason
    conv = m.features[0].weight
    assert conv.dtype == torch.float32 and conv.is_contiguous()
    assert evaluate(m, digits, proto).accuracy > 0.1


def test_default_execution_on_this_machine():
    ex = get_protocol("proxy").execution()
    # the search's inputs (at most 16 px) run float32, contiguous everywhere (launch-bound on a GPU)
    assert ex.amp_dtype is None and not ex.channels_last
    assert ex.device == ("cuda" if torch.cuda.is_available() else "cpu")
    big = get_protocol("proxy", resolution=64).execution()
    if torch.cuda.is_available():
        assert big.amp_dtype is not None and big.channels_last
    else:
        assert big.amp_dtype is None and not big.channels_last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_evaluation_and_step_timing(digits):
    from recommender.train import step_seconds

    # 6 epochs: TinyCNN reaches 66% on digits after 6 (40% after 3) on the CPU and on an H200
    # alike, fp32, bf16 and fp16.
    proto = SMOKE.replace(device="cuda", epochs=6)
    seed_everything(0)
    m = TinyCNN()
    r = train_model(m, digits, proto)
    assert r.ok, r.reason
    assert next(m.parameters()).device.type == "cpu"  # handed back on the CPU
    ev = evaluate(m, digits, proto)
    assert ev.accuracy > 0.5
    logits = teacher_logits(m, digits, proto)
    assert logits.device.type == "cpu" and torch.isfinite(logits).all()
    assert 0 < step_seconds(TinyCNN(), digits, proto) < 5
    # fp16 with loss scaling, and bf16 + channels_last (``auto`` above 32 px)
    seed_everything(0)
    r16 = train_model(TinyCNN(), digits, proto.replace(precision="fp16"))
    assert r16.ok, r16.reason
    rbf = train_model(TinyCNN(), digits, proto.replace(precision="bf16", channels_last="on"))
    assert rbf.ok, rbf.reason


def test_recovery_distills_from_the_teacher_by_its_own_weight(digits, trained_tiny):
    """Recovery after pruning uses ``recovery_distill_alpha`` (on by default), independent of
    ``distill_alpha`` (training from scratch, off by default)."""
    import copy

    model = trained_tiny[0]
    assert SMOKE.distill_alpha == 0.0 and SMOKE.recovery_distill_alpha > 0
    logits = teacher_logits(model, digits, SMOKE)
    out = {}
    for alpha in (0.0, 1.0):
        m = copy.deepcopy(model)
        ft = finetune_fn(digits, SMOKE.replace(recovery_distill_alpha=alpha), logits)
        out[alpha] = ft(m, 3)
    assert np.isfinite(out[0.0]) and np.isfinite(out[1.0])
    assert out[0.0] != out[1.0]  # the distillation term changes the loss that is optimised


def test_pruning_rounds_after_channels_last_training(digits):
    """A fine-tune between global pruning rounds hands the model back with its pruned weights
    recomputed from the trained ``weight_orig``, in the default memory format (after a
    channels_last run the stale ``weight`` broke the next round)."""
    from torch.nn.utils import prune as tprune

    from recommender.compress.prune import unstructured_prune

    proto = SMOKE.replace(channels_last="on")
    seed_everything(0)
    _, report = unstructured_prune(TinyCNN(), 0.6, step=0.3, finetune=finetune_fn(digits, proto),
                                   finetune_steps=2)
    assert len(report.rounds) > 1 and report.rounds[-1] == pytest.approx(0.6, abs=0.01)

    m = TinyCNN()
    conv = m.features[3]
    tprune.l1_unstructured(conv, "weight", amount=0.5)
    finetune_fn(digits, proto)(m, 2)
    assert conv.weight.is_contiguous()
    assert torch.equal(conv.weight, conv.weight_orig * conv.weight_mask)  # not one step stale


# --- block-wise (stage) distillation ------------------------------------------------------------

STAGES = ("features.2", "features.5")  # TinyCNN's two ReLU outputs: 16 ch at 8 px, 32 ch at 4 px


def test_stage_features_and_matcher(digits, trained_tiny):
    from recommender.feature_distill import StageMatcher, has_stages
    from recommender.train import teacher_features

    teacher, _ = trained_tiny
    proto = SMOKE.replace(feature_distill_alpha=1.0, feature_distill_pool=2)
    feats = teacher_features(teacher, digits, proto, STAGES)
    assert [tuple(f.shape) for f in feats] == [(proto.train_size, 16, 2, 2), (proto.train_size, 32, 2, 2)]
    assert not teacher._forward_hooks and not teacher.features[2]._forward_hooks  # hooks removed
    student = TinyCNN(width=8)
    assert has_stages(student, STAGES) and not has_stages(student, ("layer1",))
    x = next(iter(digits.subset(proto.train_size).train_batches(8, 8, shuffle=False)))[0]
    bn = student.features[1].running_mean.clone()
    m = StageMatcher(student, STAGES, [16, 32], 2, x[:2])
    assert torch.equal(bn, student.features[1].running_mean)  # the probe leaves BN statistics alone
    assert [a.in_channels for a in m.adapters] == [8, 16] and [a.out_channels for a in m.adapters] == [16, 32]
    student(x)
    loss = m.loss([f[:8] for f in feats])
    assert 0.0 < float(loss.detach()) <= 4.0  # squared distance of unit vectors
    loss.backward()
    assert student.features[0].weight.grad is not None and m.adapters[0].weight.grad is not None
    m.remove()
    assert not student.features[2]._forward_hooks


def test_blockwise_distillation_pulls_stages_towards_the_teacher(digits, trained_tiny):
    """Training with the stage term makes the student's stages closer to the teacher's than
    training without it, and changes nothing when the model lacks the stages."""
    from recommender.feature_distill import StageMatcher
    from recommender.train import teacher_features

    teacher, _ = trained_tiny
    on = SMOKE.replace(feature_distill_alpha=5.0, epochs=3, lr=0.1)
    feats = teacher_features(teacher, digits, on, STAGES)
    distances = {}
    for name, proto in (("on", on), ("off", on.replace(feature_distill_alpha=0.0))):
        seed_everything(3)
        student = TinyCNN(width=8)
        assert train_model(student, digits, proto, teacher_features=feats, stages=STAGES).ok
        assert not student.features[2]._forward_hooks
        # how well the best linear map of the student's stages fits the teacher's: a fresh
        # adapter fitted for a few steps on frozen students, the same for both
        x = next(iter(digits.subset(on.train_size).train_batches(256, 8, shuffle=False)))[0]
        torch.manual_seed(0)
        m = StageMatcher(student, STAGES, [16, 32], 2, x[:2])
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        with torch.no_grad():
            student.eval()(x)
        for _ in range(60):
            opt.zero_grad()
            loss = m.loss([f[:256] for f in feats])
            loss.backward()
            opt.step()
        distances[name] = float(loss.detach())
        m.remove()
    assert distances["on"] < distances["off"], distances
    seed_everything(3)
    a, b = TinyCNN(width=8), TinyCNN(width=8)
    b.load_state_dict(a.state_dict())
    train_model(a, digits, on.replace(epochs=1), teacher_features=feats, stages=("layer1",))
    train_model(b, digits, on.replace(epochs=1, feature_distill_alpha=0.0))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_training_far_slower_than_its_estimate_is_said(digits, monkeypatch):
    """The baseline's pace is estimated from timed steps before it trains; a training that takes
    SLOW_FACTOR times that says so in the log (another process on the CPUs)."""
    import recommender.evaluation as evaluation
    from recommender.evaluation import Evaluator, pace_note
    from recommender.models import register_module

    assert pace_note("x", 10.0, 5.0) is None and "2.0x" not in (pace_note("x", 10.0, 5.0) or "")
    assert "4.0x its estimate" in pace_note("baseline", 40.0, 10.0)
    monkeypatch.setattr(evaluation, "step_seconds", lambda *a, **k: 1e-6)  # an estimate no training can meet
    lines: list[str] = []
    ev = Evaluator(register_module(TinyCNN()), digits, SMOKE, latency=False, log=lines.append)
    ev.evaluate_baseline()
    assert any("its estimate from timed steps" in ln for ln in lines), lines
