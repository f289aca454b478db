"""Quantization behind a small backend interface.

``apply_quantization(model, cfg, *, calibration, example_input=None) -> (model, QuantReport)``

Backends (``get_backend(scheme, engine)``; register more with ``register_backend``):

- ``fp32``: nothing.
- ``int8-static``: post-training static int8 with FX graph mode (``prepare_fx`` /
  ``convert_fx``, ``get_default_qconfig_mapping(engine)``), engine ``x86`` or ``qnnpack``
  (``torch.backends.quantized.engine``; the converted model sets it again before each forward
  because packed weights only run on the engine that packed them). FX fuses conv + BN (+ ReLU).
  Calibration runs ``cfg.calibration_batches`` batches through the observed model.
  Options (:class:`Int8StaticConfig`): the activation observer (``histogram``, ``minmax``,
  ``moving-average``, ``percentile``), per-channel or per-tensor weights, ``keep_float`` (the k
  layers most sensitive to int8 stay float: mixed precision, ranked by
  :mod:`recommender.compress.quant_sensitivity`) and ``qat_epochs`` (a short quantization-aware
  fine-tune with ``prepare_qat_fx`` before conversion instead of post-training calibration).
  Where a part cannot be quantized it stays float and the report says so:
    1. FX traces the whole model; if tracing fails, the submodules that FX cannot trace (data-
       dependent control flow, e.g. the resizing test in DiCE) are found and passed as
       ``non_traceable_module_names``; they stay float as a whole, or, in a second pass, their
       own traceable children are quantized one by one (``per-submodule``);
    2. after conversion the model must run: a module whose quantized kernel fails on this engine
       gets ``qconfig None`` (stays float) and conversion is redone;
    3. if nothing works the float model is returned with ``applied=False`` and the reason.
- ``int8-dynamic``: ``quantize_dynamic`` on ``nn.Linear`` (weights int8, activations quantized
  on the fly). Convolutions stay float: the report lists them.
- ``fp16``: half-precision weights and activations, wrapped so that the model still takes and
  returns float32 tensors. CPU half-precision convolution is usually *slower* than float32; the
  benchmark measures it rather than assuming a gain.

int8 changes size and latency, not the multiply-accumulate count: measure FLOPs on the float
model (``recommender.measure.count_flops(q, float_model=f)``).

The model passed in is never modified.
"""

from __future__ import annotations

import abc
import contextlib
import time
import warnings
import math
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from ..measure import safe_deepcopy, size_mb
from ..errors import RecommenderError
from .methods import (CompressContext, MethodConfig, StructureCosts, check_fraction, check_int, list_methods,
                      register_method)

__all__ = [
    "QuantReport",
    "QuantBackend",
    "register_backend",
    "get_backend",
    "list_backends",
    "apply_quantization",
    "Fp16Model",
    "quiet_quantization_warnings",
    "Fp32Config",
    "Fp16Config",
    "Int8DynamicConfig",
    "Int8StaticConfig",
    "PercentileObserver",
    "int8_qconfig",
    "int8_qconfig_mapping",
]

Calibration = Iterable[Any]


# --------------------------------------------------------------------------------------------
# warnings


# The quantized cat kernel also warns at *inference* time whenever its inputs have different
# scales (it requantizes them, which is correct): a performance note. A library installs no global
# filter at import; the ``recommend`` command silences it (``INFERENCE_WARNINGS``).
INFERENCE_WARNINGS = (r"All inputs of this cat operator must share the same quantization",)


