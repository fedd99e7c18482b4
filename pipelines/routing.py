"""Routing: ordered rules that pick a generator for a series from its DICOM tags.

A rule's ``match`` table maps DICOM keywords to patterns; all must hold, first
matching rule wins. Patterns:

* ``"B7*"``: glob, case-insensitive (``*`` and ``?``)
* ``["B6*", "LUNG"]``: any of the listed patterns
* ``">=2.5"``, ``"<1000"``, ``"1.4..1.6"``: numeric comparison or inclusive range
* ``"re:^T1.*"``: regular expression (``re.search``, case-insensitive)
* a bare number, or a quoted plain number (``"3"``) for a keyword whose VR is numeric (DS, IS,
  FL, FD, US, UL, SS, SL, SV, UV): numeric equality, so ``MagneticFieldStrength = "3"``
  matches ``3.0``; for a text keyword a quoted number stays a glob (``SeriesNumber`` is IS:
  numeric; ``StationName = "3"`` is text)

A multi-valued element (``ImageType``, ``ScanningSequence``) matches when the pattern
matches the backslash-joined value or any single value of it. Routing looks only at
series-level values: when the images of a series disagree on a routing tag the series is
flagged as inconsistent, never guessed. An enhanced (multi-frame) instance keeps most
acquisition tags (``ConvolutionKernel``, ``KVP``, ``RepetitionTime``, ``FlipAngle`` ...) in
its functional groups: a tag absent at the top level is read from the Shared Functional
Groups, else from every frame's Per-Frame Functional Groups (each frame is then one image
that may disagree); ``EchoTime`` and ``InversionTime`` are read there under their enhanced
names ``EffectiveEchoTime`` and ``InversionTimes``. A series that dicomnode itself derived
(its provenance is in the instances) matches no rule: it is never harmonised twice.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from pipelines.derived import already_harmonised
from pipelines.series import element_text, harmonisable_images, not_harmonisable, set_aside

_NUMERIC = re.compile(r"^\s*(>=|<=|>|<|==)?\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")
_RANGE = re.compile(
    r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*\.\.\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")
ROUTE_KEYS = {"name", "model", "send_to", "match", "target", "target_domain", "domains"}
NUMERIC_VRS = {"DS", "IS", "FL", "FD", "US", "UL", "SS", "SL", "SV", "UV"}
# Enhanced MR names for what single-frame MR calls these (MR Echo and MR Modifier macros).
ENHANCED_NAMES = {"EchoTime": "EffectiveEchoTime", "InversionTime": "InversionTimes"}


class RoutingError(ValueError):
    """A routing rule that cannot be understood."""


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern; ``test`` answers whether a value string matches it."""

    text: str
    kind: str  # glob | regex | numeric | range
    regex: re.Pattern[str] | None = None
    op: str = "=="
    low: float = math.nan
    high: float = math.nan

    @classmethod
    def parse(cls, raw: Any, where: str, numeric: bool = False) -> Pattern:
        """``numeric``: the keyword's VR is a number, so a plain number compares as one."""
        if isinstance(raw, bool):
            raise RoutingError(f"{where}: pattern must be a string or number, got {raw!r}")
        if isinstance(raw, int | float):
            return cls(str(raw), "numeric", op="==", low=float(raw))
        if not isinstance(raw, str) or raw == "":
            raise RoutingError(f"{where}: pattern must be a non-empty string or number,"
                               f" got {raw!r}")
        if raw.startswith("re:"):
            try:
                return cls(raw, "regex", regex=re.compile(raw[3:], re.IGNORECASE))
            except re.error as exc:
                raise RoutingError(f"{where}: bad regular expression {raw[3:]!r}: {exc}") from None
        if m := _RANGE.match(raw):
            low, high = float(m.group(1)), float(m.group(2))
            if low > high:
                raise RoutingError(f"{where}: range {raw!r} has its low end above its high end")
            return cls(raw, "range", low=low, high=high)
        if (m := _NUMERIC.match(raw)) and (m.group(1) or numeric):
            return cls(raw, "numeric", op=m.group(1) or "==", low=float(m.group(2)))
        glob = re.compile(fnmatch.translate(raw), re.IGNORECASE | re.DOTALL)
        return cls(raw, "glob", regex=glob)

    def test(self, value: str) -> bool:
        if self.kind == "glob":
            assert self.regex is not None
            return self.regex.fullmatch(value.strip()) is not None
        if self.kind == "regex":
            assert self.regex is not None
            return self.regex.search(value) is not None
        try:
            number = float(value)
        except ValueError:
            return False
        if self.kind == "range":
            return self.low <= number <= self.high
        return {
            "==": number == self.low, ">=": number >= self.low, "<=": number <= self.low,
            ">": number > self.low, "<": number < self.low,
        }[self.op]


