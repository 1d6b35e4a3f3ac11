"""Tenant patterns on RE2: the meaning Python's ``re`` gave them, in linear time, or refused with a reason."""

from __future__ import annotations

import re

import pytest

from services.tool.tenant_regex import (
    MAX_PATTERN_LENGTH,
    MAX_PATTERN_NESTING,
    RegexRefused,
    compile_tenant_regex,
    pattern_nesting,
)

ORDINARY = [
    r"^[a-z0-9_]+$",
    r"^\d{3}-\d{4}$",
    r"^\S+@\S+\.\S+$",
    r"^[\w.+-]+@[\w-]+\.[\w.]+$",
    r"^https?://",
    r"\w+",
    r"^\s*$",
    r"(?i)^abc$",
    r"^[A-Z]{2}$",
    r"^[^<>]*$",
    r"colou?r",
    r"^(a|b)+$",
    r"^.{1,5}$",
    r"(?s)^.{1,5}$",
    r"(?m)^b$",
    r"a$",
    r"^\W+$",
    r"[\W\d]",
    r"^\D\S\W$",
    r"^[\u00e9-\u00ff]+$",
    r"\x41",
    r"\N{EM DASH}",
    r"(?a)^\w+$",
    r"(?x) a b  # verbose, with a comment",
    r"a{,3}b",
    r"\Aab\Z",
    r"^[-+]?\d*\.?\d+([eE][-+]?\d+)?$",
    r"^(?:[01]\d|2[0-3]):[0-5]\d$",
    r"(?i)[^a]",
    r"(?i)\u212a",
    r"^$",
    "",
    r"\.",
    r"a|",
    r"(?#a comment)x",
    r"^[\s\S]+$",
    r"\t\n\r\f\v\a",
    r"\0",
    r"[\b]",
    r"^(?P<x>a)(?:b)$",
    r"a+?",
    r"(ab)*?c",
    r"[^\n]+",
    r"\$",
    r"^\bfoo\b",
]
TEXTS = [
    "",
    "abc",
    "ABC",
    "abc\n",  # Python's $ matches before a final newline
    "a\nb",
    "123-4567",
    "١٢٣-٤٥٦٧",  # Arabic-Indic digits: \d for Python
    "x@y.z",
    "josé@exemple.fr",
    "https://a",
    "  ",
    "\u00a0",  # no-break space: \s for Python
    "\u2003",
    "\x1c",  # a separator Python's \s counts
    "\x0b",
    "café",
    "Ünïcødé",
    "foo bar",
    "été",
    "aaa",
    "colour",
    "color",
    "K",
    "k",
    "\u212a",  # Kelvin sign, folds to k
    "—",
    "_",
    "12:59",
    "24:00",
    "-1.5e10",
    "\0",
    "\x07\t\n\r\f\x0b",
    "x$",
    "<b>",
    "ǅ",
    "Ⅻ",
    "²",
    "中文",
    "\ud800",  # a lone surrogate: no crash
]


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_patterns_mean_what_they_meant_under_re(pattern: str) -> None:
    python, tenant = re.compile(pattern), compile_tenant_regex(pattern)
    differences = [text for text in TEXTS if (python.search(text) is not None) != tenant.search(text)]
    assert differences == []


def test_unicode_classes_are_python_s_on_every_plane() -> None:
    samples = [chr(c) for c in range(0x0, 0x3400)] + [chr(c) for c in range(0x3400, 0x110000, 97)]
    for pattern in (r"^\d$", r"^\w$", r"^\s$", r"^\D$", r"^\W$", r"^\S$", r"^[\w\s]$", r"^[^\d]$"):
        python, tenant = re.compile(pattern), compile_tenant_regex(pattern)
        differences = [s for s in samples if (python.search(s) is not None) != tenant.search(s)]
        assert differences == [], pattern


def test_word_boundaries_follow_ascii_word_characters() -> None:
    # The one documented difference: RE2's \b, like ECMA-262's, sees ASCII word characters only.
    assert compile_tenant_regex(r"\bfoo\b").search("a foo.")
    assert not compile_tenant_regex(r"^café\b").search("café")


@pytest.mark.timeout(10)
def test_a_catastrophic_pattern_runs_in_linear_time() -> None:
    # Python's re takes minutes on this (2^40 ways to split the a's); RE2 microseconds.
    regex = compile_tenant_regex(r"^(a+)+$")
    assert not regex.search("a" * 40 + "!")
    assert not regex.search("a" * 100_000 + "!")
    assert regex.search("a" * 100_000)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "backreferences are not supported"),
        (r"(?P<x>a)(?P=x)", "backreferences are not supported"),
        (r"(?=a)", "lookahead and lookbehind are not supported"),
        (r"(?!a)b", "lookahead and lookbehind are not supported"),
        (r"(?<=a)b", "lookahead and lookbehind are not supported"),
        (r"(?<!a)b", "lookahead and lookbehind are not supported"),
        (r"(a)?(?(1)b|c)", "backreferences are not supported"),
        (r"(?>a+)b", "atomic groups and possessive quantifiers"),
        (r"a++", "atomic groups and possessive quantifiers"),
        (r"a{1001}", "repetition counts above 1000"),
        (r"(?:a{100}){100}", "repetitions of more than 1000 in all"),
        (r"\w{50}", "cannot be compiled by RE2 (pattern too large"),
        (r"a[", "not a valid regular expression"),
        ("(" * (MAX_PATTERN_NESTING + 1) + ")" * (MAX_PATTERN_NESTING + 1), "nested deeper than 32"),
        ("a" * (MAX_PATTERN_LENGTH + 1), "longer than 1000 characters"),
    ],
)
def test_what_re2_cannot_bound_is_refused_with_a_reason(pattern: str, reason: str) -> None:
    with pytest.raises(RegexRefused, match=re.escape(reason)):
        compile_tenant_regex(pattern)


def test_nesting_ignores_escaped_brackets_and_character_classes() -> None:
    assert pattern_nesting(r"((a)(b))") == 2
    assert pattern_nesting(r"\(\(\(") == 0
    assert pattern_nesting(r"[(((]") == 0
    assert pattern_nesting(r"[]((]") == 0
    assert pattern_nesting(r"[^]((](a)") == 1


def test_searches_report_their_worst_case_work_first() -> None:
    regex = compile_tenant_regex(r"^\w+$")
    seen: list[int] = []
    assert regex.search("abc", seen.append)
    assert regex.search("été", seen.append)
    # ASCII text gets the ASCII program (\w is 1,300 RE2 instructions for all of Unicode, a handful for ASCII).
    assert seen == [3 * regex.ascii_program_size, len("été".encode()) * regex.program_size]
    assert regex.ascii_program_size * 50 < regex.program_size
