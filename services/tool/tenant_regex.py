"""Regular expressions that tenants write (JSON Schema ``pattern``, ``patternProperties``), run on RE2.

Python's ``re`` backtracks: one pattern such as ``^(a+)+$`` takes hours on a short string, and it held the tool
service's event loop for everyone meanwhile. RE2 runs in time linear in the text, in bounded memory, whatever the
pattern. So that a pattern keeps the meaning it had under ``re``, it is parsed by Python's own parser and written
out again in RE2's syntax:

- ``\\d``, ``\\w``, ``\\s`` and their negations become the code points Python's ``re`` gives them for a str
  (RE2's are ASCII only); under the ``(?a)`` flag, the ASCII ones.
- ``$`` keeps Python's meaning: the end of the text, or a newline that ends it. ``\\Z`` becomes RE2's ``\\z``.
- ``\\b`` and ``\\B`` are RE2's, which look at ASCII word characters (as ECMA-262, the dialect JSON Schema names,
  does); Python's look at Unicode ones. That is the one difference on text outside ASCII.

What RE2 cannot run in linear time is refused: backreferences, lookahead and lookbehind, atomic groups, possessive
quantifiers, conditionals; so are counted repetitions above 1000 and programs above RE2's memory budget.
"""

from __future__ import annotations

import array
import functools
import importlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import re2

__all__ = [
    "MAX_PATTERN_LENGTH",
    "MAX_PATTERN_NESTING",
    "MAX_PROGRAM_SIZE",
    "RegexRefused",
    "TenantRegex",
    "compile_tenant_regex",
    "pattern_nesting",
]

MAX_PATTERN_LENGTH = 1000
# Python's own parser recurses once per group: near 500 nested groups it overflows the stack.
MAX_PATTERN_NESTING = 32
# RE2's memory budget per expression: the compiled program and its DFA cache share it. A quarter MiB admits
# programs up to ~13,000 instructions (compiled in ~10 ms; \w alone is ~1,300 of them) and refuses larger ones.
RE2_MAX_MEM = 256 * 1024
MAX_PROGRAM_SIZE = 16_000  # ours, whatever RE2's accounting of memory becomes
MAX_REPEAT = 1000  # RE2's own limit on a counted repetition

# Python's parser and its opcodes: the only way to read a pattern exactly as ``re`` reads it. They are private
# modules of the standard library; the Python version is pinned (3.11) and the tests pin the behaviour.
_parser: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")

_UNICODE_RANGES_FOR = {"d": r"\d+", "w": r"\w+", "s": r"\s+"}
_CATEGORIES = {
    _c.CATEGORY_DIGIT: ("d", False),
    _c.CATEGORY_NOT_DIGIT: ("d", True),
    _c.CATEGORY_WORD: ("w", False),
    _c.CATEGORY_NOT_WORD: ("w", True),
    _c.CATEGORY_SPACE: ("s", False),
    _c.CATEGORY_NOT_SPACE: ("s", True),
}
_LAST_CODE_POINT = 0x10FFFF


class RegexRefused(ValueError):
    """A pattern that cannot be run in bounded time and memory, or is not a valid pattern; says why."""


def _ranges(matches: Iterable[re.Match[str]]) -> tuple[tuple[int, int], ...]:
    return tuple((match.start(), match.end() - 1) for match in matches)


def _python_classes() -> dict[tuple[str, bool], tuple[tuple[int, int], ...]]:
    """The code points Python's ``re`` puts in ``\\d``, ``\\w`` and ``\\s`` (Unicode, and ASCII under ``(?a)``).

    Read from ``re`` itself over every code point (about 0.15 s, once per process), so that the sets are exactly
    those of the Python that ran these patterns before, Unicode version included.
    """
    everything = array.array("I", range(_LAST_CODE_POINT + 1)).tobytes().decode("utf-32-le", "surrogatepass")
    classes = {}
    for name, pattern in _UNICODE_RANGES_FOR.items():
        classes[name, False] = _ranges(re.finditer(pattern, everything))
        classes[name, True] = _ranges(re.finditer(pattern, everything[:128], re.ASCII))
    return classes


_CLASSES = _python_classes()


