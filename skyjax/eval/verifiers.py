"""Final-answer extraction and checking for reasoning completions (GRPO accuracy reward, distillation, evaluation).

Three steps, each usable on its own:

1. ``answer_region``: the part of a completion that may hold the answer. Text inside a ``<think>`` block never
   counts; with a think block the region is what follows the last ``</think>``. A ``</think>`` without an opening
   tag counts too (R1-distilled chat templates put ``<think>`` in the prompt); an opened, never closed block (a
   truncated completion) has no answer at all.
2. ``extract_answer``: the final answer inside the region, by marker strength: the content of the last
   ``<answer>...</answer>`` narrows the region first; then the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced
   braces); then the last ``Answer: X`` line; then the last ``the answer is X``; then, with no marker, a region that
   is one short line. A boxed answer therefore beats an ``Answer:`` line wherever they stand, because the box is
   the format every evaluation prompt asks for and a line starting "Answer:" is often prose.
   With ``choices`` the answer is mapped to an option letter ("(B)", "B.", "B)", "\\boxed{B}", "option B", or text
   equal to an option).
3. ``answers_match``: normalised string equality, or numeric equality within a tolerance (fractions, LaTeX
   fractions, percentages, thousands separators, scientific notation, optional units), or letter equality.

``verify`` runs all three and says why: ``VerifyResult(correct, extracted, reason)``. ``check_format`` is the
``<think>...</think> answer`` format test of the format reward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# the longest marker-less region still taken as the answer: one short line ("42", "x = 3 cm"), not prose
MAX_BARE_ANSWER_CHARS = 80


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``verify``: whether the completion's final answer equals the ground truth, the extracted answer
    (None when none was found) and a short reason ("numeric match", "no answer found", ...)."""

    correct: bool
    extracted: str | None
    reason: str


# ---------------------------------------------------------------------------------------------------- extraction


