"""Final-answer extraction, comparison and the think format (skyjax/eval/verifiers.py)."""

import pytest

from skyjax.eval.verifiers import (
    answer_region,
    answers_match,
    boxed_answers,
    check_format,
    choice_letter,
    extract_answer,
    normalize_answer,
    parse_number,
    verify,
)

R1_FRACTION = """<think>
The triangle has legs 3 and 4, so the hypotenuse is 5. The ratio is \\frac{3}{5}... wait, the question asks for
sin of the other angle, which is \\frac{4}{5}. Let me double check: 4/5 = 0.8. Yes.
</think>

The opposite side is 4 and the hypotenuse is 5, so

$$\\sin\\theta = \\boxed{\\dfrac{4}{5}}$$"""

R1_WRONG_FINAL = """<think>
12 * 7 = 84. So the answer is 84.
Hmm, but the question says "minus the 4 broken ones", so 80.
</think>
Counting all the boxes gives \\boxed{84}."""

R1V_CHOICE = """<think>
The graph peaks at x = 2 where y = 6. Option A says 4, option B says 6, option C says 8. So B.
</think>
From the graph, the maximum value is 6.

Answer: \\boxed{B}"""


# ------------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{42}", ["42"]),
    ("\\boxed{\\frac{1}{\\sqrt{2}}} and \\boxed {x^{2}}", ["\\frac{1}{\\sqrt{2}}", "x^{2}"]),
    ("\\fbox{7} then \\boxed{\\{1, 2\\}}", ["7", "\\{1, 2\\}"]),
    ("\\boxed 5 is it", ["5"]),
    ("truncated \\boxed{\\frac{1}{2", []),
    ("\\boxedx{3}", []),
])
def test_boxed_answers_balance_braces(text, expected):
    assert boxed_answers(text) == expected


@pytest.mark.parametrize("completion,expected", [
    (R1_FRACTION, "\\dfrac{4}{5}"),
    (R1V_CHOICE, "B"),
    # the last box wins over earlier ones
    ("First guess \\boxed{3}. Actually, recomputing: \\boxed{5}", "5"),
    # a boxed answer beats an Answer: line, wherever the line stands
    ("<think>hmm</think>\nSo \\boxed{12}.\nAnswer: 13", "12"),
    ("<think>hmm</think>\nAnswer: 13\nFinally \\boxed{12}", "12"),
    # answer tags narrow the search: a box outside them is not the answer
    ("<think>x</think><answer>\\boxed{7}</answer> P.S. \\boxed{8}", "7"),
    ("<think>x</think>\n<answer> 3/4 </answer>", "3/4"),
    ("Some work.\n**Final Answer:** $\\frac{\\pi}{2}$", "$\\frac{\\pi}{2}$"),
    ("Adding them up, the answer is 3.5.", "3.5"),
    ("So the final answer is: 1,024. Done.", "1,024"),
    ("ANSWER: red\nANSWER: blue", "blue"),
    ("Summary:\n- Answer: 5\n", "5"),
    ("\\boxed{\\$12.50}", "\\$12.50"),
    # R1-distilled templates open <think> in the prompt: only the closing tag is in the completion
    ("reasoning that says \\boxed{1}\n</think>\n\\boxed{2}", "2"),
    # a short marker-less answer after the think block
    ("<think>compute</think>\n\n42\n", "42"),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion", [
    "<think>The answer is \\boxed{5}, and it keeps going",  # truncated inside the think block
    "<think>it is 5</think>\n",  # nothing after the think block
    "<think>it is \\boxed{5}</think>\nI could not determine it from the figure, because the labels are unreadable "
    "and the axis has no scale, so any value would be a guess.",  # prose only: no marker, not a short line
    "",
])
def test_no_answer_is_found(completion):
    assert extract_answer(completion) is None


def test_answer_region_excludes_reasoning():
    assert answer_region("<think>a \\boxed{1}</think> b") == " b"
    assert answer_region("<think>never closed") is None
    assert answer_region("plain text") == "plain text"
    # an answer, then a reopened think block that was cut off: the reopened text is reasoning
    assert answer_region("<think>a</think> \\boxed{2} <think> \\boxed{3}") == " \\boxed{2} "


# ------------------------------------------------------------------------------------------- normalise and numbers