@dataclass(frozen=True)
class Condition:
    """``keyword`` must match any of ``patterns``."""

    keyword: str
    patterns: tuple[Pattern, ...]

    def describe(self) -> str:
        return " | ".join(p.text for p in self.patterns)

    def test(self, value: str | None) -> bool:
        if value is None:
            return False
        candidates = [value, *value.split("\\")] if "\\" in value else [value]
        return any(p.test(c) for p in self.patterns for c in candidates)


@dataclass(frozen=True)
class Route:
    """A routing rule. ``target_domain``: the domain a multi-domain model converts every
    series the rule matches to; ``domains``: per domain of such a model, the series-level
    conditions that select its series in the spool (``train site``)."""

    name: str
    model: str
    send_to: tuple[str, ...] = ()
    match: tuple[Condition, ...] = ()
    target: tuple[Condition, ...] = ()
    target_domain: str | None = None
    domains: tuple[tuple[str, tuple[Condition, ...]], ...] = ()

    def describe(self) -> str:
        """``route R (model M[, target domain D])``."""
        to = f", target domain {self.target_domain}" if self.target_domain else ""
        return f"route {self.name} (model {self.model}{to})"


@dataclass(frozen=True)
class RuleVerdict:
    route: Route
    matched: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RoutingDecision:
    """The outcome for one series: the chosen route (or None) and every rule's verdict.

    ``flagged`` is set when images disagree on a tag that decides a rule (some images
    would match it, some not): the series is then routed nowhere rather than guessed.
    ``skipped`` says why no rule was even tried (the series is dicomnode's own output).
    ``set_aside`` names the series' instances the rules did not see (a scanner's raw data).
    """

    route: Route | None
    verdicts: tuple[RuleVerdict, ...]
    conflicts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    flagged: str | None = None
    skipped: str | None = None
    set_aside: str | None = None

    @property
    def inconsistent(self) -> bool:
        return self.flagged is not None

    def summary(self) -> str:
        """One line: the route, or why there is none."""
        if self.route is not None:
            return self.route.describe()
        if self.flagged:
            return f"flagged: {self.flagged}"
        return self.skipped or "no route matches"

    def explain(self) -> list[str]:
        lines = [f"  ! {self.skipped}: no rule is tried"] if self.skipped else []
        if self.set_aside:
            lines.append(f"  - {self.set_aside}; the rules see the others")
        for keyword, values in self.conflicts.items():
            lines.append(f"  ! {keyword} differs across images: {', '.join(values)}")
        for verdict in self.verdicts:
            mark = "matched" if verdict.matched else "no"
            lines.append(f"  {verdict.route.name}: {mark}: {'; '.join(verdict.reasons)}")
        return lines


def _conditions(raw: Any, where: str) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise RoutingError(f"{where} must be a table of DICOM keyword = pattern")
    conditions = []
    for keyword, value in raw.items():
        if tag_for_keyword(keyword) is None:
            raise RoutingError(f"{where}: unknown key '{keyword}' (not a DICOM keyword)")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise RoutingError(f"{where}.{keyword}: empty pattern list")
        numeric = any(vr in NUMERIC_VRS for vr in dictionary_VR(keyword).split(" or "))
        patterns = tuple(Pattern.parse(v, f"{where}.{keyword}", numeric) for v in values)
        conditions.append(Condition(keyword, patterns))
    return tuple(conditions)


