"""Technique blocks: small, composable ``nn.Module`` s for the paper's architecture techniques.

Every block follows ``/work/shared/paper/variants.md`` (section 2) exactly, because the paper's
parameter and FLOP counts depend on the details: convolutions have no bias unless stated, every
global average pooling is an ``AdaptiveAvgPool2d`` (fvcore counts it, it does not count a
``mean()``), and a few blocks *register modules that are never called* (their parameters count,
their FLOPs do not). Those unused modules are named ``unused_*`` and documented where they occur.

One class per concept, configured by parameters:

===========================  ===================================================================
``FactorizedConv``           Nx1 / 1xN factorisation of a 3x3 conv (section 2.2)
``DepthwiseSeparableConv``   DW kxk + pointwise 1x1 (the DWS stem, VGG DWS units; 2.1)
``spatial_conv``             factory for the 3x3 of a block: standard | factorized | depthwise
``ChannelShuffle``           ShuffleNet channel shuffle (no parameters, no FLOPs; 2.4)
``ChannelPermute``           a fixed channel permutation (what structured pruning leaves of a shuffle)
``SqueezeExcite``            SE with adaptive GAP and bias-free linears (2.7)
``Bottleneck``/``BasicBlock`` torchvision-compatible residual blocks with a configurable 3x3
                             kind, grouped pointwise + shuffle (ShuffleNet unit, 2.4) and SE
``InvertedResidual``         MobileNetV2 block with explicit expansion width (2.5)
``GhostModule``              ghost module, ratio 2, optional grouped primary + shuffle (2.6)
``GhostBottleneck``          ghost bottleneck; ``dw_when`` = "proj" (flavour P) or "stride" (S)
``FireModule``               fire module; ``expand3`` kind x ``groups`` give Fire-A..F (2.3)
``ResidualFire``             the ResNet residual fire block (FireRes, 2.3)
``DiCE``/``StridedDiCE``     DiCE unit and its strided form (2.8)
``DiCEBlock``                DiCE residual block (DB, 2.8)
``ConvBNAct``                1x1 conv + optional BN + activation (pre-GAP conv, no-FC heads)
``GAPClassifier``            GAP -> flatten -> Linear (-> Dropout on the logits) (2.9)
``ConvClassifier``           no-FC head: 1x1 conv -> [BN] -> act -> GAP -> flatten (2.9)
``FCStack``                  the CIFAR VGG classifier 512->4096->4096->nc with dropout (1.2)
===========================  ===================================================================
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArchError

__all__ = [
    "channel_shuffle", "ChannelShuffle", "FactorizedConv", "DepthwiseSeparableConv", "spatial_conv",
    "SqueezeExcite", "Bottleneck", "BasicBlock", "InvertedResidual", "GhostModule",
    "GhostBottleneck", "FireModule", "ResidualFire", "DiCE", "StridedDiCE", "DiCEBlock",
    "ConvBNAct", "GAPClassifier", "ConvClassifier", "FCStack", "projection", "make_act",
    "GROUPED_PW_MIN_WIDTH",
]

#: The paper groups a pointwise conv only when its input is wider than this (``g = 4 if in > 24``).
GROUPED_PW_MIN_WIDTH = 24

SPATIAL_KINDS = ("standard", "factorized", "depthwise")


def make_act(name: str | None) -> nn.Module:
    """``relu`` | ``relu6`` | ``None`` (identity). Activations are in-place, as in torchvision."""
    if name is None:
        return nn.Identity()
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    raise ArchError(f"unknown activation {name!r}; valid: relu, relu6")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ArchError(msg)


def _check_groups(cin: int, cout: int, groups: int, what: str) -> None:
    _require(cin % groups == 0 and cout % groups == 0,
             f"{what}: {cin}->{cout} channels cannot be split into {groups} groups")


def conv1x1(cin: int, cout: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    _check_groups(cin, cout, groups, "1x1 conv")
    return nn.Conv2d(cin, cout, 1, stride=stride, groups=groups, bias=bias)


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    _check_groups(cin, cout, groups, "3x3 conv")
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=bias)


def dw3x3(c: int, stride: int = 1) -> nn.Conv2d:
    """``DW 3x3 c, s``: depthwise, c -> c, groups c, no bias."""
    return nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False)


def projection(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    """Projection shortcut: ``conv 1x1 cin->cout, s`` (+ bias if asked) + BN(cout)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), nn.BatchNorm2d(cout))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """View (N, C, H, W) as (N, g, C/g, H, W), swap dims 1 and 2, flatten back."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    """Channel shuffle with ``groups`` groups (no parameters, 0 FLOPs)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups) if self.groups > 1 else x

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ChannelPermute(nn.Module):
    """A fixed channel permutation: output channel ``j`` is input channel ``index[j]`` (no
    parameters, 0 FLOPs). What a :class:`ChannelShuffle` becomes when structured pruning removes
    different positions from its groups (:mod:`recommender.compress.shuffle_prune`)."""

    def __init__(self, index: list[int]):
        super().__init__()
        self.register_buffer("index", torch.tensor(list(index), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"channels={self.index.numel()}"


class FactorizedConv(nn.Sequential):
    """Nx1/1xN factorisation of a 3x3 conv (N = 3), nothing between the two convs.

    ``conv 3x1 cin->cin`` (padding (1, 0), stride (s, 1)) then ``conv 1x3 cin->cout`` (padding
    (0, 1), stride (1, s)). The first conv keeps the input width. ``bias`` applies to the second
    conv only (the paper uses none; the non-BN VGG bases get one).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, bias: bool = False):
        super().__init__(
            nn.Conv2d(cin, cin, (3, 1), stride=(stride, 1), padding=(1, 0), bias=False),
            nn.Conv2d(cin, cout, (1, 3), stride=(1, stride), padding=(0, 1), bias=bias),
        )


class DepthwiseSeparableConv(nn.Sequential):
    """``DW kxk cin, s`` followed directly by ``conv 1x1 cin->cout`` (no BN/activation between).

    Used as the DWS stem (``DWSstem(c)`` = ``DepthwiseSeparableConv(3, c)``) and as the VGG
    depthwise unit. ``bias`` applies to the pointwise conv only (the paper uses none).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, bias: bool = False):
        super().__init__(dw3x3(cin, stride), nn.Conv2d(cin, cout, 1, bias=bias))


def spatial_conv(kind: str, cin: int, cout: int, stride: int = 1, *, bias: bool = False,
                 pointwise_follows: bool = False) -> nn.Module:
    """The 3x3 conv of a block, by technique.

    ``standard``: conv 3x3. ``factorized``: :class:`FactorizedConv`. ``depthwise``: a depthwise
    conv only (``DW 3x3``) when ``pointwise_follows`` (a bottleneck's 1x1 convs already do the
    pointwise work, requires cin == cout), else the depthwise-separable pair.
    """
    if kind == "standard":
        return conv3x3(cin, cout, stride, bias=bias)
    if kind == "factorized":
        return FactorizedConv(cin, cout, stride, bias=bias)
    if kind == "depthwise":
        if pointwise_follows:
            _require(cin == cout, f"a depthwise-only 3x3 needs equal widths, got {cin}->{cout}")
            return dw3x3(cin, stride)
        return DepthwiseSeparableConv(cin, cout, stride, bias=bias)
    raise ArchError(f"unknown conv kind {kind!r}; valid: {', '.join(SPATIAL_KINDS)}")


class SqueezeExcite(nn.Module):
    """``SE(c)``: adaptive GAP -> Linear(c->int(r*c), no bias) -> ReLU -> Linear(->c, no bias)
    -> Sigmoid -> channel-wise multiply. The paper uses r = 0.25 everywhere."""

    def __init__(self, channels: int, ratio: float = 0.25):
        super().__init__()
        hidden = int(ratio * channels)
        _require(hidden >= 1, f"SE on {channels} channels with ratio {ratio} has no hidden unit")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False), nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        return x * self.fc(self.pool(x).view(n, c)).view(n, c, 1, 1)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5, stride on the 3x3) with technique options.

    Attribute names match torchvision (``conv1..3``, ``bn1..3``, ``relu``, ``downsample``).

    Args:
        conv: kind of the 3x3 (``standard`` | ``factorized`` | ``depthwise`` = DW only, ResNet 3/4).
        groups: > 1 turns the block into the paper's grouped bottleneck ``GPB`` (ResNet 5,
            ShuffleNet unit): both 1x1 convs grouped (when their input is wider than 24) and each
            followed by a channel shuffle, no activation after the 3x3, shortcut ungrouped.
        se: squeeze-and-excitation on the output channels before the add (SE-ResNet).
    """

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, proj: bool = False, *,
                 conv: str = "standard", groups: int = 1, se: bool = False, se_ratio: float = 0.25):
        super().__init__()
        g1 = groups if cin > GROUPED_PW_MIN_WIDTH else 1
        g3 = groups if width > GROUPED_PW_MIN_WIDTH else 1
        self.conv1 = conv1x1(cin, width, groups=g1)
        self.bn1 = nn.BatchNorm2d(width)
        self.shuffle1 = ChannelShuffle(g1)
        self.conv2 = spatial_conv(conv, width, width, stride, pointwise_follows=True)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.Identity() if groups > 1 else nn.ReLU(inplace=True)
        self.conv3 = conv1x1(width, cout, groups=g3)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shuffle3 = ChannelShuffle(g3)
        self.se = SqueezeExcite(cout, se_ratio) if se else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(cin, cout, stride) if proj else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.shuffle1(self.relu(self.bn1(self.conv1(x))))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.se(self.shuffle3(self.bn3(self.conv3(out))))
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (resnet18/34) with a configurable 3x3 kind and optional SE.

    ``conv = depthwise`` makes each 3x3 a depthwise-separable pair (there is no 1x1 to do the
    pointwise work); ``factorized`` factorises both 3x3 convs.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, proj: bool = False, *,
                 conv: str = "standard", se: bool = False, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = spatial_conv(conv, cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = spatial_conv(conv, cout, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout, se_ratio) if se else nn.Identity()
        self.downsample = projection(cin, cout, stride) if proj else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class InvertedResidual(nn.Module):
    """``IR(in, e, out, s, proj)`` (MobileNetV2): 1x1 in->e + BN + ReLU6 -> DW 3x3 e, s + BN +
    ReLU6 -> 1x1 e->out + BN (linear) -> + shortcut, no activation after the add. ``proj`` may be
    set at stride 1. Optional SE on the e channels after the depthwise stage (MobileNetV3)."""

    def __init__(self, cin: int, e: int, cout: int, stride: int = 1, proj: bool = False, *,
                 se: bool = False, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = conv1x1(cin, e)
        self.bn1 = nn.BatchNorm2d(e)
        self.conv2 = dw3x3(e, stride)
        self.bn2 = nn.BatchNorm2d(e)
        self.act = nn.ReLU6(inplace=True)
        self.se = SqueezeExcite(e, se_ratio) if se else nn.Identity()
        self.conv3 = conv1x1(e, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = projection(cin, cout, stride) if proj else None
        _require(proj or (cin == cout and stride == 1),
                 f"inverted residual {cin}->{cout}, stride {stride} needs a projection")

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.se(self.act(self.bn2(self.conv2(out))))
        return self.bn3(self.conv3(out)) + identity


class GhostModule(nn.Module):
    """``GM(in->out)``, ratio 2: primary ``conv 1x1 in->out/2`` (optionally grouped, then a
    channel shuffle with the same groups) -> cheap ``DW 3x3 out/2`` on the primary output ->
    cat[cheap, primary] -> BN(out) -> ReLU6 if ``act``."""

    def __init__(self, cin: int, cout: int, *, act: bool = True, groups: int = 1):
        super().__init__()
        _require(cout % 2 == 0, f"a ghost module needs an even output width, got {cout}")
        half = cout // 2
        self.primary = conv1x1(cin, half, groups=groups)
        self.shuffle = ChannelShuffle(groups)
        self.cheap = dw3x3(half)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        primary = self.shuffle(self.primary(x))
        return self.act(self.bn(torch.cat([self.cheap(primary), primary], 1)))


class GhostBottleneck(nn.Module):
    """``GB(in, e, out, s, proj)``: GM(in->e, ReLU6) -> [DW 3x3 e, s + BN] -> [SE(e)] ->
    GM(e->out, linear) -> + shortcut (no activation after the add).

    Args:
        dw_when: when the depthwise layer exists: ``proj`` (flavour P, ResNet 10-12: exactly when
            the block projects, also at stride 1) or ``stride`` (flavour S, ResNet 13/14: exactly
            when stride > 1).
        primary_groups: groups of every ghost module's primary 1x1 (flavour S uses 4, + shuffle).
    """

    def __init__(self, cin: int, e: int, cout: int, stride: int = 1, proj: bool = False, *,
                 dw_when: str = "proj", primary_groups: int = 1, se: bool = False,
                 se_ratio: float = 0.25):
        super().__init__()
        if dw_when not in ("proj", "stride"):
            raise ArchError(f"unknown ghost dw_when {dw_when!r}; valid: proj, stride")
        has_dw = proj if dw_when == "proj" else stride > 1
        _require(has_dw or stride == 1, "a strided ghost bottleneck needs its depthwise layer")
        self.ghost1 = GhostModule(cin, e, act=True, groups=primary_groups)
        self.dw = nn.Sequential(dw3x3(e, stride), nn.BatchNorm2d(e)) if has_dw else None
        self.se = SqueezeExcite(e, se_ratio) if se else None
        self.ghost2 = GhostModule(e, cout, act=False, groups=primary_groups)
        self.shortcut = projection(cin, cout, stride) if proj else None
        _require(proj or cin == cout, f"ghost bottleneck {cin}->{cout} needs a projection")

    def forward(self, x: Tensor) -> Tensor:
        out = self.ghost1(x)
        if self.dw is not None:
            out = self.dw(out)
        if self.se is not None:
            out = self.se(out)
        out = self.ghost2(out)
        return out + (x if self.shortcut is None else self.shortcut(x))


class ConvBNAct(nn.Sequential):
    """``conv kxk cin->cout`` (+bias) + optional BN + activation (``relu``/``relu6``/None)."""

    def __init__(self, cin: int, cout: int, *, kernel: int = 1, bias: bool = False, bn: bool = True,
                 act: str | None = "relu6"):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        if act is not None:
            layers.append(make_act(act))
        super().__init__(*layers)


# ----------------------------------------------------------------------------------------------
# DiCE


def _fit(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize (N, C, H, W) to ``size``: adaptive average pooling when shrinking, else bilinear."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# Shape-dependent branching: a leaf for FX tracing, so int8 graph mode quantizes DiCE models whole.
torch.fx.wrap("_fit")


class DiCE(nn.Module):
    """``DiCE(c->o, H, W)``: dimension-wise convolutions + dimension-wise fusion (DiCENet).

    Channel-, height- and width-wise depthwise 3x3 convs -> cat (3c) -> BN -> ReLU -> shuffle(3)
    -> fusion ``conv 1x1 3c->c, g=c, padding 1`` -> BN -> ReLU; from the fused map a gate
    (adaptive GAP -> 1x1 c->c//4 -> ReLU -> 1x1 ->o -> Sigmoid) and a projection (``conv 3x3
    c->o, g=gcd(c, o), padding 0`` -> BN -> ReLU); output = projection x gate.

    ``size`` = (H, W) the unit is built for (the height/width-wise convs have H and W channels).
    At other input sizes the height/width-wise branches work on the input resized to (H, W) and
    are resized back (the paper's inputs always match, so no resizing happens there).
    """

    def __init__(self, cin: int, cout: int, size: tuple[int, int]):
        super().__init__()
        h, w = size
        _require(cin >= 4, f"DiCE needs at least 4 input channels, got {cin}")
        self.size = (int(h), int(w))
        self.dw_c = dw3x3(cin)
        self.dw_h = dw3x3(h)
        self.dw_w = dw3x3(w)
        self.bn_cat = nn.BatchNorm2d(3 * cin)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(3)
        self.fuse = nn.Conv2d(3 * cin, cin, 1, padding=1, groups=cin, bias=False)
        self.bn_fuse = nn.BatchNorm2d(cin)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cin // 4, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(cin // 4, cout, 1, bias=False), nn.Sigmoid(),
        )
        self.proj = nn.Conv2d(cin, cout, 3, padding=0, groups=math.gcd(cin, cout), bias=False)
        self.bn_proj = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        size = (x.shape[-2], x.shape[-1])
        xs = _fit(x, self.size)
        xh = self.dw_h(xs.transpose(1, 2)).transpose(1, 2)
        xw = self.dw_w(xs.transpose(1, 3)).transpose(1, 3)
        y = torch.cat([self.dw_c(x), _fit(xh, size), _fit(xw, size)], 1)
        y = self.shuffle(self.relu(self.bn_cat(y)))
        y = self.relu(self.bn_fuse(self.fuse(y)))
        return self.relu(self.bn_proj(self.proj(y))) * self.gate(y)


class StridedDiCE(nn.Module):
    """``SDiCE(c->o, H, W)`` (H, W = output size), h = round(o/2): left = DW 3x3 c, s2 + BN +
    ReLU -> 1x1 c->h + BN + ReLU; right = AvgPool(3, 2, 1) -> DiCE(c->h); cat -> shuffle(2)."""

    def __init__(self, cin: int, cout: int, size: tuple[int, int]):
        super().__init__()
        h = int(round(cout / 2))
        self.out_channels = 2 * h
        self.left = nn.Sequential(
            dw3x3(cin, 2), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            conv1x1(cin, h), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
        )
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.right = DiCE(cin, h, size)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(self.pool(x))], 1))


class DiCEBlock(nn.Module):
    """``DB(in, e, out, H, W, s, proj)`` (ResNet 15): 1x1 in->e + BN + ReLU -> SDiCE(e->out)
    when proj and s != 1, else DiCE(e->out) -> + shortcut (no activation after the add).

    Quirk kept for exact counts: every projecting block also owns ``unused_dw`` (DW 3x3 e, s +
    BN(e)) that is never called: 11e parameters, 0 FLOPs. Optional SE on the output before the add.
    """

    def __init__(self, cin: int, e: int, cout: int, size: tuple[int, int], stride: int = 1,
                 proj: bool = False, *, se: bool = False, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = conv1x1(cin, e)
        self.bn1 = nn.BatchNorm2d(e)
        self.relu = nn.ReLU(inplace=True)
        if proj and stride != 1:
            _require(cout % 2 == 0, f"a strided DiCE block needs an even output width, got {cout}")
            self.dice: nn.Module = StridedDiCE(e, cout, size)
        else:
            _require(stride == 1, "a strided DiCE block needs a projection")
            self.dice = DiCE(e, cout, size)
        self.se = SqueezeExcite(cout, se_ratio) if se else nn.Identity()
        self.shortcut = projection(cin, cout, stride) if proj else None
        _require(proj or cin == cout, f"DiCE block {cin}->{cout} needs a projection")
        # Registered, never called (the authors' code): counts in params, not in FLOPs.
        self.unused_dw = nn.Sequential(dw3x3(e, stride), nn.BatchNorm2d(e)) if proj else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.se(self.dice(self.relu(self.bn1(self.conv1(x)))))
        return out + (x if self.shortcut is None else self.shortcut(x))


# ----------------------------------------------------------------------------------------------
# Fire


FIRE_EXPAND3 = ("conv", "grouped", "ghost", "dice")


class FireModule(nn.Module):
    """Fire module: squeeze 1x1 cin->s, then parallel expand 1x1 s->out/2 and expand-3 s->out/2,
    concatenated to ``out`` channels. The forms of the paper (section 2.3):

    ====================  =========================================================================
    ``bn=False``          ResNet fire main path (FireRes): every conv with bias, ReLU after the
                          squeeze and after each expand, no BN; expands carry the ``stride``
    ``conv``, g=1         Fire-A (VGG 5): squeeze with bias feeds both expands raw; expands with
                          bias + BN + ReLU; ``unused_squeeze_bn`` = BN(s) registered, never called
    ``grouped``, g=1      Fire-B (VGG 6/7): squeeze (bias) + BN + ReLU; expand1 (bias) + BN;
                          expand3 = grouped 3x3 s->out/2, g=s ("DW" channel multiplier) + BN; ReLU
    ``grouped``, g>1      Fire-C (VGG 8/12): squeeze 1x1 g (if cin > 24) + BN + ReLU + shuffle;
                          expand1 1x1 g (if s > 24) + BN; expand3 grouped 3x3 (g=s) with an
                          ``unused_expand3_bn``; cat -> shuffle(2g) -> ReLU. No biases
    ``ghost``             Fire-D (g=1) / Fire-E (g>1, VGG 9-11): squeeze GM(cin->s) + ReLU6;
                          expand1 1x1 + BN; expand3 GM(s->out/2) linear, its primary grouped
                          (+ shuffle) when g > 1 and s > 24; cat -> ReLU
    ``dice``              Fire-F (VGG 13): squeeze 1x1, g = gcd(cin, s) if cin > 24, + BN + ReLU +
                          shuffle; expand1 1x1 + BN; expand3 DiCE(s->out/2, ``size``); cat -> ReLU
    ====================  =========================================================================
    """

    def __init__(self, cin: int, cout: int, squeeze: int, *, stride: int = 1,
                 expand3: str = "conv", groups: int = 1, bn: bool = True,
                 size: tuple[int, int] | None = None):
        super().__init__()
        if expand3 not in FIRE_EXPAND3:
            raise ArchError(f"unknown fire expand3 {expand3!r}; valid: {', '.join(FIRE_EXPAND3)}")
        _require(cout % 2 == 0, f"a fire module needs an even output width, got {cout}")
        _require(groups == 1 or expand3 in ("grouped", "ghost"),
                 f"grouped pointwise convs apply to fire expand3 'grouped' or 'ghost', not {expand3!r}")
        _require(bn or (expand3 == "conv" and groups == 1),
                 "the BN-free (residual) fire module only has plain conv expands")
        _require(stride == 1 or not bn, "only the residual fire module is strided")
        e, s = cout // 2, squeeze
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        bnorm = nn.BatchNorm2d
        self.form = "res" if not bn else {"conv": "A", "grouped": "B" if groups == 1 else "C",
                                          "ghost": "D" if groups == 1 else "E", "dice": "F"}[expand3]
        self.post: nn.Module = relu()
        if self.form == "res":
            self.squeeze = nn.Sequential(conv1x1(cin, s, bias=True), relu())
            self.expand1 = nn.Sequential(conv1x1(s, e, stride, bias=True), relu())
            self.expand3 = nn.Sequential(conv3x3(s, e, stride, bias=True), relu())
            self.post = nn.Identity()
        elif self.form == "A":
            self.squeeze = conv1x1(cin, s, bias=True)
            self.unused_squeeze_bn = bnorm(s)  # registered, never called: 2s params, 0 FLOPs
            self.expand1 = nn.Sequential(conv1x1(s, e, bias=True), bnorm(e), relu())
            self.expand3 = nn.Sequential(conv3x3(s, e, bias=True), bnorm(e), relu())
            self.post = nn.Identity()
        elif self.form == "B":
            self.squeeze = nn.Sequential(conv1x1(cin, s, bias=True), bnorm(s), relu())
            self.expand1 = nn.Sequential(conv1x1(s, e, bias=True), bnorm(e))
            self.expand3 = nn.Sequential(conv3x3(s, e, groups=s), bnorm(e))
        elif self.form == "C":
            gs = groups if cin > GROUPED_PW_MIN_WIDTH else 1
            ge = groups if s > GROUPED_PW_MIN_WIDTH else 1
            self.squeeze = nn.Sequential(conv1x1(cin, s, groups=gs), bnorm(s), relu(),
                                         ChannelShuffle(gs))
            self.expand1 = nn.Sequential(conv1x1(s, e, groups=ge), bnorm(e))
            self.expand3 = conv3x3(s, e, groups=s)
            self.unused_expand3_bn = bnorm(e)  # registered, never called: 2e params, 0 FLOPs
            self.post = nn.Sequential(ChannelShuffle(2 * groups), relu())
        elif self.form in ("D", "E"):
            gp = groups if s > GROUPED_PW_MIN_WIDTH else 1
            self.squeeze = GhostModule(cin, s, act=True)
            self.expand1 = nn.Sequential(conv1x1(s, e), bnorm(e))
            self.expand3 = GhostModule(s, e, act=False, groups=gp)
        else:  # F
            _require(size is not None, "a DiCE fire module needs its spatial size")
            gs = math.gcd(cin, s) if cin > GROUPED_PW_MIN_WIDTH else 1
            self.squeeze = nn.Sequential(conv1x1(cin, s, groups=gs), bnorm(s), relu(),
                                         ChannelShuffle(gs))
            self.expand1 = nn.Sequential(conv1x1(s, e), bnorm(e))
            self.expand3 = DiCE(s, e, size)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        s = self.squeeze(x)
        return self.post(torch.cat([self.expand1(s), self.expand3(s)], 1))


class ResidualFire(nn.Module):
    """``FireRes(in, sq, e1, e3, s, proj)`` (ResNet 2): BN-free fire main path (e1 = e3 =
    out/2, stride on the expands) + shortcut (``conv 1x1 in->out, s`` **with bias** + BN, or
    identity); output = main + shortcut, no activation after the add. Optional SE before the add."""

    def __init__(self, cin: int, squeeze: int, cout: int, stride: int = 1, proj: bool = False, *,
                 se: bool = False, se_ratio: float = 0.25):
        super().__init__()
        self.fire = FireModule(cin, cout, squeeze, stride=stride, bn=False)
        self.se = SqueezeExcite(cout, se_ratio) if se else nn.Identity()
        self.shortcut = projection(cin, cout, stride, bias=True) if proj else None
        _require(proj or (cin == cout and stride == 1), f"fire block {cin}->{cout} needs a projection")

    def forward(self, x: Tensor) -> Tensor:
        out = self.se(self.fire(x))
        return out + (x if self.shortcut is None else self.shortcut(x))


# ----------------------------------------------------------------------------------------------
# Heads


class GAPClassifier(nn.Sequential):
    """GAP (adaptive) -> flatten -> ``Linear(cin->nc)`` (bias optional) -> optional Dropout on
    the logits (VGG 2-6 really apply Dropout(0.5) after the linear)."""

    def __init__(self, cin: int, num_classes: int, *, bias: bool = True, dropout: float = 0.0):
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                   nn.Linear(cin, num_classes, bias=bias)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class ConvClassifier(nn.Sequential):
    """No-FC head: ``conv 1x1 cin->nc`` -> [BN(nc)] -> act -> GAP (adaptive) -> flatten.

    VGG 7-13 use a conv with bias and ReLU (BN in 7, 8, 12, 13). The ResNet form (conv without
    bias + BN + ReLU6 inside ``layer4``, GAP from torchvision) is :class:`ConvBNAct`."""

    def __init__(self, cin: int, num_classes: int, *, bn: bool = True, act: str = "relu",
                 bias: bool = True):
        super().__init__(ConvBNAct(cin, num_classes, bias=bias, bn=bn, act=act),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


class FCStack(nn.Sequential):
    """The CIFAR VGG classifier: flatten -> Linear(cin->hidden) -> ReLU -> Dropout(0.5) ->
    Linear(hidden->hidden) -> ReLU -> Dropout(0.5) -> Linear(hidden->nc), all with bias."""

    def __init__(self, cin: int, num_classes: int, hidden: int = 4096, dropout: float = 0.5):
        super().__init__(
            nn.Flatten(1),
            nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

