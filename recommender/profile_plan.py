"""What a device profile times: the operators this tool's candidates are made of.

Not a full grid: the bundled presets (the paper's ResNet-101 and VGG-19 variants), the
torchvision models and the CIFAR base models are built at the family's deploy size, with what
the bundled search spaces do to them (width multipliers, structured channel pruning, fp16, int8
static and dynamic), and traced at batch 1 (:func:`recommender.latency_ops.trace`). The plan is
these models' records (programs): the device replays each and times every operator where it
runs, in the model's sequence (``time``, ``calibrate``); a few are also timed whole to fit the
calibration (``calibrate``), and a few are held out, never timed per operator, to measure the
error of the prediction on models it has not seen (``validate``). Shapes between the sampled
channel counts are interpolated at prediction time (:mod:`recommender.latency_predict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import latency_ops

__all__ = ["PlanModel", "PLAN_MODELS", "make_plan", "build_plan_model"]


@dataclass(frozen=True)
class PlanModel:
    """One model of the plan: a model name, an architecture (preset name or ArchConfig fields),
    a recipe's pruning (structured sparsity) and quantization scheme, and the program role
    (``calibrate``, ``validate`` or ``""``: its operators are timed, the whole is not)."""

    model: str
    arch: str | dict[str, Any] | None = None
    sparsity: float = 0.0
    quant: str = "fp32"
    role: str = ""

    @property
    def name(self) -> str:
        arch = self.arch if isinstance(self.arch, str) else (
            ",".join(f"{k}={v}" for k, v in self.arch.items()) if self.arch else "")
        parts = [self.model + (f"[{arch}]" if arch else "")]
        if self.sparsity:
            parts.append(f"structured-{self.sparsity:g}")
        if self.quant != "fp32":
            parts.append(self.quant)
        return " + ".join(parts)


def _presets() -> list[PlanModel]:
    from .models import list_presets
    from .models.presets import get_preset

    out = []
    for name in list_presets():
        p = get_preset(name)
        out.append(PlanModel(p.model, name))
    return out


_CALIBRATE = [
    PlanModel("resnet18", role="calibrate"),
    PlanModel("resnet101", "paper-resnet101-1", role="calibrate"),
    PlanModel("resnet101", "paper-resnet101-12", role="calibrate"),
    PlanModel("vgg19", "paper-vgg19-1", role="calibrate"),
    PlanModel("vgg19", "paper-vgg19-9", role="calibrate"),
    PlanModel("tv:mobilenet_v2", role="calibrate"),
    PlanModel("tv:shufflenet_v2_x1_0", role="calibrate"),
    PlanModel("resnet18", quant="int8-static", role="calibrate"),
    PlanModel("tv:mobilenet_v2", quant="int8-static", role="calibrate"),
    PlanModel("resnet101", "paper-resnet101-1", quant="int8-static", role="calibrate"),
    PlanModel("resnet18", quant="fp16", role="calibrate"),
    PlanModel("tv:mobilenet_v2", quant="fp16", role="calibrate"),
]
_VALIDATE = [
    PlanModel("tv:resnet18", role="validate"),
    PlanModel("resnet101", "paper-resnet101-8", role="validate"),
    PlanModel("vgg19", "paper-vgg19-5", role="validate"),
    PlanModel("tv:efficientnet_b0", role="validate"),
    PlanModel("resnet18", sparsity=0.5, role="validate"),
    PlanModel("vgg19", "paper-vgg19-1", quant="int8-static", role="validate"),
    PlanModel("tv:resnet18", quant="int8-static", role="validate"),
    PlanModel("tv:mobilenet_v3_small", quant="fp16", role="validate"),
]
_TIMED_ONLY = [
    PlanModel("resnet34"), PlanModel("resnet50"), PlanModel("resnet152"),
    PlanModel("vgg11"), PlanModel("vgg16_bn"),
    PlanModel("tv:resnet50"), PlanModel("tv:mobilenet_v3_small"), PlanModel("tv:mobilenet_v3_large"),
    PlanModel("tv:regnet_x_400mf"),
    # the spaces' width multipliers and structured pruning: channel counts between the presets'
    PlanModel("resnet18", {"width_multiplier": 0.5}), PlanModel("resnet18", {"width_multiplier": 0.25}),
    PlanModel("resnet50", {"width_multiplier": 0.5}),
    PlanModel("tv:mobilenet_v2", {"width_multiplier": 0.5}),
    PlanModel("resnet18", sparsity=0.3), PlanModel("resnet18", sparsity=0.7),
    PlanModel("resnet50", sparsity=0.5), PlanModel("vgg19", "paper-vgg19-1", sparsity=0.5),
    PlanModel("tv:mobilenet_v2", sparsity=0.5), PlanModel("tv:resnet18", sparsity=0.5),
    PlanModel("resnet101", "paper-resnet101-11", sparsity=0.5),
    # int8 and fp16 of the other kinds of blocks
    PlanModel("resnet50", quant="int8-static"), PlanModel("resnet18", sparsity=0.5, quant="int8-static"),
    PlanModel("resnet101", "paper-resnet101-11", quant="int8-static"),
    PlanModel("resnet101", "paper-resnet101-7", quant="int8-static"),
    PlanModel("resnet101", "paper-resnet101-13", quant="int8-static"),
    PlanModel("tv:shufflenet_v2_x1_0", quant="int8-static"),
    PlanModel("tv:mobilenet_v3_large", quant="int8-static"),
    PlanModel("tv:efficientnet_b0", quant="int8-static"),
    PlanModel("vgg19", "paper-vgg19-9", quant="int8-static"), PlanModel("vgg16_bn", quant="int8-static"),
    PlanModel("tv:resnet50", quant="int8-static"), PlanModel("tv:mobilenet_v3_large", quant="fp16"),
    PlanModel("vgg19", "paper-vgg19-9", quant="fp16"),
    PlanModel("resnet18", quant="int8-dynamic"), PlanModel("vgg19", "paper-vgg19-1", quant="int8-dynamic"),
    PlanModel("tv:mobilenet_v2", quant="int8-dynamic"),
    PlanModel("resnet50", quant="fp16"), PlanModel("vgg19", "paper-vgg19-1", quant="fp16"),
    PlanModel("resnet101", "paper-resnet101-11", quant="fp16"),
    PlanModel("tv:resnet18", quant="fp16"), PlanModel("tv:shufflenet_v2_x1_0", quant="fp16"),
    PlanModel("tv:efficientnet_b0", quant="fp16"),
    PlanModel("resnet18", sparsity=0.5, quant="fp16"),
]


def PLAN_MODELS() -> list[PlanModel]:
    """Every model of the default plan: calibration and validation models first, then the
    presets and the other variants whose operators are timed (a validation model is not timed
    again under another role: it stays held out)."""
    held_out = {(pm.model, pm.arch if isinstance(pm.arch, str) else None, pm.sparsity, pm.quant)
                for pm in _VALIDATE}
    rest = [pm for pm in _presets() + _TIMED_ONLY
            if (pm.model, pm.arch if isinstance(pm.arch, str) else None, pm.sparsity, pm.quant) not in held_out]
    return _CALIBRATE + _VALIDATE + rest


def build_plan_model(pm: PlanModel, *, num_classes: int = 10, input_size: int = 32, engine: str = "x86",
                     seed: int = 0) -> torch.nn.Module:
    """Build one plan model: untrained weights (a kernel's time does not depend on them),
    structured-pruned and quantized as its recipe says (int8 calibrated on random inputs)."""
    from .compress.pipeline import compress
    from .models import build_model
    from .models.arch import ArchConfig
    from .recipe import PruneConfig, QuantConfig

    arch = ArchConfig(**pm.arch) if isinstance(pm.arch, dict) else pm.arch
    g = torch.Generator().manual_seed(seed)
    model = build_model(pm.model, arch, num_classes=num_classes).eval()
    prune = PruneConfig("structured-channel", sparsity=pm.sparsity) if pm.sparsity else PruneConfig()
    quant = QuantConfig(pm.quant, engine=engine) if pm.quant.startswith("int8") else QuantConfig(pm.quant)
    if pm.quant == "int8-static":
        quant = QuantConfig(pm.quant, engine=engine, observer="minmax", calibration_batches=2)
    example = torch.randn(1, 3, input_size, input_size, generator=g)
    batches = [(torch.randn(8, 3, input_size, input_size, generator=g), torch.zeros(8, dtype=torch.long))
               for _ in range(2)]
    model, _ = compress(model, (prune, quant), example_input=example, batches=batches)
    return model.eval()


def make_plan(*, input_sizes: tuple[int, ...] = (32,), engines: tuple[str, ...] | None = None,
              models: tuple[str, ...] | None = None, log: Callable[[str], None] | None = None
              ) -> dict[str, Any]:
    """The plan of a profile: distinct operators of the plan models (:func:`PLAN_MODELS`, or
    only those whose model name is in ``models``) at each of ``input_sizes`` (px), int8
    operators to be timed under each of ``engines`` (default: ``x86`` and ``qnnpack``, which
    the device filters to those it has), and the calibration and validation programs."""
    from .compress.quantize import quiet_quantization_warnings

    log = log or (lambda s: None)
    engines = tuple(engines or ("x86", "qnnpack"))
    trace_engine = "x86" if "x86" in torch.backends.quantized.supported_engines else \
        torch.backends.quantized.supported_engines[-1]
    specs: set[str] = set()
    programs: list[dict[str, Any]] = []
    chosen = [pm for pm in PLAN_MODELS() if models is None or pm.model in models]
    for size in input_sizes:
        for pm in chosen:
            with quiet_quantization_warnings():
                try:
                    net = build_plan_model(pm, input_size=size, engine=trace_engine)
                except Exception as exc:  # a preset this model cannot build at this size
                    log(f"plan: {pm.name} at {size} px skipped ({type(exc).__name__}: {str(exc)[:80]})")
                    continue
                records = latency_ops.trace(net, (1, 3, size, size))
            for r in records:
                specs.add(latency_ops.spec_key(r))
            programs.append({"name": f"{pm.name} @{size}px", "role": pm.role or "time", "records": records})
        log(f"plan: {len(chosen)} models at {size} px, {len(specs)} distinct operators so far")
    return {"format": latency_ops.FORMAT + "-plan", "version": latency_ops.FORMAT_VERSION,
            "input_sizes": list(input_sizes), "engines": list(engines), "operators": len(specs),
            "programs": programs}