def parse_routes(raw: Any, source: str = "config") -> list[Route]:
    """Validate the ``[[routes]]`` array of a config file into :class:`Route` objects."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RoutingError(f"{source}: [[routes]] must be an array of tables")
    routes: list[Route] = []
    for i, item in enumerate(raw):
        where = f"{source}: [[routes]] #{i + 1}"
        if not isinstance(item, Mapping):
            raise RoutingError(f"{where} must be a table")
        unknown = set(item) - ROUTE_KEYS
        if unknown:
            raise RoutingError(f"{where}: unknown key '{sorted(unknown)[0]}'"
                               f" (known: {', '.join(sorted(ROUTE_KEYS))})")
        name, model = item.get("name"), item.get("model")
        if not isinstance(name, str) or not name:
            raise RoutingError(f"{where}: 'name' must be a non-empty string")
        where = f"{source}: route '{name}'"
        if not isinstance(model, str) or not model:
            raise RoutingError(f"{where}: 'model' must be a non-empty string")
        send_to = item.get("send_to", [])
        if not isinstance(send_to, list) or not all(isinstance(s, str) for s in send_to):
            raise RoutingError(f"{where}: 'send_to' must be a list of AE titles")
        if any(r.name == name for r in routes):
            raise RoutingError(f"{where}: route name used twice")
        target_domain = item.get("target_domain")
        if target_domain is not None and (not isinstance(target_domain, str)
                                          or not target_domain):
            raise RoutingError(f"{where}: 'target_domain' must be a non-empty string")
        routes.append(Route(name=name, model=model, send_to=tuple(s.strip() for s in send_to),
                            match=_conditions(item.get("match"), f"{where} match"),
                            target=_conditions(item.get("target"), f"{where} target"),
                            target_domain=target_domain,
                            domains=_domains(item.get("domains"), target_domain, where)))
    return routes


def _domains(raw: Any, target_domain: str | None, where: str
             ) -> tuple[tuple[str, tuple[Condition, ...]], ...]:
    """``[routes.domains.NAME]`` tables: each domain's selection, for ``train site``."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise RoutingError(f"{where} domains must be tables [routes.domains.NAME] of DICOM"
                           " keyword = pattern")
    if target_domain not in raw:
        raise RoutingError(f"{where}: 'target_domain' must name one of its domains tables"
                           f" ({', '.join(raw)}), got {target_domain!r}")
    return tuple((str(name), _conditions(table, f"{where} domains.{name}"))
                 for name, table in raw.items())


def _group_value(item: Any, keyword: str) -> str | None:
    """``keyword`` in one functional-groups item, whose elements are one-item sequences
    (PS3.3 C.7.6.16: one functional group macro each)."""
    for element in item:
        if element.VR == "SQ":
            for inner in element.value:
                if keyword in inner:
                    return element_text(inner, keyword)
    return None


def image_values(dataset: Any, keyword: str) -> list[str | None]:
    """``keyword`` as routing sees it in one instance: one value, or one per frame when an
    enhanced instance keeps it in its Per-Frame Functional Groups (module doc)."""
    value = element_text(dataset, keyword)
    shared = dataset.get("SharedFunctionalGroupsSequence") or [None]
    frames = dataset.get("PerFrameFunctionalGroupsSequence") or []
    if value is not None or (shared[0] is None and not frames):
        return [value]
    for name in (keyword, ENHANCED_NAMES.get(keyword)):
        if name is None:
            continue
        if shared[0] is not None and (value := _group_value(shared[0], name)) is not None:
            return [value]
        per_frame = [_group_value(item, name) for item in frames]
        if any(v is not None for v in per_frame):
            return per_frame
    return [None]


