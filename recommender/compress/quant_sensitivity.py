"""Per-layer int8 sensitivity of a trained model: which layers to keep in float.

``measure_quant_sensitivity(model, batches, method=...) -> QuantSensitivity``

For every quantizable layer (``nn.Conv2d`` / ``nn.Linear``, after FX fuses it with its BN and
ReLU) the damage done when that layer *alone* is int8 (static, FX graph mode), on a calibration
subset of training images:

- ``fx`` (the reference): the model is prepared with a ``QConfigMapping`` that sets only that
  module's name (global qconfig None), calibrated on the batches, converted, and its mean
  cross-entropy and accuracy on the same batches compared with the float model's. Real int8
  kernels; one FX prepare, a model copy and two forward passes per layer.
- ``loss`` (the default): the same quantization simulated on the FX-fused float model with hooks:
  the layer's input and output fake-quantized with the ranges its observers recorded (all layers
  observed in one calibration pass: in a float model every layer sees float inputs, so the ranges
  are those of the isolated runs) and its BN-folded weights fake-quantized. One forward pass per
  layer, no copies.
- ``weight-mse`` (a proxy, no data): the relative error ``||W_c - Q(W)_c||^2 / ||W_c||^2`` of the
  layer's int8 weights alone (per channel or per tensor, symmetric), averaged over its output
  channels c (one huge weight hides a zeroed channel in the whole tensor's ratio, not in a
  channel's). Milliseconds; blind to activations.

``QuantSensitivity.ranking()`` orders the layers most sensitive first; ``Int8StaticConfig
(keep_float=k)`` keeps the first k in float. Computed once per study on the trained baseline
and cached (:func:`cached_quant_sensitivity`, keyed by the baseline's cache key: model,
checkpoint or weights digest, dataset and protocol). Which method ranks better for its cost is
measured in ``benchmarks/int8_accuracy.py`` (``docs/measurements.md``).

The model passed in is never modified.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecommenderError

__all__ = ["SENSITIVITY_METHODS", "LayerSensitivity", "QuantSensitivity", "quantizable_layers",
           "weight_quant_error", "measure_quant_sensitivity", "cached_quant_sensitivity"]

SENSITIVITY_METHODS = ("loss", "fx", "weight-mse")
#: Calibration batches the study measures the sensitivity on (``calibration_batch_size`` images
#: each): observers are calibrated on them and the loss is measured on them.
SENSITIVITY_BATCHES = 4


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's int8 damage.

    name: module name in the float model. kind: its class. params: its parameter count.
    loss_delta: mean cross-entropy increase (nats per image) with this layer alone int8
        (``loss`` and ``fx`` methods; None for ``weight-mse``).
    drop_pp: accuracy drop in percentage points on the same images (positive = worse; None for
        ``weight-mse``).
    weight_mse: relative squared error of its int8 weights, mean over output channels (always
        computed: it costs nothing).
    """

    name: str
    kind: str
    params: int
    weight_mse: float
    loss_delta: float | None = None
    drop_pp: float | None = None


