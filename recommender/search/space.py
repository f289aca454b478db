"""Search spaces: a YAML file -> Optuna suggestions -> a :class:`~recommender.recipe.Recipe`.

A space file has three sections, ``arch``, ``prune`` and ``quant``, whose keys are the fields of
:class:`ArchConfig`, :class:`PruneConfig` and :class:`QuantConfig`. Each key is one dimension::

    arch:
      block: {choices: [bottleneck, ghost, inverted-residual]}
      se: {choices: [false, true], when: {block: [ghost]}}      # conditional dimension
      width_multiplier: {low: 0.25, high: 1.0, step: 0.25}       # float (int if all ints)
      stem: {value: dws}                                        # fixed, not searched
    prune:
      method: {choices: [none, unstructured-l1, structured-channel]}
      sparsity: {low: 0.1, high: 0.9, step: 0.1, when: {method: [unstructured-l1, structured-channel]}}
    warm_start: [paper-resnet101-11, paper-resnet101-13]          # presets enqueued first

Optional int8 dimensions (fields of ``Int8StaticConfig``; a space without them searches today's
post-training int8, every field at its default)::

    quant:
      scheme: {choices: [fp32, int8-static]}
      observer: {choices: [minmax, histogram, percentile], when: {scheme: int8-static}}
      per_channel: {choices: [true, false], when: {scheme: int8-static}}
      keep_float: {choices: [0, 1, 2, 4], when: {scheme: int8-static}}   # mixed precision
      qat_epochs: {choices: [0, 1], when: {scheme: int8-static}}        # 0 = post-training

``keep_float`` keeps the k layers most sensitive to int8 in float (measured once per study on the
trained baseline); ``qat_epochs`` fine-tunes with fake quantization before conversion.

A dimension exists only when every parent named in ``when`` is itself active and takes one of the
listed values (a parent in another section is written ``section.field``). An inactive dimension
keeps the dataclass default. Choices that are lists (per-stage widths) are passed to Optuna as
JSON strings, since Optuna's categorical values must be scalars.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from .. import limits
from ..compress.methods import STAGES, stage_fields
from ..errors import SearchSpaceError
from ..models.arch import ArchConfig
from ..models.registry import get_family
from ..recipe import Recipe
from ..resources import bundled, bundled_names

SECTIONS: tuple[str, ...] = ("arch", *STAGES)
#: The space of a model whose family names none: what applies to any module.
GENERIC_SPACE = "generic.yaml"


def section_fields(section: str) -> set[str]:
    """The keys a space may give in a section: ArchConfig fields, or the options of the stage's
    registered compression methods (plus ``method`` / ``scheme``)."""
    if section == "arch":
        return {f.name for f in fields(ArchConfig)}
    return stage_fields(section)


def bundled_spaces() -> list[str]:
    """File names of the bundled search spaces."""
    return bundled_names()


def bundled_space_name(path: str | Path) -> str | None:
    """The bundled space file ``path`` names (``trained`` or ``trained.yaml``), when no file of
    that name exists: a file always wins over a bundled name."""
    text = str(path)
    if Path(text).exists() or "/" in text or "\\" in text:
        return None
    name = text if text.endswith(".yaml") else f"{text}.yaml"
    return name if name in bundled_spaces() else None


def _encode(value: Any) -> Any:
    """Optuna categorical values must be None, bool, int, float or str."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Equality that treats tuples and lists alike and floats up to rounding."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