def answer_region(completion: str) -> str | None:
    """The text that may contain the final answer; None for an unterminated think block (truncated reasoning)."""
    close = completion.rfind(THINK_CLOSE)
    if close >= 0:
        # a block reopened after the answer and cut off: its text is reasoning, what came before it still counts
        return completion[close + len(THINK_CLOSE):].split(THINK_OPEN, 1)[0]
    if THINK_OPEN in completion:
        return None
    return completion


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start] == '{'`` and the index after it; None if unbalanced.
    Escaped characters (``\\{``, ``\\}``) do not nest."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def boxed_answers(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed {..}`` and ``\\boxed 5``), in order.
    A box whose braces never close (a truncated completion) is skipped."""
    found = []
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            group = _braced(text, i)
            if group is not None:
                found.append(group[0].strip())
        elif i > m.end():  # "\boxed 5": TeX takes the next token as the argument
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                found.append(token.group(0))
    return found


_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "Answer: X", "**Final Answer:** X", "- Answer: X", "ANSWER：X" at the start of a line; the rest of the line is the
# answer
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_-]*(?:the\s+)?(?:final\s+|correct\s+)?answer[ \t*_]*[:：][ \t*_]*(.*?)[ \t*_]*$",
    re.IGNORECASE | re.MULTILINE)
# "... the answer is X." / "the final answer is: X" inside a sentence, up to the end of the sentence or line
_ANSWER_IS_RE = re.compile(
    r"\b(?:final\s+|correct\s+)?answer\s+(?:is|would\s+be|should\s+be)\s*[:：]?\s*(.+?)(?:\.(?:\s|$)|$)",
    re.IGNORECASE | re.MULTILINE)


def _strip_answer(text: str) -> str:
    """Trim what surrounds an answer in prose: markdown emphasis and a trailing period ($ signs go later, in
    normalize_answer, so the extracted answer is shown as written)."""
    text = text.strip().strip("*_").strip()
    while text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()  # "3." is 3 and "red." is red: a sentence's period is never part of the answer
    return text


def _find_answer(region: str) -> tuple[str, str] | None:
    """(answer, marker) for the strongest marker in the region, None without any answer."""
    tags = _ANSWER_TAG_RE.findall(region)
    if tags:
        region = tags[-1]  # the model said where its answer is: look nowhere else
    boxes = [b for b in boxed_answers(region) if b]
    if boxes:
        return boxes[-1], "boxed"
    lines = [m.group(1) for m in _ANSWER_LINE_RE.finditer(region) if _strip_answer(m.group(1))]
    if lines:
        return _strip_answer(lines[-1]), "answer line"
    sentences = [m.group(1) for m in _ANSWER_IS_RE.finditer(region) if _strip_answer(m.group(1))]
    if sentences:
        return _strip_answer(sentences[-1]), "answer is"
    bare = region.strip()
    if tags and bare:
        return _strip_answer(bare), "answer tag"
    if bare and "\n" not in bare and len(bare) <= MAX_BARE_ANSWER_CHARS:
        return _strip_answer(bare), "bare"
    return None


def extract_answer(completion: str, *, choices: Sequence[str] | Mapping[str, str] | None = None) -> str | None:
    """The completion's final answer as a string, or None. With ``choices`` (option texts in letter order, or a
    letter -> text mapping) the answer is an option letter, or None when it names no option."""
    region = answer_region(completion)
    if region is None:
        return None
    if choices is None:
        found = _find_answer(region)
        return found[0] if found else None
    return _extract_letter(region, _options(choices))


def _extract_letter(region: str, options: Mapping[str, str]) -> str | None:
    """The option letter the region answers; ``options`` empty means any letter A-Z (no option texts known)."""
    found = _find_answer(region)
    if found is not None:
        letter = choice_letter(found[0], options)
        if letter is not None:
            return letter
    # no marker named an option: a short last line such as "(B)" or "The correct option is C." still counts
    lines = region.strip().splitlines()
    if lines and len(lines[-1]) <= MAX_BARE_ANSWER_CHARS:
        return choice_letter(lines[-1], options)
    return None


# ----------------------------------------------------------------------------------------------- multiple choice


def _options(choices: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """Letter -> option text. A sequence is lettered A, B, C, ...; mapping keys may be "B", "(B)" or "b"."""
    if choices is None:
        return {}
    if isinstance(choices, Mapping):
        out = {}
        for key, text in choices.items():
            letter = str(key).strip().strip("().").upper()
            if len(letter) != 1 or letter not in LETTERS:
                raise ValueError(f"choice key {key!r} is not an option letter A-Z")
            out[letter] = str(text)
        return out
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices: at most {len(LETTERS)} options can be lettered")
    return {LETTERS[i]: str(text) for i, text in enumerate(choices)}


_LETTER_FULL = [  # the whole answer is a letter: "B", "(B)", "B.", "B)", "[B]", "Option B", "choice (b)"
    re.compile(r"^(?:option|choice)?\s*[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?$", re.IGNORECASE),
]
_LETTER_PREFIX = [  # a letter followed by the option text: "B. 42 cm", "(B) 42 cm", "B) red"
    re.compile(r"^[(\[]([A-Z])[)\]]\s*\S"),
    re.compile(r"^([A-Z])[.):]\s+\S"),
]
_LETTER_SEARCH = [  # a letter named inside a sentence: "the correct option is (B)", "answer is C"
    re.compile(r"\b(?i:option|choice|answer)\s+(?:is\s+)?[(\[]?([A-Z])[)\]]?(?![\w'])"),
    re.compile(r"(?:^|\s)\(([A-Z])\)(?:[\s.,;:!]|$)"),
]


def choice_letter(text: str, options: Mapping[str, str] | Sequence[str] | None = None) -> str | None:
    """The option letter that ``text`` names, or None. ``options``: letter -> option text (or texts in letter
    order); a letter outside the options is rejected, and text equal to an option's text gives its letter. Without
    options any letter A-Z is accepted, but only when written as a letter ("B", "(B)", "B. ...")."""
    opts = _options(options)
    s = normalize_answer(text, lowercase=False)
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).strip()
    candidates: list[str] = []
    for pat in _LETTER_FULL:
        m = pat.match(s)
        if m:
            candidates.append(m.group(1).upper())
    if not candidates:
        for pat in _LETTER_PREFIX:
            m = pat.match(s)
            if m:
                candidates.append(m.group(1))
    if not candidates and opts:
        # the option's own text ("42 cm" when option C is "42 cm"): compare like any other answer
        matches = [letter for letter, option in opts.items() if answers_match(s, option)[0]]
        if len(matches) == 1:
            return matches[0]
    if not candidates:
        for pat in _LETTER_SEARCH:
            hits = pat.findall(s)
            if hits:
                candidates.append(hits[-1].upper())
                break
    for letter in candidates:
        if not opts or letter in opts:
            return letter
    return None


# ------------------------------------------------------------------------------------------------- normalisation


_TEXT_WRAPPERS = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|operatorname|mbox|boxed)\s*\{"
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~|\\left|\\right|\\displaystyle")


def _unwrap(s: str) -> str:
    """Replace ``\\text{X}`` (and friends) by X, innermost last, keeping balanced braces inside X."""
    while True:
        m = re.search(_TEXT_WRAPPERS, s)
        if not m:
            return s
        group = _braced(s, m.end() - 1)
        if group is None:
            return s[:m.start()] + s[m.end():]
        s = s[:m.start()] + group[0] + s[group[1]:]


def normalize_answer(text: str, *, lowercase: bool = True) -> str:
    """A canonical string for comparison: no $ signs, no \\text{} wrappers or LaTeX spacing, \\dfrac -> \\frac,
    degrees and \\% written plainly, single spaces, no trailing period, no enclosing braces, lowercase."""
    s = text.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = _unwrap(s)
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac34
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)  # \sqrt3
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "°", s)
    s = s.replace("\\%", "%").replace("{,}", ",").replace("²", "^2").replace("³", "^3")
    s = re.sub(r"\s+", " ", s).strip()
    while s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    while s.startswith("{") and _braced(s, 0) == (s[1:-1], len(s)):
        s = s[1:-1].strip()
    s = re.sub(r"^[a-zA-Z]\w*\s*=\s*(?=\S)", "", s)  # "x = 5" -> "5": the value, not the variable
    if not lowercase:
        return s
    # "the triangle" answers "triangle": articles carry no content (only in the lowercase form, where a lone "A" is
    # no longer read as an option letter)
    return re.sub(r"^(?:a|an|the)\s+(?=\S)", "", s.lower())


@dataclass(frozen=True)
class ParsedNumber:
    """A number read from an answer: its value, whether it carried a percent sign, and its unit ("" when none)."""

    value: float
    percent: bool
    unit: str


_NUM = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+−]?\.\d+"
_SCI = re.compile(rf"^({_NUM})\s*(?:e\s*([-+]?\d+)|(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\{{?\s*([-+−]?\d+)\s*\}}?)")
_FRAC = re.compile(rf"^([-+−]?)\s*\\frac\{{\s*({_NUM})\s*\}}\{{\s*({_NUM})\s*\}}")
_SLASH = re.compile(rf"^({_NUM})\s*/\s*({_NUM})(?![\d.])")
_PLAIN = re.compile(rf"^({_NUM})")
# what may follow a number as its unit: words, °, exponents, "/s"; never another number or operator
# single letters that are units ("5 m", "3 s", "2 g"); other letters are usually variables ("2x", "3n")
_ONE_LETTER_UNITS = frozenset("mgslhj°")
_UNIT = re.compile(r"^(?:°|[a-zμΩ°%][a-zμΩ°/^{}23\s.*-]*)?$", re.IGNORECASE)


def _to_float(num: str) -> float:
    return float(num.replace(",", "").replace("−", "-"))


def parse_number(text: str) -> ParsedNumber | None:
    """The number an answer states, or None when it is not a (possibly unit-bearing) number.

    Accepts "0.75", "-3/4", "\\frac{3}{4}", "1,234.5", "1.5e3", "1.5 \\times 10^{3}", "75%", "5 cm", "30°".
    """
    s = normalize_answer(text)
    s = s.replace("\\%", "%")
    value: float | None = None
    rest = ""
    for parse in (_parse_sci, _parse_frac, _parse_slash, _parse_plain):
        parsed = parse(s)
        if parsed is not None:
            value, rest = parsed
            break
    if value is None or not math.isfinite(value):
        return None
    rest = rest.strip()
    percent = rest.startswith("%")
    if percent:
        rest = rest[1:].strip()
    if not _UNIT.match(rest) or (len(rest) == 1 and rest not in _ONE_LETTER_UNITS):
        return None  # "2x", "3n", "5\\pi" are expressions, not a number with a unit
    unit = re.sub(r"\s+", "", rest.rstrip("."))
    return ParsedNumber(value, percent, unit)


def _parse_sci(s: str) -> tuple[float, str] | None:
    m = _SCI.match(s)
    if not m:
        return None
    exp = m.group(2) if m.group(2) is not None else m.group(3)
    return _to_float(m.group(1)) * 10.0 ** int(exp.replace("−", "-")), s[m.end():]


def _parse_frac(s: str) -> tuple[float, str] | None:
    m = _FRAC.match(s)
    if not m or _to_float(m.group(3)) == 0:
        return None
    sign = -1.0 if m.group(1) in ("-", "−") else 1.0
    return sign * _to_float(m.group(2)) / _to_float(m.group(3)), s[m.end():]


def _parse_slash(s: str) -> tuple[float, str] | None:
    m = _SLASH.match(s)
    if not m or _to_float(m.group(2)) == 0:
        return None
    return _to_float(m.group(1)) / _to_float(m.group(2)), s[m.end():]


def _parse_plain(s: str) -> tuple[float, str] | None:
    m = _PLAIN.match(s)
    return (_to_float(m.group(1)), s[m.end():]) if m else None


# ---------------------------------------------------------------------------------------------------- comparison


def numbers_close(a: float, b: float, *, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
    """|a - b| <= max(abs_tol, rel_tol * max(|a|, |b|)): relative for large values, absolute near zero."""
    return abs(a - b) <= max(abs_tol, rel_tol * max(abs(a), abs(b)))


def answers_match(predicted: str, truth: str, *, rel_tol: float = 1e-4, abs_tol: float = 1e-8,
                  units_optional: bool = True, percent_as_fraction: bool = True,
                  round_to_truth: bool = False) -> tuple[bool, str]:
    """(equal, reason) for two answer strings.

    Equal when the normalised strings agree (spaces ignored), or both are numbers within the tolerance.
    units_optional: "5 cm" equals "5" (a unit on one side only is ignored); two different units never match.
    percent_as_fraction: "75%" also equals "0.75" (it always equals "75").
    round_to_truth: a ground truth written with k >= 1 decimals ("3.14") also accepts any value within half a unit
      of its last digit ("3.1416"), for benchmarks whose answers are rounded; integers stay exact (a count of 2
      must not accept 2.4).
    """
    p_norm, t_norm = normalize_answer(predicted), normalize_answer(truth)
    if p_norm.replace(" ", "") == t_norm.replace(" ", ""):
        return True, "string match"
    p, t = parse_number(predicted), parse_number(truth)
    if p is None or t is None:
        return False, "string mismatch" if p is None and t is None else "not both numbers"
    if p.unit != t.unit and (p.unit and t.unit or not units_optional):
        return False, f"unit mismatch ({p.unit or 'none'} vs {t.unit or 'none'})"
    p_values = {p.value} | ({p.value / 100.0} if p.percent and percent_as_fraction else set())
    t_values = {t.value} | ({t.value / 100.0} if t.percent and percent_as_fraction else set())
    if any(numbers_close(a, b, rel_tol=rel_tol, abs_tol=abs_tol) for a in p_values for b in t_values):
        return True, "numeric match"
    decimals = re.match(r"^[-+−]?[\d,]*\.(\d+)$", normalize_answer(truth))
    if round_to_truth and decimals and not t.percent:
        half_unit = 0.5 * 10.0 ** -len(decimals.group(1)) * (1 + 1e-9)  # the slack absorbs binary rounding
        if any(abs(a - t.value) <= half_unit for a in p_values):
            return True, "numeric match after rounding"
    return False, "numeric mismatch"


def verify(completion: str, answer: str, *, choices: Sequence[str] | Mapping[str, str] | None = None,
           rel_tol: float = 1e-4, abs_tol: float = 1e-8, units_optional: bool = True,
           percent_as_fraction: bool = True, round_to_truth: bool = False) -> VerifyResult:
    """Whether the completion's final answer equals ``answer``.

    Multiple choice when ``choices`` are given, or when ``answer`` is a bare letter ("B", "(B)"): the ground
    truth (a letter, or an option's text) and the completion are both mapped to letters, which must be equal.
    Otherwise ``answers_match`` with the tolerance and unit/percent options.
    """
    if answer is None or not str(answer).strip():
        raise ValueError("verify needs a non-empty ground-truth answer")
    answer = str(answer)
    if answer_region(completion) is None:
        return VerifyResult(False, None, "unterminated think block")
    options = _options(choices)
    truth_letter = choice_letter(answer, options) if options else _bare_letter(answer)
    if options and truth_letter is None:
        raise ValueError(f"ground truth {answer!r} names none of the options {sorted(options)}")
    if truth_letter is not None:
        letter = _extract_letter(answer_region(completion) or "", options)
        if letter is None:
            found = _find_answer(answer_region(completion) or "")
            return VerifyResult(False, found[0] if found else None,
                                "no option found" if found else "no answer found")
        ok = letter == truth_letter
        return VerifyResult(ok, letter, "choice match" if ok else "choice mismatch")
    extracted = extract_answer(completion)
    if extracted is None:
        return VerifyResult(False, None, "no answer found")
    ok, reason = answers_match(extracted, answer, rel_tol=rel_tol, abs_tol=abs_tol, units_optional=units_optional,
                               percent_as_fraction=percent_as_fraction, round_to_truth=round_to_truth)
    return VerifyResult(ok, extracted, reason)


def _bare_letter(answer: str) -> str | None:
    """A ground truth that is only a letter ("B", "(B)", "B.") makes the question multiple choice."""
    m = re.match(r"^\s*[(\[]?([A-Z])[)\]]?\.?\s*$", answer)
    return m.group(1) if m else None


# -------------------------------------------------------------------------------------------------------- format


def check_format(completion: str, *, mode: Literal["strict", "lenient"] = "strict",
                 think_opened: bool = False) -> bool:
    """R1-style format: reasoning in ``<think>...</think>``, then a non-empty answer.

    strict: the completion starts with ``<think>`` (after whitespace), has exactly one opening and one closing tag,
    non-empty reasoning, and after ``</think>`` an answer found by a marker (``\\boxed{}``, ``<answer>``,
    "Answer:", "the answer is"). lenient: a ``</think>`` is present and non-whitespace text follows the last one.
    think_opened: the prompt already ends with ``<think>`` (R1-distilled chat templates), so the completion starts
    inside the block and carries no opening tag of its own.
    """
    if mode not in ("strict", "lenient"):
        raise ValueError(f"format mode {mode!r} is not 'strict' or 'lenient'")
    text = (THINK_OPEN + completion) if think_opened else completion
    if mode == "lenient":
        close = text.rfind(THINK_CLOSE)
        return close >= 0 and bool(text[close + len(THINK_CLOSE):].strip())
    body = text.lstrip()
    if not body.startswith(THINK_OPEN) or body.count(THINK_OPEN) != 1 or body.count(THINK_CLOSE) != 1:
        return False
    reasoning, _, after = body[len(THINK_OPEN):].partition(THINK_CLOSE)
    if not reasoning.strip() or not after.strip():
        return False
    found = _find_answer(after)
    return found is not None and found[1] not in ("bare",)