@contextlib.contextmanager
def quiet_quantization_warnings() -> Iterator[None]:
    """Silence the deprecation notices of ``torch.ao.quantization`` (and only those)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max", category=UserWarning)
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning
        )
        warnings.filterwarnings("ignore", message=r".*_aminmax.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        warnings.filterwarnings("ignore", message=r"All inputs of this cat operator must share the same quantization")
        yield


# --------------------------------------------------------------------------------------------
# report


@dataclass
class QuantReport:
    """What quantization did. Sizes in MB (bytes / 1024**2) of the serialised state dict.

    ``mode``: ``none``, ``fx`` (whole model), ``fx-partial`` (some modules left float),
    ``per-submodule`` (FX could not trace the model; parts quantized separately), ``dynamic``,
    ``fp16``, or ``fp32-fallback`` (quantization failed; model returned in float).
    ``float_modules``: module name -> why it stays float (``keep_float`` layers included).
    ``qat_steps``: optimiser steps of quantization-aware fine-tuning (0: post-training).
    """

    scheme: str
    engine: str | None = None
    applied: bool = False
    mode: str = "none"
    calibration_batches: int = 0
    size_mb_before: float = 0.0
    size_mb_after: float = 0.0
    float_modules: dict[str, str] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0
    qat_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# backend interface


class QuantBackend(abc.ABC):
    """prepare -> calibrate -> convert. Each backend fills in ``self.report``."""

    name: str = ""

    def __init__(self, engine: str | None = None) -> None:
        self.engine = engine
        self.report = QuantReport(scheme=self.name, engine=engine)

    @abc.abstractmethod
    def prepare(self, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
        """Return a model ready for calibration (a copy; the input is not modified)."""

    def calibrate(self, prepared: nn.Module, batches: Iterable[torch.Tensor]) -> int:
        """Run batches through the prepared model; returns how many were used."""
        return 0

    @abc.abstractmethod
    def convert(self, prepared: nn.Module) -> nn.Module:
        """Return the deployable model."""


_BACKENDS: dict[str, Callable[[str | None], QuantBackend]] = {}


def register_backend(name: str) -> Callable[[type[QuantBackend]], type[QuantBackend]]:
    """Class decorator: the backend that implements quantization method ``name``."""
    def deco(cls: type[QuantBackend]) -> type[QuantBackend]:
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return deco


def list_backends() -> list[str]:
    """The registered quantization methods (``fp32``, ``fp16``, ``int8-dynamic``, ``int8-static``)."""
    return sorted(list_methods("quant"))


def get_backend(name: str, engine: str | None = None) -> QuantBackend:
    from ..errors import UnknownNameError

    if name not in _BACKENDS:
        raise UnknownNameError("quantization scheme", name, list_backends())
    return _BACKENDS[name](engine)


def _inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


# --------------------------------------------------------------------------------------------
# fp32 / fp16


@register_backend("fp32")
class Fp32Backend(QuantBackend):
    def prepare(self, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
        return model

    def convert(self, prepared: nn.Module) -> nn.Module:
        self.report.mode = "none"
        return prepared


class Fp16Model(nn.Module):
    """Half-precision model that takes and returns float32 (casts at the boundaries)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32
        for p in self.model.parameters():
            dtype = p.dtype
            break
        out = self.model(x.to(dtype))
        return out.float() if isinstance(out, torch.Tensor) else out


@register_backend("fp16")
class Fp16Backend(QuantBackend):
    def prepare(self, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
        return safe_deepcopy(model).eval()

    def convert(self, prepared: nn.Module) -> nn.Module:
        self.report.mode = "fp16"
        self.report.applied = True
        self.report.note = "weights and activations in float16; CPU fp16 convolutions are often slower than fp32"
        return Fp16Model(prepared.half()).eval()


# --------------------------------------------------------------------------------------------
# int8


class _SetEngine:
    """Forward pre-hook: packed int8 weights only run on the engine that packed them."""

    def __init__(self, engine: str):
        self.engine = engine

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.backends.quantized.engine != self.engine:
            torch.backends.quantized.engine = self.engine


@contextlib.contextmanager
def _engine(engine: str) -> Iterator[None]:
    if engine not in torch.backends.quantized.supported_engines:
        from ..errors import RecommenderError

        raise RecommenderError(
            f"quantization engine {engine!r} is not available in this PyTorch build; "
            f"available: {', '.join(torch.backends.quantized.supported_engines)}"
        )
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def _float_leaves(model: nn.Module) -> dict[str, str]:
    """Float conv/linear modules left in a (partly) converted model."""
    out = {}
    for n, m in model.named_modules():
        if type(m) in (nn.Conv2d, nn.Linear, nn.Conv1d, nn.Conv3d):
            out[n] = "kept in float"
    return out


def _fx_traceable(module: nn.Module) -> bool:
    from torch.ao.quantization.fx.tracer import QuantizationTracer

    if type(module).__module__.startswith("torch.") and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    ):
        return True  # a standard leaf module: FX does not trace into it

    tracer = QuantizationTracer(skipped_module_names=[], skipped_module_classes=[])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tracer.trace(module)
        return True
    except Exception:
        return False


def _untraceable(model: nn.Module, prefix: str = "") -> list[str]:
    """Deepest submodules whose own forward FX cannot trace (their children all trace)."""
    if _fx_traceable(model):
        return []
    bad: list[str] = []
    for name, child in model.named_children():
        bad.extend(_untraceable(child, f"{prefix}{name}."))
    if not bad and prefix:
        return [prefix[:-1]]
    if not bad:  # the root's own forward is the problem
        return [""]
    # the root may still fail because of its own code: check with the bad children as leaves
    return bad


#: Weight of a new calibration batch in the ``moving-average`` observer's running min/max (PyTorch's
#: default, 0.01, is meant for thousands of QAT steps; with 8 calibration batches it would keep
#: mostly the first batch's range).
MOVING_AVERAGE_CONSTANT = 0.1
#: The ``percentile`` observer's range: the [100 - p, p] percentiles of each activation tensor.
ACTIVATION_PERCENTILE = 99.99