@dataclass(frozen=True)
class Dimension:
    """One searchable (or fixed) field of a recipe section.

    Args:
        section: ``arch``, ``prune`` or ``quant``.
        name: the dataclass field.
        choices: categorical values (mutually exclusive with low/high and value).
        low, high, step, log: a numeric range; int if low, high and step are all ints.
        value: a fixed value (the dimension is not searched).
        when: parents that must be active with one of the listed values.
    """

    section: str
    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    value: Any = None
    fixed: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def key(self) -> str:
        """Optuna parameter name, e.g. ``arch.block``."""
        return f"{self.section}.{self.name}"

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high)) and (
            self.step is None or isinstance(self.step, int))

    def active(self, assigned: Mapping[str, Any]) -> bool:
        for parent, allowed in self.when:
            if parent not in assigned:
                return False
            if not any(_same(assigned[parent], a) for a in allowed):
                return False
        return True

    def suggest(self, trial: Any) -> Any:
        if self.fixed:
            return self.value
        if self.choices is not None:
            return _decode(trial.suggest_categorical(self.key, [_encode(c) for c in self.choices]))
        if self.is_int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def distribution(self) -> BaseDistribution | None:
        """The Optuna distribution :meth:`suggest` asks for (None for a fixed dimension)."""
        if self.fixed:
            return None
        if self.choices is not None:
            return CategoricalDistribution([_encode(c) for c in self.choices])
        if self.is_int:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        if self.fixed:
            return _same(value, self.value)
        if self.choices is not None:
            return any(_same(value, c) for c in self.choices)
        try:
            v = float(value)
        except (TypeError, ValueError):
            return False
        if not (self.low - 1e-9 <= v <= self.high + 1e-9):
            return False
        if self.step:
            k = (v - self.low) / self.step
            return abs(k - round(k)) < 1e-6
        return True

    def encode(self, value: Any) -> Any:
        """The Optuna parameter value for a config value (for enqueueing presets)."""
        if self.choices is not None:
            for c in self.choices:
                if _same(value, c):
                    return _encode(c)
        if self.is_int:
            return int(value)
        return float(value) if self.low is not None else value


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of dimensions over the three recipe sections, plus warm-start presets."""

    family: str
    dimensions: tuple[Dimension, ...]
    warm_start: tuple[str, ...] = ()
    source: str = ""
    fixed_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        """Read and validate a space file; any problem is a one-line :class:`SearchSpaceError`."""
        from ..io import read_text

        p = Path(path)
        text = read_text(p, "search space", "space_bytes", error=SearchSpaceError)
        return cls.parse(text, str(p))

    @classmethod
    def load_bundled(cls, name: str) -> "SearchSpace":
        """A search space shipped with the package (``resnet.yaml``, ``generic.yaml``, ...)."""
        return cls.parse(bundled(name).read_text(), f"search_spaces/{name}")

    @classmethod
    def parse(cls, text: str, source: str) -> "SearchSpace":
        """A space from YAML text; its size (aliases expanded) is bounded before it is built."""
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                limits.check("space_nodes", _expanded_nodes(node), f"search space {source}: YAML nodes",
                             error=SearchSpaceError)
            raw = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "syntax error"
            raise SearchSpaceError(f"search space {source} is not valid YAML: {first}") from None
        except RecursionError:
            raise SearchSpaceError(f"search space {source} is nested too deeply") from None
        finally:
            loader.dispose()
        return cls.from_dict(raw, source=source)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> "SearchSpace":
        def bad(msg: str) -> SearchSpaceError:
            return SearchSpaceError(f"search space {source}: {msg}")

        if not isinstance(raw, dict):
            raise bad("top level must be a mapping with arch, prune and quant sections")
        unknown = set(raw) - {"family", "description", "warm_start", *SECTIONS}
        if unknown:
            raise bad(f"unknown top-level keys {sorted(unknown)}")
        dims: list[Dimension] = []
        seen: set[str] = set()
        for section in SECTIONS:
            body = raw.get(section) or {}
            if not isinstance(body, dict):
                raise bad(f"section {section!r} must be a mapping")
            valid = section_fields(section)
            for name, spec in body.items():
                if name not in valid:
                    what = "ArchConfig" if section == "arch" else f"any registered {section} method"
                    raise bad(f"{section}.{name} is not an option of {what} (valid: {', '.join(sorted(valid))})")
                dims.append(_dimension(section, name, spec, seen, bad))
                seen.add(f"{section}.{name}")
        warm = raw.get("warm_start") or []
        if not isinstance(warm, list) or not all(isinstance(w, str) for w in warm):
            raise bad("warm_start must be a list of preset names")
        limits.check("space_dimensions", len(dims), f"search space {source}: dimensions", error=SearchSpaceError)
        space = cls(str(raw.get("family", "")), tuple(dims), tuple(warm), source)
        space.check_draws()
        return space

    @classmethod
    def for_model(cls, model: str, path: str | Path | None = None) -> "SearchSpace":
        """The space given by ``path`` (a file, or the name of a bundled space such as
        ``trained``), or the bundled one of the model's family (the generic
        pruning x quantization space for a family that names none), without the architecture
        dimensions the model does not support (and those that depend on them)."""
        fam = get_family(model)
        if path is not None:
            name = bundled_space_name(path)
            if name:
                return cls.load_bundled(name)
            if not Path(path).exists() and Path(path).name == str(path) and not str(path).endswith(".yaml"):
                names = ", ".join(n.removesuffix(".yaml") for n in bundled_spaces())
                raise SearchSpaceError(f"search space {str(path)!r}: no such file, and no bundled space of that "
                                       f"name (bundled: {names})")
            return cls.load(path)
        return cls.load_bundled(fam.space or GENERIC_SPACE).restricted(fam.techniques_for(model))

    def restricted(self, techniques: Iterable[str]) -> "SearchSpace":
        """This space without the arch dimensions outside ``techniques`` (and their dependants)."""
        allowed = set(techniques)
        keep: list[Dimension] = []
        dropped: set[str] = set()
        for d in self.dimensions:
            if (d.section == "arch" and d.name not in allowed) or any(p in dropped for p, _ in d.when):
                dropped.add(d.key)
                continue
            keep.append(d)
        if not dropped:
            return self
        return SearchSpace(self.family, tuple(keep), self.warm_start, self.source, self.fixed_defaults)

    # -- validation --------------------------------------------------------------------------
    #: Most combinations of the compression dimensions enumerated by :meth:`check_draws`.
    MAX_CHECKED = 20_000

    def check_draws(self) -> None:
        """Every draw of this space builds a valid recipe, else a one-line
        :class:`SearchSpaceError` naming a draw that does not (a ``prune.step`` without
        ``when: {method: unstructured-l1}`` draws ``{method: none, step: 0.35}``). The
        compression dimensions are enumerated together (their choices, a range's ends), each
        architecture value is checked alone (whether a model can build a combination is known
        when it is built)."""
        def bad(msg: str) -> SearchSpaceError:
            return SearchSpaceError(f"search space {self.source}: {msg}")

        for d in self.dimensions:
            if d.section != "arch":
                continue
            for v in _ends(d):
                try:
                    ArchConfig.from_dict({d.name: v})
                except Exception as exc:
                    raise bad(f"{d.key} = {v!r} is not a valid value: {exc}") from None
        stage_dims = [d for d in self.dimensions if d.section != "arch"]
        count = 0
        for assigned in _assignments(stage_dims, {}):
            count += 1
            if count > self.MAX_CHECKED:
                return
            parts: dict[str, dict[str, Any]] = {s: {} for s in STAGES}
            for key, value in assigned.items():
                section, name = key.split(".", 1)
                parts[section][name] = value
            for stage, body in parts.items():
                try:
                    from ..compress.methods import make_config

                    make_config(stage, body)
                except Exception as exc:
                    shown = ", ".join(f"{k}: {v}" for k, v in assigned.items() if k.startswith(stage + "."))
                    raise bad(f"a draw builds an invalid {stage} stage ({{{shown}}}): {exc} "
                              "(make the dimension depend on its method with when:)") from None

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, trial: Any) -> Recipe:
        """Suggest every active dimension on an Optuna trial and build the recipe."""
        assigned: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.active(assigned):
                assigned[dim.key] = dim.suggest(trial)
        return self.recipe(assigned)

    def recipe(self, assigned: Mapping[str, Any]) -> Recipe:
        """Build a recipe from ``{"section.field": value}``; absent fields keep their defaults."""
        parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, value in assigned.items():
            section, name = key.split(".", 1)
            parts[section][name] = value
        return Recipe.from_dict(parts)

    def params_for(self, recipe: Recipe) -> dict[str, Any]:
        """The Optuna parameters that reproduce ``recipe``; raises if it is not a point of the space."""
        values = recipe.to_dict()
        assigned: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for dim in self.dimensions:
            if not dim.active(assigned):
                continue
            value = values[dim.section].get(dim.name)
            if dim.section != "arch" and dim.name not in values[dim.section]:
                # a field left out of the recipe's dict at its default (``keyed_if_set``)
                value = getattr(getattr(recipe, dim.section), dim.name, None)
            if not dim.contains(value):
                raise SearchSpaceError(
                    f"{dim.key}={value!r} is outside the search space {self.source}")
            assigned[dim.key] = value
            if not dim.fixed:
                params[dim.key] = dim.encode(value)
        rebuilt = self.recipe(assigned)
        if rebuilt != recipe:
            diff = _diff(recipe, rebuilt)
            raise SearchSpaceError(
                f"recipe is not a point of the search space {self.source}: {diff}")
        return params

    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions if not d.fixed]

    def distributions(self) -> dict[str, BaseDistribution]:
        """Every searched parameter's Optuna distribution, active or not (for samplers that
        draft whole candidates, :class:`~recommender.search.sampling.FeasibleSampler`)."""
        return {d.key: dist for d in self.dimensions if (dist := d.distribution()) is not None}


def _ends(dim: Dimension) -> list[Any]:
    """The values :meth:`SearchSpace.check_draws` tries: every choice, a range's two ends."""
    if dim.fixed:
        return [dim.value]
    if dim.choices is not None:
        return list(dim.choices)
    if dim.is_int:
        return [int(dim.low), int(dim.high)]
    return [float(dim.low), float(dim.high)]