def series_values(datasets: Sequence[Any], keywords: Iterable[str]) -> tuple[
        dict[str, str | None], dict[str, tuple[str, ...]]]:
    """Series-level value of each keyword, and the keywords whose images disagree."""
    values: dict[str, str | None] = {}
    conflicts: dict[str, tuple[str, ...]] = {}
    for keyword in keywords:
        seen = sorted({v or "" for ds in datasets for v in image_values(ds, keyword)})
        if len(seen) > 1:
            conflicts[keyword] = tuple(v or "<absent>" for v in seen)
        values[keyword] = seen[0] or None if seen else None
    return values, conflicts


def _test(cond: Condition, values: Mapping[str, str | None],
          conflicts: Mapping[str, tuple[str, ...]]) -> tuple[bool | None, str]:
    """True / False, or None when images disagree on whether the condition holds."""
    if cond.keyword in conflicts:
        seen = [None if v == "<absent>" else v for v in conflicts[cond.keyword]]
        hits = [cond.test(v) for v in seen]
        if all(hits) or not any(hits):
            verdict = "all match" if hits[0] else "none match"
            return hits[0], f"{cond.keyword} values {list(conflicts[cond.keyword])}: {verdict}" \
                f" {cond.describe()}"
        split = ", ".join(f"{v or '<absent>'!r} {'matches' if h else 'does not'}"
                          for v, h in zip(seen, hits, strict=True))
        return None, f"{cond.keyword} differs across images ({split} {cond.describe()})"
    value = values.get(cond.keyword)
    hit = cond.test(value)
    shown = "<absent>" if value is None else repr(value)
    return hit, (f"{cond.keyword}={shown} {'matches' if hit else 'does not match'}"
                 f" {cond.describe()}")


def evaluate(conditions: Sequence[Condition], values: Mapping[str, str | None],
             conflicts: Mapping[str, tuple[str, ...]] | None = None) -> tuple[
        bool | None, list[str]]:
    """Whether all conditions hold (None: undecidable), with one reason per condition."""
    results = [_test(c, values, conflicts or {}) for c in conditions]
    reasons = [r for _, r in results] or ["no conditions (matches everything)"]
    hits = [h for h, _ in results]
    if False in hits:
        return False, reasons
    return (None if None in hits else True), reasons


def never_routed(datasets: Sequence[Any]) -> str | None:
    """Why a series is never harmonised, whatever the routes say (or a forced route or
    model): dicomnode derived it, or it is no series of images to harmonise."""
    return already_harmonised(datasets) or not_harmonisable(datasets)


def route_series(datasets: Sequence[Any], routes: Sequence[Route]) -> RoutingDecision:
    """Choose the first route whose ``match`` holds for this series' instances.

    A rule that images disagree on (some would match it, some not) stops routing: the
    series is flagged instead of falling through to a later, possibly wrong, rule. A series
    dicomnode derived, or one it cannot harmonise (reports, colour, scouts), is ``skipped``
    before any rule. Rules see only the series' harmonisable images: other objects sharing
    its UID (a scanner's raw data) lack the images' tags.
    """
    if skipped := never_routed(datasets):
        return RoutingDecision(None, (), skipped=skipped)
    aside = set_aside(datasets)
    datasets = harmonisable_images(datasets)
    keywords = {c.keyword for r in routes for c in r.match}
    values, conflicts = series_values(datasets, sorted(keywords))
    verdicts: list[RuleVerdict] = []
    for route in routes:
        ok, reasons = evaluate(route.match, values, conflicts)
        verdicts.append(RuleVerdict(route, bool(ok), tuple(reasons)))
        if ok is None:
            why = next(r for r in reasons if "differs across images" in r)
            return RoutingDecision(None, tuple(verdicts), conflicts,
                                   flagged=f"rule '{route.name}' undecidable: {why}",
                                   set_aside=aside)
        if ok:
            return RoutingDecision(route, tuple(verdicts), conflicts, set_aside=aside)
    return RoutingDecision(None, tuple(verdicts), conflicts, set_aside=aside)