@dataclass
class QuantSensitivity:
    """Per-layer sensitivities of one model (see the module docstring).

    base_loss, base_accuracy: the float model's mean cross-entropy and accuracy (fraction) on the
    ``images`` calibration images (None for ``weight-mse``). seconds: wall time of the measurement.
    """

    method: str
    engine: str
    observer: str
    per_channel: bool
    images: int
    layers: list[LayerSensitivity] = field(default_factory=list)
    base_loss: float | None = None
    base_accuracy: float | None = None
    seconds: float = 0.0

    def score(self, layer: LayerSensitivity) -> tuple[float, float]:
        """Sort key, higher = more sensitive."""
        if self.method != "weight-mse":
            return (layer.loss_delta or 0.0, layer.drop_pp or 0.0)
        return (layer.weight_mse, 0.0)

    def ranking(self) -> tuple[str, ...]:
        """Layer names, most sensitive first (ties keep the model's order)."""
        order = sorted(range(len(self.layers)), key=lambda i: self.score(self.layers[i]), reverse=True)
        return tuple(self.layers[i].name for i in order)

    def top(self, k: int) -> list[LayerSensitivity]:
        """The ``k`` most sensitive layers (for the explanation)."""
        by_name = {layer.name: layer for layer in self.layers}
        return [by_name[n] for n in self.ranking()[:k]]

    def summary(self, k: int = 5) -> dict[str, Any]:
        """The layers that matter, for the explanation: the ``k`` layers whose int8 alone costs
        most (loss change in nats per image and accuracy drop in pp, on ``images`` training
        images), with the method and calibration they were measured with."""
        return {"method": self.method, "observer": self.observer, "per_channel": self.per_channel,
                "images": self.images, "layers_measured": len(self.layers),
                "layers": [{"layer": x.name, "loss_delta": None if x.loss_delta is None else round(x.loss_delta, 4),
                            "drop_pp": None if x.drop_pp is None else round(x.drop_pp, 2)} for x in self.top(k)]}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSensitivity":
        d = dict(d)
        d["layers"] = [LayerSensitivity(**x) for x in d.get("layers", [])]
        return cls(**d)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` / ``nn.Linear`` modules of ``model``, in order."""
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear) and n]


def weight_quant_error(weight: torch.Tensor, per_channel: bool = True) -> float:
    """Mean over output channels c of ``||W_c - Q(W)_c||^2 / ||W_c||^2`` for symmetric int8 (scale
    per output channel, or one per tensor); all-zero channels are skipped (0 if all are)."""
    w = weight.detach().float()
    flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.clamp(torch.round(flat / scale), -128, 127) * scale
    rows = w.reshape(w.shape[0], -1)  # per output channel: a channel rounded to zero counts fully
    num = ((rows - q.reshape(rows.shape)) ** 2).sum(1)
    den = (rows ** 2).sum(1)
    live = den > 0
    return float((num[live] / den[live]).mean()) if bool(live.any()) else 0.0


def _xy(batches: Iterable[Any]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    out = []
    for b in batches:
        if isinstance(b, (tuple, list)) and len(b) >= 2:
            out.append((b[0], b[1]))
        else:
            out.append((b[0] if isinstance(b, (tuple, list)) else b, None))
    return out


@torch.no_grad()
def _loss_acc(model: nn.Module, data: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    total, correct, n = 0.0, 0, 0
    for x, y in data:
        out = model(x)
        total += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return total / max(n, 1), correct / max(n, 1)


def measure_quant_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    method: str = "loss",
    engine: str = "x86",
    observer: str = "minmax",
    per_channel: bool = True,
    layers: Sequence[str] | None = None,
) -> QuantSensitivity:
    """Each quantizable layer's int8 damage (see the module docstring).

    ``batches``: ``(x, y)`` training batches: the observers are calibrated on them and the loss
    measured on them (the ``loss`` method; without labels, or for a model FX cannot trace, it
    falls back to ``weight-mse``, and the result's ``method`` says so).
    ``engine`` / ``observer`` / ``per_channel``: as the int8 config that will use the ranking.
    ``layers``: the names to measure (default: :func:`quantizable_layers`). A layer FX cannot
    quantize alone scores 0 (it is never the first to keep in float for that reason).
    """
    from .quantize import _engine, int8_qconfig, quiet_quantization_warnings

    if method not in SENSITIVITY_METHODS:
        raise RecommenderError(f"unknown sensitivity method {method!r}; valid: {', '.join(SENSITIVITY_METHODS)}")
    t0 = time.perf_counter()
    data = _xy(batches)
    if method == "loss" and (not data or any(y is None for _, y in data)):
        method = "weight-mse"
    float_model = copy.deepcopy(model).eval()
    mods = dict(float_model.named_modules())
    names = list(layers) if layers is not None else quantizable_layers(float_model)
    images = sum(len(x) for x, _ in data)
    out = QuantSensitivity(method, engine, observer, per_channel, images if method == "loss" else 0)
    mse = {n: weight_quant_error(mods[n].weight, per_channel) for n in names}
    if method == "weight-mse":
        out.layers = [LayerSensitivity(n, type(mods[n]).__name__, sum(p.numel() for p in mods[n].parameters()),
                                       mse[n]) for n in names]
        out.seconds = time.perf_counter() - t0
        return out

    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import convert_fx, fuse_fx, prepare_fx

    labelled = [(x, y) for x, y in data if y is not None]
    base_loss, base_acc = _loss_acc(float_model, labelled)
    out.base_loss, out.base_accuracy = base_loss, base_acc
    qconfig = int8_qconfig(engine, observer, per_channel)
    example = labelled[0][0][:1]
    if method == "loss":
        try:
            with quiet_quantization_warnings(), _engine(engine):
                fused = fuse_fx(copy.deepcopy(float_model)).eval()
        except Exception:  # noqa: BLE001 - FX cannot trace the model: the no-data proxy ranks it
            return measure_quant_sensitivity(model, [], method="weight-mse", engine=engine, observer=observer,
                                             per_channel=per_channel, layers=layers)
        deltas = _simulated(fused, names, labelled, qconfig)
        for n in names:
            m = mods[n]
            loss, acc = deltas.get(n, (base_loss, base_acc))
            out.layers.append(LayerSensitivity(n, type(m).__name__, sum(p.numel() for p in m.parameters()), mse[n],
                                               loss - base_loss, (base_acc - acc) * 100))
        out.seconds = time.perf_counter() - t0
        return out
    with quiet_quantization_warnings(), _engine(engine):
        for n in names:
            loss, acc = base_loss, base_acc
            try:  # from the float model: FX cannot re-prepare a graph it fused (ConvReLU2d)
                prepared = prepare_fx(copy.deepcopy(float_model), QConfigMapping().set_module_name(n, qconfig),
                                      (example,))
                with torch.no_grad():
                    for x, _ in labelled:
                        prepared(x)
                q = convert_fx(prepared)
                loss, acc = _loss_acc(q, labelled)
            except Exception:  # noqa: BLE001 - a layer FX cannot quantize alone scores 0
                pass
            m = mods[n]
            out.layers.append(LayerSensitivity(n, type(m).__name__, sum(p.numel() for p in m.parameters()), mse[n],
                                               loss - base_loss, (base_acc - acc) * 100))
    out.seconds = time.perf_counter() - t0
    return out


def _conv_of(module: nn.Module) -> nn.Module | None:
    """The conv / linear inside a fused module (``ConvReLU2d[0]``), or the module itself."""
    if type(module) in (nn.Conv2d, nn.Linear):
        return module
    first = next(iter(module.children()), None) if isinstance(module, nn.Sequential) else None
    return first if type(first) in (nn.Conv2d, nn.Linear) else None


@torch.no_grad()
def _simulated(fused: nn.Module, names: Sequence[str], data: Sequence[tuple[torch.Tensor, torch.Tensor]],
               qconfig: Any) -> dict[str, tuple[float, float]]:
    """(loss, accuracy) of ``fused`` with each named layer alone fake-quantized (see ``loss``)."""
    mods = dict(fused.named_modules())
    targets = {n: mods[n] for n in names if n in mods and _conv_of(mods[n]) is not None}
    obs: dict[str, tuple[Any, Any]] = {n: (qconfig.activation(), qconfig.activation()) for n in targets}
    hooks = []
    for n, m in targets.items():
        i_obs, o_obs = obs[n]
        hooks.append(m.register_forward_pre_hook(lambda _m, a, o=i_obs: (o(a[0]),)))
        hooks.append(m.register_forward_hook(lambda _m, a, y, o=o_obs: o(y)))
    try:
        for x, _ in data:
            fused(x)
    finally:
        for h in hooks:
            h.remove()

    def fake(o: Any, t: torch.Tensor) -> torch.Tensor:
        scale, zp = o.calculate_qparams()
        return torch.fake_quantize_per_tensor_affine(t, float(scale), int(zp), o.quant_min, o.quant_max)

    out = {}
    for n, m in targets.items():
        i_obs, o_obs = obs[n]
        conv = _conv_of(m)
        w_obs = qconfig.weight()
        w_obs(conv.weight)
        scale, zp = w_obs.calculate_qparams()
        w = conv.weight.data
        if scale.numel() > 1:
            wq = torch.fake_quantize_per_channel_affine(w, scale.float(), zp.int(), w_obs.ch_axis,
                                                        w_obs.quant_min, w_obs.quant_max)
        else:
            wq = torch.fake_quantize_per_tensor_affine(w, float(scale), int(zp), w_obs.quant_min, w_obs.quant_max)
        conv.weight.data = wq
        h1 = m.register_forward_pre_hook(lambda _m, a: (fake(i_obs, a[0]),))
        h2 = m.register_forward_hook(lambda _m, a, y: fake(o_obs, y))
        try:
            out[n] = _loss_acc(fused, data)
        finally:
            h1.remove()
            h2.remove()
            conv.weight.data = w
    return out


def cached_quant_sensitivity(cache: Any, key: str, model: nn.Module, batches: Iterable[Any], **kwargs: Any
                             ) -> QuantSensitivity:
    """:func:`measure_quant_sensitivity` once per ``key`` (the trained baseline's cache key) and
    its arguments: the result is stored as JSON beside the baseline's weights in ``cache`` (a
    :class:`~recommender.cache.WeightsCache`; None: measured every time)."""
    batches = list(batches)
    opts = {"method": "loss", "engine": "x86", "observer": "minmax", "per_channel": True, **kwargs}
    images = sum(len(b[0]) if isinstance(b, (tuple, list)) else len(b) for b in batches)
    name = (f"quant_sensitivity_{opts['method']}_{opts['engine']}_{opts['observer']}_"
            f"{'pc' if opts['per_channel'] else 'pt'}_{images}")
    def measure() -> QuantSensitivity:
        return measure_quant_sensitivity(model, batches, **opts)

    if cache is None:
        return measure()
    return cache.json_once(key, name, measure, parse=QuantSensitivity.from_dict, dump=QuantSensitivity.to_dict)