class PercentileObserver(torch.ao.quantization.observer.MinMaxObserver):
    """Activation observer whose range is the mean over calibration batches of each batch's
    ``[100 - percentile, percentile]`` percentiles (outliers clipped, unlike min-max; a cheap
    stand-in for the histogram observer's clipping search).

    Args:
        percentile: upper percentile in percent (the lower one is ``100 - percentile``).
        max_samples: values read per batch (an evenly spaced subsample above it: ``torch.quantile``
            sorts, and caps its input at 16M elements).
        **kwargs: as :class:`torch.ao.quantization.observer.MinMaxObserver` (dtype, reduce_range, ...).
    """

    def __init__(self, percentile: float = ACTIVATION_PERCENTILE, max_samples: int = 1 << 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.percentile = float(percentile)
        self.max_samples = int(max_samples)
        self.register_buffer("batches_seen", torch.tensor(0))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float().flatten()
        if x.numel() > self.max_samples:
            x = x[torch.linspace(0, x.numel() - 1, self.max_samples).long()]
        q = torch.quantile(x, torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0]))
        n = int(self.batches_seen)
        lo, hi = (q[0], q[1]) if n == 0 else ((self.min_val * n + q[0]) / (n + 1), (self.max_val * n + q[1]) / (n + 1))
        self.min_val.resize_(lo.shape).copy_(lo)
        self.max_val.resize_(hi.shape).copy_(hi)
        self.batches_seen += 1
        return x_orig


def _activation_observer(name: str, **kwargs: Any) -> Any:
    """The observer class (with its arguments) for activation observer ``name``."""
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

    if name == "histogram":
        return HistogramObserver.with_args(**kwargs)
    if name == "minmax":
        return MinMaxObserver.with_args(**kwargs)
    if name == "moving-average":
        return MovingAverageMinMaxObserver.with_args(averaging_constant=MOVING_AVERAGE_CONSTANT, **kwargs)
    if name == "percentile":
        return PercentileObserver.with_args(**kwargs)
    raise RecommenderError(f"unknown activation observer {name!r}; valid: {', '.join(QUANT_OBSERVERS)}")


def _swap_qconfig(qc: Any, observer: str, per_channel: bool) -> Any:
    """``qc`` with its histogram activation observer replaced by ``observer`` (same arguments) and,
    unless ``per_channel``, its per-channel weight observer by a per-tensor symmetric one."""
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver, default_weight_observer

    if qc is None:
        return None
    act, weight = qc.activation, qc.weight
    if observer != "histogram" and getattr(getattr(act, "p", None), "func", None) is HistogramObserver:
        act = _activation_observer(observer, **act.p.keywords)
    if not per_channel and getattr(getattr(weight, "p", None), "func", None) is PerChannelMinMaxObserver:
        weight = default_weight_observer
    if act is qc.activation and weight is qc.weight:
        return qc  # untouched: the default mapping stays exactly PyTorch's
    return QConfig(activation=act, weight=weight)


def int8_qconfig_mapping(engine: str = "x86", observer: str = "histogram", per_channel: bool = True,
                         keep_float: Iterable[str] = ()) -> Any:
    """PyTorch's default static-int8 ``QConfigMapping`` for ``engine`` with the activation
    ``observer`` and per-channel or per-tensor weights; the modules named in ``keep_float`` get
    ``qconfig None`` (they stay float)."""
    from torch.ao.quantization import get_default_qconfig_mapping

    qm = get_default_qconfig_mapping(engine)
    qm.global_qconfig = _swap_qconfig(qm.global_qconfig, observer, per_channel)
    for k in list(qm.object_type_qconfigs):
        qm.object_type_qconfigs[k] = _swap_qconfig(qm.object_type_qconfigs[k], observer, per_channel)
    for name in keep_float:
        qm = qm.set_module_name(name, None)
    return qm


def int8_qconfig(engine: str = "x86", observer: str = "histogram", per_channel: bool = True) -> Any:
    """The ``QConfig`` that :func:`int8_qconfig_mapping` gives a convolution or linear layer."""
    from torch.ao.quantization import get_default_qconfig

    return _swap_qconfig(get_default_qconfig(engine), observer, per_channel)


def _qat_qconfig_mapping(engine: str, per_channel: bool, keep_float: Iterable[str]) -> Any:
    """PyTorch's default QAT mapping for ``engine`` (moving-average fake quantization), with
    per-tensor weight fake-quantization unless ``per_channel``."""
    from torch.ao.quantization import QConfig, get_default_qat_qconfig_mapping
    from torch.ao.quantization.fake_quantize import default_fused_per_channel_wt_fake_quant, default_fused_wt_fake_quant

    qm = get_default_qat_qconfig_mapping(engine)

    def swap(qc: Any) -> Any:
        if qc is None or per_channel or qc.weight is not default_fused_per_channel_wt_fake_quant:
            return qc
        return QConfig(activation=qc.activation, weight=default_fused_wt_fake_quant)

    qm.global_qconfig = swap(qm.global_qconfig)
    for k in list(qm.object_type_qconfigs):
        qm.object_type_qconfigs[k] = swap(qm.object_type_qconfigs[k])
    for name in keep_float:
        qm = qm.set_module_name(name, None)
    return qm


