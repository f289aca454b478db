"""ArchConfig: which architecture techniques are applied to a base model, with which settings.

``ArchConfig()`` is the unmodified CIFAR base model (3x3 stride-1 stem and no max-pool for ResNet,
the CIFAR-style VGG with the 512->4096->4096->nc head). Every paper variant is a named ArchConfig
preset (``paper-resnet101-1`` ...). An ArchConfig is family-neutral where possible and applies to
any depth of its family: per-stage values (``widths``, ``inner``, ``inner_first``) are given per
stage, not per block, so ``resnet50`` gets its 3/4/6/3 blocks with the variant's blocks and widths.
Whether a setting applies to a model is checked when the model is built
(:func:`recommender.models.build_model` raises :class:`~recommender.errors.ArchError`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ArchError

STEMS = ("standard", "factorized", "dws")
BLOCKS = ("standard", "fire", "ir", "ghost", "dice")
CONVS = ("standard", "factorized", "depthwise")
EXPAND3 = ("conv", "grouped", "ghost", "dice")
GHOST_DW = ("proj", "stride")
DOWNSAMPLE = ("first", "last")
HEADS = ("fc", "fc-nobias", "gap-fc", "nofc", "nofc-nobn")

_CHOICES = {"stem": STEMS, "block": BLOCKS, "conv": CONVS, "expand3": EXPAND3,
            "ghost_dw": GHOST_DW, "downsample": DOWNSAMPLE, "head": HEADS}
_TUPLES = ("widths", "inner", "inner_first")


@dataclass(frozen=True)
class ArchConfig:
    """Architecture techniques and their settings (frozen, hashable, JSON round-trip).

    Fields (allowed values; default first). "ResNet only" settings raise ArchError on VGG when
    they differ from the default, and vice versa; so do combinations a block cannot take.

    stem: ResNet stem conv (``conv1``), followed by BN + ReLU. ``standard`` = conv 3x3 stride 1;
        ``factorized`` = 3x1 3->3 then 1x3 3->w; ``dws`` = DW 3x3 on the 3 input channels then
        1x1 3->w. ResNet only.
    stem_width: int >= 1, default 64. Stem output width ("less channels on the early stage":
        10 or 16 in the paper). ResNet only.
    block: the residual block / VGG unit. ``standard`` = the base model's own (torchvision
        Bottleneck for resnet50+, BasicBlock for resnet18/34; conv 3x3 + [BN] + ReLU for VGG);
        ``fire`` = fire module (ResNet residual fire, VGG fire unit at every conv position);
        ``ir`` = inverted residual; ``ghost`` = ghost bottleneck; ``dice`` = DiCE residual block.
        ``ir``, ``ghost`` and ``dice`` are ResNet only.
    conv: kind of the 3x3 conv inside ``standard`` blocks/units. ``standard``; ``factorized``
        (3x1 then 1x3); ``depthwise`` (DW only inside a bottleneck, whose 1x1 convs do the
        pointwise work; DW + 1x1 in a BasicBlock or a VGG unit).
    expand3: the 3x3 expand of ``fire`` units (VGG; ResNet fire takes only ``conv``). ``conv``
        (plain 3x3: Fire-A), ``grouped`` (channel-multiplier grouped 3x3, g = squeeze: Fire-B,
        with groups > 1 Fire-C), ``ghost`` (ghost module: Fire-D, with groups > 1 Fire-E),
        ``dice`` (DiCE unit: Fire-F; its squeeze is always grouped by gcd(in, squeeze)).
    groups: int >= 1, default 1 (none). Grouped pointwise convs + channel shuffle (paper: 4).
        ``standard`` bottleneck -> ShuffleNet-style grouped bottleneck (ResNet 5); ``ghost`` ->
        grouped primary 1x1 of every ghost module (ResNet 13/14); VGG fire ``grouped``/``ghost``
        -> Fire-C/Fire-E. A pointwise conv is grouped only when its input is wider than 24.
    se: bool, default False. Squeeze-and-excitation: inside ghost/IR blocks on the expanded
        channels (after the depthwise layer); on the block output before the add for standard,
        fire and DiCE blocks; after every VGG unit.
    se_ratio: float in (0, 1], default 0.25. SE hidden width = int(se_ratio * channels).
    ghost_dw: when a ghost bottleneck has its depthwise layer. ``proj`` (flavour P: exactly when
        it projects, ResNet 10-12) or ``stride`` (flavour S: exactly when strided, ResNet 13/14).
    widths: per-stage output widths, or None for the block's default. ResNet: 4 values (default
        256/512/1024/2048 for standard and fire on resnet50+, 64/128/256/512 on resnet18/34,
        10/22/42/86 for ir/ghost/dice). VGG: 5 values, every conv of a stage (default
        64/128/256/512/512).
    inner: per-stage inner widths (4 values) or None: bottleneck width, fire squeeze width,
        ir/ghost/dice expansion width. Default 64/128/256/512 (fire on resnet18/34: widths/4).
        ResNet only; not for BasicBlock.
    inner_first: per-stage inner width of the first block of each stage, or None (= inner).
        The paper's ghost/DiCE variants use 64/64/128/512. ResNet only.
    downsample: where each stage changes width and resolution. ``first`` (first block of
        stages 2-4, torchvision) or ``last`` (last block of stages 1-3, ResNet 6-9). ResNet only.
    last_width: int or None. The last block of the network widens to this width (stride 1,
        projection; ResNet 6/7: 512). ResNet only.
    drop_last: bool, default False. "Optimisation before GAP": remove the last block of the last
        stage (ResNet 8/9, 11-14). ResNet only.
    pre_gap: int >= 0, default 0 (none). A 1x1 conv to this width + BN + ReLU6 after the last
        block, before the head (ResNet 6: 2048, ResNet 8/9: 512). ResNet only.
    head: the classifier. ``fc`` = the base model's (ResNet: GAP -> Linear with bias; VGG: 5th
        max-pool kept, flatten -> 512->4096->4096->nc stack with dropout); ``fc-nobias`` = GAP ->
        Linear without bias; ``gap-fc`` = GAP -> Linear -> Dropout(0.5) on the logits;
        ``nofc`` = no FC: 1x1 conv to nc + BN + act -> GAP (ResNet: conv without bias, ReLU6;
        VGG: conv with bias, ReLU); ``nofc-nobn`` = the same without the BN. Every VGG head other
        than ``fc`` removes the 5th max-pool.
    width_multiplier: float in (0, 4], default 1.0. Scales every width above (stem, stages,
        inner, last_width, pre_gap, the VGG conv widths and FC hidden width), rounded to what the
        block needs (e.g. even widths for ghost modules); never the class count.
    """

    stem: str = "standard"
    stem_width: int = 64
    block: str = "standard"
    conv: str = "standard"
    expand3: str = "conv"
    groups: int = 1
    se: bool = False
    se_ratio: float = 0.25
    ghost_dw: str = "proj"
    widths: tuple[int, ...] | None = None
    inner: tuple[int, ...] | None = None
    inner_first: tuple[int, ...] | None = None
    downsample: str = "first"
    last_width: int | None = None
    drop_last: bool = False
    pre_gap: int = 0
    head: str = "fc"
    width_multiplier: float = 1.0

    def __post_init__(self) -> None:
        for name, valid in _CHOICES.items():
            value = getattr(self, name)
            if value not in valid:
                raise ArchError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        for name in _TUPLES:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            if (not isinstance(value, tuple) or not value
                    or not all(_is_int(v) and v >= 1 for v in value)):
                raise ArchError(f"{name} must be a list of positive integers or null, got {value!r}")
        for name in ("stem_width", "groups"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ArchError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _is_int(self.pre_gap) or self.pre_gap < 0:
            raise ArchError(f"pre_gap must be an integer >= 0, got {self.pre_gap!r}")
        if self.last_width is not None and (not _is_int(self.last_width) or self.last_width < 1):
            raise ArchError(f"last_width must be a positive integer or null, got {self.last_width!r}")
        for name in ("se", "drop_last"):
            if not isinstance(getattr(self, name), bool):
                raise ArchError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_bounds()
        for name, lo, hi in (("se_ratio", 0.0, 1.0), ("width_multiplier", 0.0, 4.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
                raise ArchError(f"{name} must be a number in ({lo:g}, {hi:g}], got {value!r}")
            object.__setattr__(self, name, float(value))

    def _check_bounds(self) -> None:
        """Widths and groups within their limits (:mod:`recommender.limits`): a recipe asking for
        1e11 channels fails here, not allocating."""
        from .. import limits

        for name in ("stem_width", "pre_gap", "last_width", *_TUPLES):
            value = getattr(self, name)
            for v in value if isinstance(value, tuple) else () if value is None else (value,):
                limits.check("width", v, name, error=ArchError)
        limits.check("groups", self.groups, "groups", error=ArchError)

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-compatible values (tuples become lists)."""
        data = asdict(self)
        for name in _TUPLES:
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchConfig":
        """Inverse of :meth:`to_dict`; missing keys take their defaults. Unknown keys or values
        raise :class:`~recommender.errors.ArchError` naming the valid ones."""
        if not isinstance(data, dict):
            raise ArchError(f"an arch config must be a mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ArchError(f"unknown arch config keys {unknown}; valid: {', '.join(names)}")
        return cls(**data)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "ArchConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ArchError(f"arch config is not valid JSON: {exc}") from None

    def replace(self, **changes: Any) -> "ArchConfig":
        """A copy with some fields changed (validated)."""
        return self.from_dict({**self.to_dict(), **changes})

    def changed(self) -> dict[str, Any]:
        """The fields that differ from ``ArchConfig()`` (JSON-compatible)."""
        base = ArchConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if base[k] != v}

    # -- text --------------------------------------------------------------------------------

    def describe(self) -> str:
        """One short human line, e.g. ``ghost(S, g4)+SE · stem dws/16 · w 16/24/40/88 · nofc``."""
        d = self.changed()
        if not d:
            return "baseline"
        parts: list[str] = []
        if self.block != "standard" or self.conv != "standard" or self.groups > 1 or self.se:
            if self.block == "ghost":
                flavour = {"proj": "P", "stride": "S"}[self.ghost_dw]
                name = f"ghost({flavour}" + (f", g{self.groups})" if self.groups > 1 else ")")
            elif self.block == "fire" and (self.expand3 != "conv" or self.groups > 1):
                name = f"fire({self.expand3}" + (f", g{self.groups})" if self.groups > 1 else ")")
            elif self.block == "standard":
                name = "block"
                if self.conv != "standard":
                    name = f"{self.conv} conv"
                if self.groups > 1:
                    name += f" + g{self.groups} shuffle"
            else:
                name = self.block
            if self.se:
                name += "+SE" + (f"({self.se_ratio:g})" if self.se_ratio != 0.25 else "")
            parts.append(name)
        if self.stem != "standard" or self.stem_width != 64:
            parts.append(f"stem {self.stem}/{self.stem_width}")
        if self.widths:
            parts.append("w " + "/".join(map(str, self.widths)))
        if self.inner:
            parts.append("e " + "/".join(map(str, self.inner)))
        if self.inner_first:
            parts.append("e1st " + "/".join(map(str, self.inner_first)))
        if self.downsample != "first":
            parts.append("downsample last")
        if self.last_width:
            parts.append(f"last->{self.last_width}")
        if self.drop_last:
            parts.append("drop-last")
        if self.pre_gap:
            parts.append(f"pre-gap {self.pre_gap}")
        if self.head != "fc":
            parts.append(f"head {self.head}")
        if self.width_multiplier != 1.0:
            parts.append(f"x{self.width_multiplier:g}")
        return " · ".join(parts)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def arch_fields() -> list[str]:
    """The ArchConfig field names, in declaration order."""
    return [f.name for f in fields(ArchConfig)]