@pytest.mark.parametrize("raw,norm", [
    ("  $\\text{Paris}$. ", "paris"),
    ("\\textbf{(B)}", "(b)"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\frac34", "\\frac{3}{4}"),
    ("\\left( 1, 2 \\right)", "( 1, 2 )"),
    ("x = 5", "5"),
    ("{12}", "12"),
    ("The triangle", "triangle"),
    ("30^{\\circ}", "30°"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("text,value,percent,unit", [
    ("0.75", 0.75, False, ""),
    ("-3/4", -0.75, False, ""),
    ("\\frac{3}{4}", 0.75, False, ""),
    ("-\\dfrac{3}{4}", -0.75, False, ""),
    ("$\\frac{-3}{4}$", -0.75, False, ""),
    ("1,234,567.5", 1234567.5, False, ""),
    ("1{,}000", 1000.0, False, ""),
    ("1.5e3", 1500.0, False, ""),
    ("2.5 \\times 10^{-3}", 0.0025, False, ""),
    ("6.02\\cdot10^23", 6.02e23, False, ""),
    ("75%", 75.0, True, ""),
    ("75\\%", 75.0, True, ""),
    ("5 \\text{ cm}", 5.0, False, "cm"),
    ("9.8 m/s^2", 9.8, False, "m/s^2"),
    ("30^\\circ", 30.0, False, "°"),
    ("12 m", 12.0, False, "m"),
])
def test_parse_number(text, value, percent, unit):
    got = parse_number(text)
    assert got is not None
    assert got.value == pytest.approx(value, rel=1e-12)
    assert (got.percent, got.unit) == (percent, unit)


@pytest.mark.parametrize("text", ["2x", "3\\pi", "1\\frac{1}{2}", "1, 2", "x+1", "\\sqrt{2}", "red", "1/0", "5n"])
def test_not_a_number(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("pred,truth", [
    ("\\frac{3}{4}", "0.75"),
    ("3/4", "\\dfrac{3}{4}"),
    ("75%", "0.75"),
    ("75%", "75"),
    ("0.75", "75\\%"),
    ("1,234", "1234"),
    ("1.5 \\times 10^{3}", "1500"),
    ("1.5e3", "1500.0"),
    ("5 cm", "5"),
    ("5", "5 \\text{cm}"),
    ("\\text{Paris}", "paris."),
    ("(1,2)", "( 1, 2 )"),
    ("x = -2", "-2"),
    ("0.33333", "1/3"),
    ("\\$12.50", "12.5"),
    ("5\\ \\text{cm}", "5 cm"),
])
def test_answers_match(pred, truth):
    assert answers_match(pred, truth)[0]


@pytest.mark.parametrize("pred,truth", [
    ("0.76", "0.75"),
    ("5 cm", "5 m"),
    ("2x", "2"),
    ("1/3", "0.33"),  # 1% apart: outside the default 1e-4 relative tolerance
    ("London", "Paris"),
    ("1,2", "12"),
    ("-3/4", "3/4"),
])
def test_answers_differ(pred, truth):
    assert not answers_match(pred, truth)[0]


def test_tolerance_edges():
    # relative tolerance: 1e-4 of the larger magnitude
    assert answers_match("100.009", "100")[0]
    assert not answers_match("100.011", "100")[0]
    # absolute tolerance near zero, where a relative one would demand exact equality
    assert answers_match("1e-9", "0")[0]
    assert not answers_match("1e-7", "0")[0]
    assert answers_match("1e-7", "0", abs_tol=1e-6)[0]
    assert answers_match("0.33", "1/3", rel_tol=0.02)[0]


def test_unit_and_percent_options():
    assert not answers_match("5 cm", "5", units_optional=False)[0]
    assert answers_match("5 cm", "5 cm", units_optional=False)[0]
    assert not answers_match("75%", "0.75", percent_as_fraction=False)[0]
    assert answers_match("75%", "75", percent_as_fraction=False)[0]


# --------------------------------------------------------------------------------------------------------- verify


def test_r1_completion_with_nested_fraction_verifies():
    result = verify(R1_FRACTION, "0.8")
    assert result.correct and result.extracted == "\\dfrac{4}{5}" and result.reason == "numeric match"
    assert verify(R1_FRACTION, "\\frac{4}{5}").correct
    assert not verify(R1_FRACTION, "\\frac{3}{5}").correct


def test_right_number_only_in_think_block_does_not_verify():
    result = verify(R1_WRONG_FINAL, "80")
    assert not result.correct
    assert result.extracted == "84"
    assert verify(R1_WRONG_FINAL, "84").correct


def test_truncated_reasoning_does_not_verify():
    result = verify("<think>so the result is \\boxed{80} and now", "80")
    assert result == type(result)(False, None, "unterminated think block")


def test_boxed_answer_beats_later_answer_line():
    completion = "<think>...</think>\nThe total is \\boxed{12}.\nAnswer: 13"
    assert verify(completion, "12").correct
    assert not verify(completion, "13").correct


def test_no_answer_reason():
    result = verify("<think>compute</think>\n", "3")
    assert result == type(result)(False, None, "no answer found")


def test_empty_ground_truth_is_an_error():
    with pytest.raises(ValueError, match="ground-truth"):
        verify("\\boxed{1}", "  ")


# ------------------------------------------------------------------------------------------------ multiple choice


CHOICES = ["4", "6", "8", "10"]


@pytest.mark.parametrize("final", [
    "\\boxed{B}", "Answer: \\boxed{B}", "Answer: B", "(B)", "B.", "B)", "B", "Answer: (B) 6", "B. 6",
    "\\boxed{\\text{B}}", "The correct option is (B).", "The answer is B.", "Answer: option B", "\\boxed{6}",
    "Answer: 6", "\\boxed{(b)}",
])
def test_choice_styles(final):
    completion = f"<think>Options (A) 4 and (C) 8 are too far; it is 6.</think>\n{final}"
    result = verify(completion, "B", choices=CHOICES)
    assert result.correct, (final, result)
    assert result.extracted == "B"
    assert not verify(completion, "C", choices=CHOICES).correct


@pytest.mark.parametrize("final", ["\\boxed{E}", "Answer: 7", "I am not sure.", "(A) or (C)"])
def test_choice_not_named(final):
    completion = f"<think>thinking</think>\n{final}"
    result = verify(completion, "B", choices=CHOICES)
    assert not result.correct


def test_choice_inside_think_block_does_not_count():
    completion = "<think>It must be (B). Hmm, no, re-reading the axis it is 8.</think>\nAnswer: \\boxed{C}"
    result = verify(completion, "B", choices=CHOICES)
    assert (result.correct, result.extracted, result.reason) == (False, "C", "choice mismatch")
    assert verify(completion, "C", choices=CHOICES).correct


def test_ground_truth_as_option_text_and_mapping_choices():
    completion = R1V_CHOICE
    assert verify(completion, "6", choices=CHOICES).correct
    assert verify(completion, "B", choices={"A": "4", "B": "6", "C": "8"}).correct
    assert verify(completion, "(B)", choices={"(A)": "4", "(B)": "6"}).correct
    with pytest.raises(ValueError, match="names none of the options"):
        verify(completion, "7", choices=CHOICES)


def test_bare_letter_ground_truth_without_choices():
    assert verify(R1V_CHOICE, "B").correct
    assert not verify(R1V_CHOICE, "A").correct
    assert not verify("<think>x</think>\n\\boxed{6}", "B").correct  # no options: "6" names no letter


def test_choice_letter_rules():
    opts = {"A": "circle", "B": "triangle", "C": "square"}
    assert choice_letter("the triangle", opts) == "B"
    assert choice_letter("Triangle.", opts) == "B"
    assert choice_letter("D", opts) is None  # not an option
    assert choice_letter("a triangle", opts) == "B"  # the article, not option (A)
    assert choice_letter("A", opts) == "A"
    assert choice_letter("The answer is a circle", {}) is None  # lowercase "a" inside prose is no letter


# -------------------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("completion,strict,lenient", [
    ("<think>\nreasoning\n</think>\n\\boxed{3}", True, True),
    ("  <think>r</think>\nAnswer: 3", True, True),
    ("<think>r</think>\n<answer>3</answer>", True, True),
    ("<think>r</think>\nSo the answer is 3.", True, True),
    ("<think>r</think>\n3", False, True),  # strict needs an answer marker
    ("<think>r</think>\n   ", False, False),  # nothing after the block
    ("<think>   </think>\n\\boxed{3}", False, True),  # empty reasoning
    ("\\boxed{3}", False, False),  # no think block at all
    ("<think>r\n\\boxed{3}", False, False),  # never closed
    ("Sure! <think>r</think> \\boxed{3}", False, True),  # text before the block
    ("<think>a</think><think>b</think> \\boxed{3}", False, True),  # two blocks
    ("r</think>\n\\boxed{3}", False, True),  # opened by the prompt, not declared
])
def test_check_format(completion, strict, lenient):
    assert check_format(completion, mode="strict") is strict
    assert check_format(completion, mode="lenient") is lenient


def test_check_format_with_think_opened_by_prompt():
    assert check_format("reasoning\n</think>\n\\boxed{3}", think_opened=True)
    assert not check_format("<think>reasoning</think>\n\\boxed{3}", think_opened=True)  # a second opening tag
    with pytest.raises(ValueError, match="format mode"):
        check_format("x", mode="loose")


def test_round_to_truth():
    assert not answers_match("3.1416", "3.14")[0]
    assert answers_match("3.1416", "3.14", round_to_truth=True) == (True, "numeric match after rounding")
    assert answers_match("3.135", "3.14", round_to_truth=True)[0]  # exactly half a unit below
    assert not answers_match("3.1349", "3.14", round_to_truth=True)[0]
    assert not answers_match("2.4", "2", round_to_truth=True)[0]  # integers stay exact
    assert verify("<think>pi r^2</think> \\boxed{78.5398}", "78.54", round_to_truth=True).correct


def test_superscript_units():
    assert answers_match("25 cm²", "25 cm^2")[0]
    assert not answers_match("25 cm²", "25 cm^3")[0]
