"""SQL that narrows a query to the series that could match it, from the expression indexes
on the attributes queries commonly use (:data:`dicomnode.store.index.QUERY_ATTRS`).

Each filtering key on one of those attributes becomes a condition on the indexed
expression that holds for every value the key matches (:func:`dicomnode.store.query.match`)
and for more: a range over the key's literal prefix for text (up to its first wildcard;
case-folded for person names), the same comparisons for eight-digit dates. A series is a
candidate when one of its instances meets the condition, or has a value the indexes do not
order as matching compares it (``irregular_expr``). The candidates are a superset of the
matches, never fewer, whatever the key: the exact match in Python still decides, so the
answers are those of matching every series, only sooner.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomnode.store.index import QUERY_ATTRS, attr_expr, irregular_expr
from dicomnode.store.query import (
    WILDCARD_VRS,
    Key,
    Query,
    _has_wildcard,
    _norm,
)


@dataclass(frozen=True)
class Condition:
    """What an instance whose ``keyword`` value may match meets: one of ``options``
    (SQL over ``instances.attrs``, and its arguments) or the irregular values'."""

    keyword: str
    options: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def parts(self) -> list[tuple[str, tuple[str, ...]]]:
        """The SQL conditions, each for one index: the options', the irregular values'."""
        return [*self.options, (irregular_expr(), ())]

    def series(self) -> tuple[str, list[str]]:
        """A subquery: the UIDs of the series with such an instance (from the indexes)."""
        return (" UNION ALL ".join(f"SELECT series_uid FROM instances WHERE {sql}"
                                   for sql, _ in self.parts),
                [a for _, args in self.parts for a in args])


def _after(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix`` (in SQLite's
    byte order, which is code point order); None when there is none."""
    while prefix:
        code = ord(prefix[-1]) + 1
        if code == 0xD800:
            code = 0xE000
        if code <= 0x10FFFF:
            return prefix[:-1] + chr(code)
        prefix = prefix[:-1]
    return None


def _prefix_sql(expr: str, prefix: str) -> tuple[str, tuple[str, ...]] | None:
    if not prefix or "\x00" in prefix:
        return None
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate cannot be bound
        return None
    after = _after(prefix)
    if after is None:
        return f"{expr} >= ?", (prefix,)
    return f"{expr} >= ? AND {expr} < ?", (prefix, after)


def _text_prefix(vr: str, pattern: str) -> str:
    """The literal start every value matching ``pattern`` (stripped, one option) has."""
    if vr in WILDCARD_VRS and _has_wildcard(pattern):
        cut = min(i for i in (pattern.find("*"), pattern.find("?")) if i >= 0)
        return pattern[:cut]
    return pattern


def _person_prefix(pattern: str) -> str:
    """The folded start of every person name ``pattern`` matches: its ASCII characters up
    to the first wildcard or other character, lower case."""
    if not _has_wildcard(pattern):
        pattern = pattern.rstrip("^ ")  # an exact name ignores trailing empty components
    out = []
    for char in pattern:
        if char in "*?" or not char.isascii():
            break
        out.append(char.lower())
    return "".join(out)


def _option_sql(vr: str, expr: str, option: str) -> tuple[str, tuple[str, ...]] | None:
    """A condition every value matching one option (stripped) meets, or None: any."""
    if vr == "DA":
        if "-" in option:
            low, _, high = option.partition("-")
            terms, args = [], []
            if low.strip():
                terms.append(f"{expr} >= ?")
                args.append(_norm(vr, low))
            if high.strip():
                terms.append(f"{expr} <= ?")
                args.append(_norm(vr, high))
            return (" AND ".join(terms), tuple(args)) if terms else None
        return f"{expr} = ?", (_norm(vr, option),)
    if vr == "PN":
        return _prefix_sql(expr, _person_prefix(option))
    return _prefix_sql(expr, _text_prefix(vr, option))


def condition(key: Key) -> Condition | None:
    """The condition for a filtering key on one of QUERY_ATTRS (ModalitiesInStudy: on
    the Modality of the study's series), or None where the key cannot narrow."""
    keyword, vr = key.keyword, key.vr
    if keyword == "ModalitiesInStudy":
        keyword, vr = "Modality", "CS"  # matched as CS whatever the identifier's VR
    if QUERY_ATTRS.get(keyword) != vr:
        return None
    pattern = key.value.strip()
    options = [p.strip() for p in pattern.split("\\") if p.strip()] if "\\" in pattern \
        else [pattern]
    expr = attr_expr(keyword)
    found = [_option_sql(vr, expr, option) for option in options]
    if any(f is None for f in found):
        return None
    return Condition(key.keyword, tuple(f for f in found if f is not None))


def conditions(query: Query) -> list[Condition]:
    """The conditions of the query's filtering keys that can narrow."""
    return [c for k in query.filters() if (c := condition(k)) is not None]