@register_backend("int8-static")
class FxStaticBackend(QuantBackend):
    """Post-training static int8 with FX graph mode."""

    def __init__(self, engine: str | None = None, observer: str = "histogram", per_channel: bool = True) -> None:
        super().__init__(engine or "x86")
        self.observer = observer
        self.per_channel = per_channel
        self.skip: dict[str, str] = {}
        self.non_traceable: list[str] = []
        self._float: nn.Module | None = None
        self._example: torch.Tensor | None = None

    def _qconfig_mapping(self) -> Any:
        return int8_qconfig_mapping(self.engine, self.observer, self.per_channel, keep_float=self.skip)

    def prepare(self, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
        from torch.ao.quantization.quantize_fx import prepare_fx

        self._float = model
        self._example = example_input
        m = safe_deepcopy(model).eval()
        cfg = PrepareCustomConfig()
        if self.non_traceable:
            cfg.set_non_traceable_module_names(list(self.non_traceable))
        with quiet_quantization_warnings(), _engine(self.engine):
            return prepare_fx(m, self._qconfig_mapping(), (example_input,), prepare_custom_config=cfg)

    def calibrate(self, prepared: nn.Module, batches: Iterable[torch.Tensor]) -> int:
        used = 0
        with quiet_quantization_warnings(), _engine(self.engine), torch.no_grad():
            for b in batches:
                prepared(_inputs(b))
                used += 1
        return used

    def convert(self, prepared: nn.Module) -> nn.Module:
        from torch.ao.quantization.quantize_fx import convert_fx

        with quiet_quantization_warnings(), _engine(self.engine):
            q = convert_fx(prepared)
        q.register_forward_pre_hook(_SetEngine(self.engine))
        q._quant_engine = self.engine  # type: ignore[attr-defined]
        return q


@register_backend("int8-dynamic")
class DynamicBackend(QuantBackend):
    """int8 weights for nn.Linear, activations quantized on the fly; convs stay float."""

    def __init__(self, engine: str | None = None) -> None:
        super().__init__(engine or "x86")

    def prepare(self, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
        return safe_deepcopy(model).eval()

    def convert(self, prepared: nn.Module) -> nn.Module:
        from torch.ao.quantization import quantize_dynamic

        with quiet_quantization_warnings(), _engine(self.engine):
            q = quantize_dynamic(prepared, {nn.Linear}, dtype=torch.qint8)
        q.register_forward_pre_hook(_SetEngine(self.engine))
        n_lin = sum(1 for m in prepared.modules() if type(m) is nn.Linear)
        self.report.mode = "dynamic"
        self.report.applied = n_lin > 0
        self.report.float_modules = {
            n: "dynamic quantization covers nn.Linear only" for n, m in q.named_modules() if type(m) is nn.Conv2d
        }
        if n_lin == 0:
            self.report.note = "no nn.Linear layer: dynamic int8 changes nothing"
        return q


# --------------------------------------------------------------------------------------------
# the int8-static driver with fallbacks


def _runs(model: nn.Module, x: torch.Tensor, ref_shape: tuple[int, ...]) -> tuple[bool, str, str | None]:
    """(ok, error message, name of the leaf module that raised or None)."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    failing: list[str] = []

    def pre(m: nn.Module, a: Any) -> None:
        stack.append(names.get(m, "?"))

    def post(m: nn.Module, a: Any, o: Any) -> None:
        if stack:
            stack.pop()

    hooks = []
    for m in model.modules():
        if len(list(m.children())) == 0:
            hooks.append(m.register_forward_pre_hook(pre))
            hooks.append(m.register_forward_hook(post))
    try:
        with quiet_quantization_warnings(), torch.no_grad():
            out = model(x)
        if tuple(out.shape) != ref_shape:
            return False, f"output shape {tuple(out.shape)} != {ref_shape}", None
        if not torch.isfinite(out).all():
            return False, "non-finite output", None
        return True, "", None
    except Exception as exc:
        if stack:
            failing.append(stack[-1])
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", (failing or [None])[0]
    finally:
        for h in hooks:
            h.remove()


def _keep_float(model: nn.Module, cfg: "Int8StaticConfig", ranking: tuple[str, ...] | None,
                labelled: list[Any]) -> tuple[dict[str, str], str]:
    """The ``cfg.keep_float`` most sensitive quantizable layers of ``model`` (name -> reason) and a
    note. ``ranking`` (most sensitive first, computed once per study on the trained baseline) is
    used where it names the model's layers; without one the sensitivity is measured here on
    ``labelled`` (the calibration batches)."""
    if cfg.keep_float <= 0:
        return {}, ""
    from .quant_sensitivity import measure_quant_sensitivity, quantizable_layers

    present = quantizable_layers(model)
    note = ""
    if ranking is None or not any(n in ranking for n in present):
        sens = measure_quant_sensitivity(model, labelled, engine=cfg.engine, observer=cfg.observer,
                                         per_channel=cfg.per_channel)
        ranking = sens.ranking()
        note = (f"int8 sensitivity measured on this model ({sens.method}, {len(sens.layers)} layers, "
                f"{sens.seconds:.1f} s)")
    ordered = [n for n in ranking if n in set(present)]
    return ({n: f"kept in float: the {_ordinal(i + 1)} most int8-sensitive layer (keep_float={cfg.keep_float})"
             for i, n in enumerate(ordered[:cfg.keep_float])}, note)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


#: Quantization-aware fine-tuning uses the BatchNorm statistics of the trained model (frozen):
#: a few hundred steps at a small batch would only add noise to them.
QAT_FREEZE_BN = True


def _qat_int8(model: nn.Module, cfg: "Int8StaticConfig", batches: list[torch.Tensor], example_input: torch.Tensor,
              keep: dict[str, str], finetune: Callable[..., Any], steps: int, *, freeze_bn: bool = QAT_FREEZE_BN
              ) -> nn.Module:
    """Quantization-aware fine-tune (``prepare_qat_fx``: fake-quantized conv-BN and activations)
    for ``steps`` optimiser steps of ``finetune``, the fake-quant ranges first set on the
    calibration ``batches``, then ``convert_fx``. Raises when FX cannot prepare the model."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    m = safe_deepcopy(model).train()
    try:
        with quiet_quantization_warnings(), _engine(cfg.engine):
            prepared = prepare_qat_fx(m, _qat_qconfig_mapping(cfg.engine, cfg.per_channel, keep), (example_input,))
    except Exception as exc:
        raise _QatUnavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}") from None
    if freeze_bn:
        prepared.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    prepared.eval()  # ranges from clean calibration images (fake quantization observes in eval mode too)
    with quiet_quantization_warnings(), _engine(cfg.engine), torch.no_grad():
        for b in batches:
            prepared(b)
    with quiet_quantization_warnings():
        finetune(prepared, steps)
    prepared.eval()
    with quiet_quantization_warnings(), _engine(cfg.engine):
        q = convert_fx(prepared)
    q.register_forward_pre_hook(_SetEngine(cfg.engine))
    q._quant_engine = cfg.engine  # type: ignore[attr-defined]
    return q


class _QatUnavailable(Exception):
    """FX cannot prepare the model for quantization-aware training (post-training instead)."""


def _static_int8(
    model: nn.Module, cfg: "Int8StaticConfig", batches: list[torch.Tensor], example_input: torch.Tensor, *,
    ranking: tuple[str, ...] | None = None, labelled: list[Any] | None = None,
    finetune: Callable[..., Any] | None = None, steps_per_epoch: int = 0,
) -> tuple[nn.Module, QuantReport]:
    report = QuantReport(scheme="int8-static", engine=cfg.engine)
    with torch.no_grad():
        ref_shape = tuple(safe_deepcopy(model).eval()(example_input).shape)
    backend = FxStaticBackend(cfg.engine, cfg.observer, cfg.per_channel)
    problems: list[str] = []
    keep, keep_note = _keep_float(model, cfg, ranking, labelled if labelled is not None else batches)
    backend.skip.update(keep)
    if keep_note:
        problems.append(keep_note)
    qat_steps = 0
    if cfg.qat_epochs > 0:
        if finetune is None or steps_per_epoch <= 0:
            problems.append("quantization-aware fine-tuning skipped (no fine-tune callback or epoch size given): "
                            "post-training quantization")
        else:
            qat_steps = max(1, math.ceil(cfg.qat_epochs * steps_per_epoch))
    # an exception of the fine-tune itself (the trial's time limit) ends the candidate, it is not a
    # quantization problem to fall back from
    finetune_errors: list[BaseException] = []

    def guarded_finetune(m: nn.Module, steps: int) -> Any:
        try:
            return finetune(m, steps)  # type: ignore[misc]
        except BaseException as exc:
            finetune_errors.append(exc)
            raise

    def run_once() -> nn.Module:
        nonlocal qat_steps
        if qat_steps and not backend.non_traceable:
            try:
                q = _qat_int8(model, cfg, batches, example_input, dict(backend.skip), guarded_finetune, qat_steps)
                report.calibration_batches = len(batches)
                report.qat_steps = qat_steps
                return q
            except _QatUnavailable as exc:
                problems.append(f"quantization-aware fine-tuning unavailable ({exc}): post-training quantization")
                qat_steps = 0
        prepared = backend.prepare(model, example_input)
        report.calibration_batches = backend.calibrate(prepared, batches)
        return backend.convert(prepared)

    # 1. trace problems -> non-traceable modules stay float
    try:
        with quiet_quantization_warnings():
            q = run_once()
    except Exception as exc:
        if finetune_errors:
            raise
        problems.append(f"FX on the whole model: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        untraceable = _untraceable(safe_deepcopy(model).eval())
        if "" in untraceable:  # the root's own forward: quantize its children one by one
            backend.non_traceable = [""]
            q = safe_deepcopy(model).eval()
            report.applied = True
            report.mode = "per-submodule"
            report.float_modules = {"": "FX cannot trace the model's own forward: children quantized separately"}
            q = _quantize_children(q, [""], cfg, batches, example_input, report)
            report.float_modules.update({n: r for n, r in _float_leaves(q).items() if n not in report.float_modules})
            report.note = "; ".join(problems)
            return q, report
        backend.non_traceable = [n for n in untraceable if n]
        try:
            q = run_once()
        except Exception as exc2:
            problems.append(f"FX with non-traceable modules: {type(exc2).__name__}: {str(exc2).splitlines()[0][:200]}")
            q = None
    # 2. kernels that fail at run time -> that module stays float
    for _ in range(8):
        if q is None:
            break
        ok, err, bad = _runs(q, example_input, ref_shape)
        if ok:
            break
        problems.append(f"quantized model failed to run: {err}")
        if bad is None or bad in backend.skip:
            q = None
            break
        backend.skip[bad] = f"quantized kernel failed on engine {cfg.engine}: {err[:120]}"
        try:
            q = run_once()
        except Exception as exc:
            if finetune_errors:
                raise
            problems.append(f"{type(exc).__name__}: {exc}")
            q = None
    if q is None:
        report.mode = "fp32-fallback"
        report.applied = False
        report.note = "int8 static quantization failed, model kept in float32: " + "; ".join(problems)
        return safe_deepcopy(model), report

    report.applied = True
    floats = {n: r for n, r in backend.skip.items()}
    for n in backend.non_traceable:
        floats[n] = "FX cannot trace this module (data-dependent control flow): kept in float"
    for n, r in _float_leaves(q).items():
        if not any(n.startswith(k + ".") for k in floats):  # the conv inside a float fused ConvReLU2d
            floats.setdefault(n, r)
    report.float_modules = floats
    report.mode = "fx" if not floats else ("fx-partial" if not backend.non_traceable else "per-submodule")
    if backend.non_traceable:
        q = _quantize_children(q, backend.non_traceable, cfg, batches, example_input, report)
    if problems:
        report.note = "; ".join(problems)
    return q, report


def _quantize_children(
    q: nn.Module, names: list[str], cfg: "Int8StaticConfig", batches: list[torch.Tensor], example_input: torch.Tensor,
    report: QuantReport,
) -> nn.Module:
    """Quantize the traceable children of non-traceable modules one by one (each gets its own
    quantize/dequantize boundary). Children's inputs come from recording a float forward."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    mods = dict(q.named_modules())
    targets: list[tuple[nn.Module, str, str, nn.Module]] = []
    for parent_name in names:
        parent = mods.get(parent_name)
        if parent is None:
            continue
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not any(isinstance(c, (nn.Conv2d, nn.Linear)) for c in child.modules()):
                continue
            if _fx_traceable(child):
                targets.append((parent, child_name, full, child))
    # record every target child's inputs over the calibration batches in one pass
    seen: dict[int, list[torch.Tensor]] = {id(c): [] for *_, c in targets}

    def record(m: nn.Module, a: Any) -> None:
        if len(a) == 1 and isinstance(a[0], torch.Tensor):
            seen[id(m)].append(a[0].detach().clone())

    hooks = [c.register_forward_pre_hook(record) for *_, c in targets]
    try:
        with quiet_quantization_warnings(), torch.no_grad():
            for b in batches:
                q(_inputs(b))
    finally:
        for h in hooks:
            h.remove()
    done_parents: set[str] = set()
    for parent, child_name, full, child in targets:
        inputs = seen[id(child)]
        if not inputs:
            continue
        try:
            with quiet_quantization_warnings(), _engine(cfg.engine):
                inside = [n[len(full) + 1:] for n in report.float_modules if n.startswith(full + ".")
                          and "keep_float" in report.float_modules[n]]
                qm = int8_qconfig_mapping(cfg.engine, cfg.observer, cfg.per_channel, keep_float=inside)
                p = prepare_fx(safe_deepcopy(child).eval(), qm, (inputs[0],))
                with torch.no_grad():
                    for t in inputs:
                        p(t)
                qc = convert_fx(p)
                with torch.no_grad():
                    qc(inputs[0])
        except Exception:
            continue
        setattr(parent, child_name, qc)
        for n in list(report.float_modules):
            if n == full or n.startswith(full + "."):
                del report.float_modules[n]
        done_parents.add(full.rsplit(".", 1)[0] if "." in full else "")
    for parent_name in done_parents:
        report.float_modules[parent_name] = (
            "FX cannot trace its forward (data-dependent control flow): its conv/linear children "
            "are quantized one by one, the ops between them stay float"
        )
    return q


# --------------------------------------------------------------------------------------------
# configs, registration and entry point

QUANT_ENGINES = ("x86", "qnnpack")
QUANT_OBSERVERS = ("histogram", "minmax", "moving-average", "percentile")


#: Most quantization-aware fine-tuning epochs a config accepts (it is a short recovery, not a training).
MAX_QAT_EPOCHS = 20.0


def repack_weights(model: nn.Module, engine: str) -> nn.Module:
    """Pack every quantized conv/linear weight of ``model`` again, in place, under ``engine``
    (outputs identical; milliseconds).

    An x86 int8 conv keeps what its first call at an input shape set up, the thread count
    included: a 1x1 conv first called at batch 1 on 2 threads ran 12 ms per call on 1 thread
    against 0.09 ms when first called on 1 thread. Packed again, the next call sets it up afresh;
    :func:`recommender.compress.pipeline.compress` does it once quantization is over and
    :func:`recommender.measure.latency_stats` before it times a model."""
    with _engine(engine), torch.no_grad():
        for m in model.modules():
            if callable(getattr(m, "set_weight_bias", None)) and callable(getattr(m, "weight", None)) \
                    and callable(getattr(m, "bias", None)):
                m.set_weight_bias(m.weight(), m.bias())
    return model


def _check_engine(engine: str) -> None:
    if engine not in QUANT_ENGINES:
        raise RecommenderError(f"unknown quantization engine {engine!r}; valid: {', '.join(QUANT_ENGINES)}")


@dataclass(frozen=True)
class Fp32Config(MethodConfig):
    """No quantization (float32)."""

    def describe(self) -> str:
        return "fp32"


@dataclass(frozen=True)
class Fp16Config(MethodConfig):
    """Half-precision weights and activations (the model still takes and returns float32)."""

    def describe(self) -> str:
        return "fp16"


@dataclass(frozen=True)
class Int8DynamicConfig(MethodConfig):
    """int8 weights of nn.Linear, activations quantized on the fly; convolutions stay float.

    Args:
        engine: int8 kernels: ``x86`` (servers, laptops) or ``qnnpack`` (ARM phones, boards).
    """

    engine: str = "x86"

    def __post_init__(self) -> None:
        _check_engine(self.engine)

    def describe(self) -> str:
        return f"int8-dynamic/{self.engine}"


@dataclass(frozen=True)
class Int8StaticConfig(MethodConfig):
    """Post-training static int8 (FX graph mode): conv, linear and activations.

    Args:
        engine: int8 kernels: ``x86`` or ``qnnpack``.
        calibration_batches: training batches observed to calibrate the activation ranges.
        observer: ``histogram`` (PyTorch's default, searches the clipping range; slow with
            hundreds of layers), ``minmax`` (fast, plain min/max range), ``moving-average``
            (running min/max, weight ``MOVING_AVERAGE_CONSTANT`` per batch) or ``percentile``
            (:class:`PercentileObserver`: outliers beyond the ``ACTIVATION_PERCENTILE`` clipped).
        per_channel: int8 weights with a scale per output channel (PyTorch's default); False: one
            scale per tensor.
        keep_float: this many quantizable layers stay float, the most int8-sensitive ones
            (mixed precision; the ranking comes from :mod:`recommender.compress.quant_sensitivity`,
            computed once per study on the trained baseline).
        qat_epochs: epochs (fractions allowed) of quantization-aware fine-tuning (fake-quantized
            forward, ``prepare_qat_fx``) before conversion, with the recovery fine-tune's optimiser
            and distillation; 0: post-training quantization.
    """

    engine: str = "x86"
    calibration_batches: int = 8
    observer: str = "histogram"
    per_channel: bool = True
    keep_float: int = 0
    qat_epochs: float = 0.0
    keyed_if_set: ClassVar[tuple[str, ...]] = ("per_channel", "keep_float", "qat_epochs")

    def __post_init__(self) -> None:
        _check_engine(self.engine)
        check_int("calibration_batches", self.calibration_batches, 1)
        if self.observer not in QUANT_OBSERVERS:
            raise RecommenderError(f"unknown activation observer {self.observer!r}; valid: {', '.join(QUANT_OBSERVERS)}")
        if not isinstance(self.per_channel, bool):
            raise RecommenderError(f"per_channel must be true or false, got {self.per_channel!r}")
        check_int("keep_float", self.keep_float, 0)
        check_fraction("qat_epochs", self.qat_epochs, 0.0, MAX_QAT_EPOCHS, hi_open=False)

    def batches_needed(self) -> int:
        return self.calibration_batches

    def describe(self) -> str:
        out = f"int8-static/{self.engine}"
        if self.observer in ("moving-average", "percentile"):  # the two older observers were never shown
            out += f" {self.observer}"
        if not self.per_channel:
            out += " per-tensor"
        if self.keep_float:
            out += f" +{self.keep_float} float"
        if self.qat_epochs:
            out += f" QAT {self.qat_epochs:g} ep"
        return out


def apply_quantization(
    model: nn.Module,
    cfg: MethodConfig,
    *,
    calibration: Calibration | None,
    example_input: torch.Tensor | None = None,
    ranking: tuple[str, ...] | None = None,
    finetune: Callable[..., Any] | None = None,
    steps_per_epoch: int = 0,
) -> tuple[nn.Module, QuantReport]:
    """Quantize a copy of ``model`` as ``cfg`` says; returns (model, report).

    ``calibration``: batches (tensors or (x, y) pairs); at most ``cfg.calibration_batches`` are
    used for ``int8-static``. ``example_input``: one input for tracing; defaults to the first
    calibration batch (or a random 1x3x32x32 tensor if there is none).
    ``ranking``: layer names, most int8-sensitive first (``keep_float``; measured here on the
    calibration batches when None). ``finetune(model, steps)`` and ``steps_per_epoch``: the
    quantization-aware fine-tune of ``qat_epochs`` (without them an int8 config with
    ``qat_epochs`` is quantized after training, and the report says so).
    """
    t0 = time.perf_counter()
    raw = list(islice(iter(calibration or []), max(cfg.batches_needed(), 0)))
    batches = [_inputs(b) for b in raw]
    if example_input is None:
        example_input = batches[0][:1] if batches else torch.randn(1, 3, 32, 32)
    before = size_mb(model)
    note = ""
    if isinstance(cfg, Int8StaticConfig):
        if not batches:
            batches = [torch.randn(8, *example_input.shape[1:])]
            note = "no calibration data given: calibrated on random normal input (activation ranges are guesses)"
        q, report = _static_int8(model, cfg, batches, example_input, ranking=ranking, labelled=raw,
                                 finetune=finetune, steps_per_epoch=steps_per_epoch)
    else:
        backend = get_backend(cfg.method, getattr(cfg, "engine", None))
        prepared = backend.prepare(model, example_input)
        backend.report.calibration_batches = backend.calibrate(prepared, batches)
        q = backend.convert(prepared)
        report = backend.report
        report.scheme = cfg.method
    q.eval()
    report.size_mb_before = before
    report.size_mb_after = size_mb(q)
    if note:
        report.note = (note + "; " + report.note).strip("; ")
    report.seconds = time.perf_counter() - t0
    return q, report


def _apply(model: nn.Module, cfg: MethodConfig, ctx: CompressContext) -> tuple[nn.Module, QuantReport]:
    return apply_quantization(model, cfg, calibration=ctx.batches, example_input=ctx.example_input,
                              ranking=ctx.quant_ranking, finetune=ctx.finetune, steps_per_epoch=ctx.steps_per_epoch)


def _linear_weight_mb(model: nn.Module) -> float:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if type(m) is nn.Linear) / 1024**2


def _scaled_size(factor: float) -> Callable[..., tuple[nn.Module, StructureCosts]]:
    def estimate(model: nn.Module, cfg: MethodConfig, costs: StructureCosts, ctx: CompressContext
                 ) -> tuple[nn.Module, StructureCosts]:
        # a lower bound: every float32 tensor shrinks by ``factor`` at best
        return model, StructureCosts(costs.params, costs.nonzero_params, costs.mflops, costs.size_mb * factor,
                                     costs.notes)

    return estimate


def _estimate_dynamic(model: nn.Module, cfg: MethodConfig, costs: StructureCosts, ctx: CompressContext
                      ) -> tuple[nn.Module, StructureCosts]:
    # only nn.Linear weights go to int8 (4 -> 1 byte)
    return model, StructureCosts(costs.params, costs.nonzero_params, costs.mflops,
                                 max(0.0, costs.size_mb - 0.75 * _linear_weight_mb(model)), costs.notes)


def _bn_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for p in (m.weight, m.bias) if p is not None)


def _estimate_static(model: nn.Module, cfg: MethodConfig, costs: StructureCosts, ctx: CompressContext
                     ) -> tuple[nn.Module, StructureCosts]:
    # a lower bound: every float32 tensor shrinks to a quarter at best, and conv-BN fusion removes
    # the BN parameters (a fused conv gains a bias, so fewer than these disappear). After a
    # pruning bound that scaled every parameter of the unpruned ``model`` alike, its BN share is
    # scaled alike: BN, linear in the channels, shrinks less than that quadratic bound assumes,
    # and the slack the bound left covers the difference. Shapes only (meta builds).
    total = sum(p.numel() for p in model.parameters())
    bn = _bn_params(model) * (min(1.0, costs.params / total) if total else 1.0)
    return model, StructureCosts(max(0, int(costs.params - bn)), max(0, int(costs.nonzero_params - bn)),
                                 costs.mflops, costs.size_mb * 0.25, costs.notes)


# every estimate here reads shapes only: each is its own quick bound (on a meta-device build)
_fp32, _fp16 = _scaled_size(1.0), _scaled_size(0.5)
register_method("fp32", "quant", Fp32Config, lowers=set(), apply=_apply, estimate=_fp32, bound=_fp32,
                description="no quantization")
register_method("fp16", "quant", Fp16Config, lowers={"size"}, apply=_apply, estimate=_fp16, bound=_fp16,
                description="half-precision weights and activations")
register_method("int8-dynamic", "quant", Int8DynamicConfig, lowers={"size", "latency"}, apply=_apply,
                estimate=_estimate_dynamic, bound=_estimate_dynamic,
                description="int8 nn.Linear weights, dynamic activations")
register_method("int8-static", "quant", Int8StaticConfig, lowers={"size", "latency", "params", "nonzero-params"},
                apply=_apply, estimate=_estimate_static, bound=_estimate_static,
                description="post-training static int8 (FX graph mode; conv-BN fusion removes BN parameters)")