def _assignments(dims: list[Dimension], assigned: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Every active assignment of ``dims`` (in order) with the values of :func:`_ends`."""
    for i, d in enumerate(dims):
        if d.active(assigned):
            for v in _ends(d):
                yield from _assignments(dims[i + 1:], {**assigned, d.key: v})
            return
    yield assigned


def _expanded_nodes(root: yaml.Node) -> int:
    """Nodes of a composed YAML document with every alias expanded (an alias repeats a shared
    subtree: counted once per use), computed over the shared graph without expanding it; a
    recursive alias counts as unbounded."""
    cap = 10 * limits.limit("space_nodes").high  # enough to refuse: sums grow exponentially
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # post-order without recursion: a deep document must not overflow the stack
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if done:
            open_.discard(id(node))
            sizes[id(node)] = min(cap, 1 + sum(sizes[id(c)] for c in _children(node)))
            continue
        if id(node) in open_:
            return cap  # a recursive alias: the document is infinite
        open_.add(id(node))
        stack.append((node, True))
        for c in _children(node):
            if id(c) in open_:
                return cap
            if id(c) not in sizes:
                stack.append((c, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    return []


def _diff(want: Recipe, got: Recipe) -> str:
    out = []
    for section in SECTIONS:
        a = want.to_dict()[section]
        b = got.to_dict()[section]
        for k in sorted(set(a) | set(b)):
            if not _same(a.get(k), b.get(k)):
                out.append(f"{section}.{k}: wanted {a.get(k)!r}, the space gives {b.get(k)!r}")
    return "; ".join(out) or "differs"


def _dimension(section: str, name: str, spec: Any, seen: set[str], bad: Any) -> Dimension:
    key = f"{section}.{name}"
    if not isinstance(spec, dict):
        raise bad(f"{key} must be a mapping with choices, low/high or value")
    allowed = {"choices", "low", "high", "step", "log", "value", "when"}
    extra = set(spec) - allowed
    if extra:
        raise bad(f"{key} has unknown keys {sorted(extra)} (allowed: {', '.join(sorted(allowed))})")
    when: list[tuple[str, tuple[Any, ...]]] = []
    cond = spec.get("when") or {}
    if not isinstance(cond, dict):
        raise bad(f"{key}.when must be a mapping of parent dimension -> allowed values, "
                  f"e.g. when: {{block: [ghost]}}; got {cond!r}")
    for parent, vals in cond.items():
        if not isinstance(parent, str) or not parent:
            raise bad(f"{key}.when names a parent {parent!r}; parents are dimension names such as block "
                      "or prune.method")
        if isinstance(vals, dict):
            raise bad(f"{key}.when.{parent} must be a value or a list of values, got a mapping")
        qual = parent if "." in parent else f"{section}.{parent}"
        if qual not in seen:
            raise bad(f"{key} depends on {qual}, which must be a dimension listed before it")
        vals = vals if isinstance(vals, list) else [vals]
        when.append((qual, tuple(vals)))
    kinds = [k for k in ("choices", "value") if k in spec] + (["range"] if "low" in spec or "high" in spec else [])
    if len(kinds) != 1:
        raise bad(f"{key} needs exactly one of choices, low/high or value")
    if "value" in spec:
        return Dimension(section, name, value=spec["value"], fixed=True, when=tuple(when))
    if "choices" in spec:
        ch = spec["choices"]
        if not isinstance(ch, list) or not ch:
            raise bad(f"{key}.choices must be a non-empty list")
        limits.check("space_choices", len(ch), f"{key}.choices: their number", error=SearchSpaceError)
        return Dimension(section, name, choices=tuple(tuple(c) if isinstance(c, list) else c for c in ch),
                         when=tuple(when))
    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise bad(f"{key} needs finite numeric low and high")
    if low > high:
        raise bad(f"{key} has low > high")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step)
                             or step <= 0):
        raise bad(f"{key}.step must be a positive number")
    if not isinstance(spec.get("log", False), bool):
        raise bad(f"{key}.log must be true or false, got {spec.get('log')!r}")
    return Dimension(section, name, low=low, high=high, step=step, log=bool(spec.get("log", False)),
                     when=tuple(when))