def _complement(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    result, start = [], 0
    for low, high in ranges:
        if low > start:
            result.append((start, low - 1))
        start = high + 1
    if start <= _LAST_CODE_POINT:
        result.append((start, _LAST_CODE_POINT))
    return result


def _union(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _char(code: int) -> str:
    return chr(code) if chr(code).isascii() and chr(code).isalnum() else f"\\x{{{code:x}}}"


def _class(ranges: Sequence[tuple[int, int]], *, negate: bool = False) -> str:
    if not ranges:  # an empty set matches nothing, its negation anything
        return "(?s:.)" if negate else "[^\\x00-\\x{10ffff}]"
    body = "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in ranges)
    return f"[{'^' if negate else ''}{body}]"


class _Translator:
    """Writes a pattern parsed by Python's ``re`` in RE2 syntax, with the meaning ``re`` gives it.

    ``for_ascii_text`` keeps only the ASCII members of ``\\d``, ``\\w``, ``\\s`` and their negations (not under
    ``(?i)``, where a non-ASCII letter may fold onto an ASCII one): the same answers on ASCII text, from a program a
    hundred times smaller (``\\w`` alone is 1,300 RE2 instructions).
    """

    def __init__(self, pattern: str, *, for_ascii_text: bool = False) -> None:
        self.pattern = pattern
        self.for_ascii_text = for_ascii_text

    def translate(self) -> str:
        try:
            parsed = _parser.parse(self.pattern, 0)
        except re.error as exc:
            raise RegexRefused(f"not a valid regular expression ({exc})") from exc
        except RecursionError as exc:
            raise RegexRefused("nested too deeply") from exc
        return self._sequence(parsed.data, parsed.state.flags)

    def _sequence(self, items: Iterable[tuple[Any, Any]], flags: int) -> str:
        return "".join(self._item(op, av, flags) for op, av in items)

    def _item(self, op: Any, av: Any, flags: int) -> str:
        folded = bool(flags & re.IGNORECASE)
        if op is _c.LITERAL:
            return self._fold(_char(av), folded)
        if op is _c.NOT_LITERAL:
            return self._fold(_class([(av, av)], negate=True), folded)
        if op is _c.ANY:
            return "(?s:.)" if flags & re.DOTALL else "."
        if op is _c.IN:
            return self._fold(self._set(av, flags), folded)
        if op is _c.AT:
            return self._anchor(av, flags)
        if op is _c.BRANCH:
            return "(?:" + "|".join(self._sequence(branch, flags) for branch in av[1]) + ")"
        if op is _c.SUBPATTERN:
            _group, add, remove, body = av
            return "(?:" + self._sequence(body, (flags | add) & ~remove) + ")"
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            return self._repeat(op, av, flags)
        if op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            raise RegexRefused("backreferences are not supported (the regex engine is RE2, linear-time)")
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            raise RegexRefused("lookahead and lookbehind are not supported (the regex engine is RE2, linear-time)")
        if op in (_c.ATOMIC_GROUP, _c.POSSESSIVE_REPEAT):
            raise RegexRefused("atomic groups and possessive quantifiers are not supported")
        raise RegexRefused(f"unsupported construct {op}")

    @staticmethod
    def _fold(text: str, folded: bool) -> str:
        return f"(?i:{text})" if folded else text

    def _set(self, items: Sequence[tuple[Any, Any]], flags: int) -> str:
        negate = bool(items) and items[0][0] is _c.NEGATE
        ranges: list[tuple[int, int]] = []
        for op, av in items[1:] if negate else items:
            if op is _c.LITERAL:
                ranges.append((av, av))
            elif op is _c.RANGE:
                ranges.append(av)
            elif op is _c.CATEGORY and av in _CATEGORIES:
                name, negated = _CATEGORIES[av]
                table = _CLASSES[name, bool(flags & re.ASCII)]
                members = _complement(table) if negated else list(table)
                if self.for_ascii_text and not flags & re.IGNORECASE:
                    members = [(low, min(high, 0x7F)) for low, high in members if low <= 0x7F]
                ranges.extend(members)
            else:
                raise RegexRefused(f"unsupported construct in a character class: {op}")
        return _class(_union(ranges), negate=negate)

    @staticmethod
    def _anchor(at: Any, flags: int) -> str:
        multiline = bool(flags & re.MULTILINE)
        if at is _c.AT_BEGINNING:
            return "(?m:^)" if multiline else "\\A"
        if at is _c.AT_BEGINNING_STRING:
            return "\\A"
        if at is _c.AT_END:
            # Python's $ also matches before a newline that ends the text; only whether there is a match is
            # ever asked, so taking that newline into the match changes nothing.
            return "(?m:$)" if multiline else "(?:\\n?\\z)"
        if at is _c.AT_END_STRING:
            return "\\z"
        if at is _c.AT_BOUNDARY:
            return "\\b"
        if at is _c.AT_NON_BOUNDARY:
            return "\\B"
        raise RegexRefused(f"unsupported anchor {at}")

    def _repeat(self, op: Any, av: Any, flags: int) -> str:
        low, high, body = av
        unbounded = high == _c.MAXREPEAT
        if low > MAX_REPEAT or (not unbounded and high > MAX_REPEAT):
            raise RegexRefused(f"repetition counts above {MAX_REPEAT} are not supported")
        quantifier = f"{{{low},}}" if unbounded else f"{{{low}}}" if low == high else f"{{{low},{high}}}"
        lazy = "?" if op is _c.MIN_REPEAT else ""
        return f"(?:{self._sequence(body, flags)}){quantifier}{lazy}"


def pattern_nesting(pattern: str) -> int:
    """How deeply groups nest in ``pattern`` (brackets inside a character class and escaped ones do not count)."""
    depth = deepest = 0
    escaped = in_class = False
    class_start = -1
    for index, char in enumerate(pattern):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            # "]" right after "[" or "[^" is a member, not the end of the class.
            if char == "]" and index > class_start + 1 and pattern[class_start + 1 : index] != "^":
                in_class = False
        elif char == "[":
            in_class, class_start = True, index
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(0, depth - 1)
    return deepest


@dataclass(frozen=True, slots=True)
class TenantRegex:
    """One compiled tenant pattern. :meth:`search` is JSON Schema's ``pattern`` test: a search, not a full match.

    RE2's time is linear in the text, but its constant grows with the program: when a pattern's DFA outgrows its
    memory, RE2 steps an NFA through up to every instruction for each byte (measured: up to 16 ns per byte and
    instruction). ``bytes x program size`` bounds the work of a search; :meth:`search` reports it first.
    """

    source: str
    program_size: int
    ascii_program_size: int
    _compiled: Any = field(repr=False)
    _for_ascii: Any = field(repr=False)

    def search(self, text: str, before: Callable[[int], object] | None = None) -> bool:
        """Whether the pattern matches anywhere in ``text`` (which may hold lone surrogates).

        ``before`` is called with the worst-case work of the search (bytes x RE2 instructions) before it runs,
        so that a budget can refuse it first.
        """
        if text.isascii():  # O(1) for a str: CPython records it
            data, program, size = text.encode("ascii"), self._for_ascii, self.ascii_program_size
        else:
            data, program, size = text.encode("utf-8", "surrogatepass"), self._compiled, self.program_size
        if before is not None:
            before(len(data) * size)
        return program.search(data) is not None


def _options() -> Any:
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.never_capture = True  # only "is there a match" is asked: no submatch bookkeeping
    options.log_errors = False  # a refused tenant pattern is an answer, not a log line
    return options


_OPTIONS = _options()


def _re2(translated: str) -> Any:
    try:
        compiled = re2.compile(translated, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        if "repetition" in reason:
            raise RegexRefused(f"repetitions of more than {MAX_REPEAT} in all (nested counts multiply)") from exc
        raise RegexRefused(f"cannot be compiled by RE2 ({reason})") from exc
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise RegexRefused(f"too complex (RE2 program of {compiled.programsize} instructions)")
    return compiled


@functools.lru_cache(maxsize=512)
def compile_tenant_regex(pattern: str) -> TenantRegex:
    """Compile a tenant's pattern for RE2, or raise :class:`RegexRefused` saying why it cannot be run.

    Compiled patterns are shared by every tenant and schema: at most 512 kept, each within 2 x 256 KiB of RE2
    memory (its full program and its program for ASCII text).
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise RegexRefused(f"longer than {MAX_PATTERN_LENGTH} characters")
    if pattern_nesting(pattern) > MAX_PATTERN_NESTING:
        raise RegexRefused(f"groups nested deeper than {MAX_PATTERN_NESTING} levels")
    full = _re2(_Translator(pattern).translate())
    for_ascii = _re2(_Translator(pattern, for_ascii_text=True).translate())
    return TenantRegex(pattern, full.programsize, for_ascii.programsize, full, for_ascii)
