"""The reward protocol, built-in rewards, dotted-path loading and validation (skyjax/rl/rewards.py)."""

import math
import textwrap

import numpy as np
import pytest

from skyjax.rl.rewards import (
    Reward,
    RewardError,
    Rollout,
    compute_rewards,
    load_reward,
    register_reward,
    registered_rewards,
    weighted_sum,
)

R1_PROMPT = "<｜User｜>What is 3/4 as a decimal?<｜Assistant｜><think>\n"


def rows_for(completions, answers=None, prompt="Question?", ids=None, meta=None):
    answers = answers or [None] * len(completions)
    return [Rollout(prompt=prompt, completion=c, answer=a, completion_ids=(ids[i] if ids else ()),
                    meta=(meta or {})) for i, (c, a) in enumerate(zip(completions, answers))]


# ------------------------------------------------------------------------------------------------------ built-ins


def test_accuracy_reward():
    rows = rows_for(
        ["<think>0.75</think>\n\\boxed{\\frac{3}{4}}",  # right
         "<think>it is 0.75</think>\n\\boxed{0.7}",  # right number in the reasoning, wrong final answer
         "<think>0.75 surely, but let me",  # truncated
         "\\boxed{0.75}",  # no ground truth on this row
         "Answer: 75%"],
        answers=["0.75", "0.75", "0.75", None, "0.75"])
    assert load_reward("accuracy")(rows) == [1.0, 0.0, 0.0, None, 1.0]
    assert load_reward("accuracy", percent_as_fraction=False)(rows)[4] == 0.0


def test_accuracy_reward_multiple_choice_from_meta():
    meta = {"choices": ["red", "green", "blue"]}
    rows = rows_for(["<think>x</think>\nAnswer: \\boxed{C}", "<think>x</think>\nAnswer: green", "<think>x</think> (A)"],
                    answers=["C", "C", "blue"], meta=meta)
    assert load_reward("accuracy")(rows) == [1.0, 0.0, 0.0]
    # the options under another column name
    rows = rows_for(["<think>x</think> blue"], answers=["C"], meta={"options": ["red", "green", "blue"]})
    assert load_reward("accuracy", choices_key="options")(rows) == [1.0]


def test_format_reward_sees_the_prompt_opening_think():
    completion = "The decimal is found by division.\n</think>\n\\boxed{0.75}"
    assert load_reward("format")(rows_for([completion], prompt=R1_PROMPT)) == [1.0]
    assert load_reward("format")(rows_for([completion], prompt="plain prompt")) == [0.0]
    assert load_reward("format", mode="lenient")(rows_for([completion], prompt="plain prompt")) == [1.0]
    assert load_reward("format")(rows_for(["<think>r</think>\nno marker here"])) == [0.0]


@pytest.mark.parametrize("length,expected", [
    (0, 0.0), (50, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0), (101, -1.0), (5000, -1.0),
])
def test_overlong_penalty_values(length, expected):
    # DAPO: 0 up to max_len - cache = 80, then ((100 - 20) - L) / 20, -1 past 100; expected values by hand
    rows = rows_for(["x" * length], ids=[[7] * length])
    assert load_reward("overlong", max_len=100, cache=20)(rows) == [pytest.approx(expected, abs=1e-12)]


def test_overlong_matches_trl():
    trl_rewards = pytest.importorskip("trl.rewards")
    lengths = [0, 10, 79, 80, 81, 95, 100, 101, 300]
    ids = [[1] * n for n in lengths]
    expected = trl_rewards.get_soft_overlong_punishment(100, 20)(ids)
    got = load_reward("overlong", max_len=100, cache=20)(rows_for(["x" * n for n in lengths], ids=ids))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_overlong_counts_tokens_not_characters():
    rows = rows_for(["a long completion text " * 40], ids=[[3] * 10])
    assert load_reward("overlong", max_len=100, cache=20)(rows) == [0.0]


def test_overlong_without_cache_is_a_hard_limit():
    rows = rows_for(["x", "x", "x"], ids=[[1] * 100, [1] * 101, [1] * 3])
    assert load_reward("overlong", max_len=100)(rows) == [0.0, -1.0, 0.0]


def test_overlong_option_errors():
    with pytest.raises(ValueError, match="max_len > 0"):
        load_reward("overlong")(rows_for(["x"], ids=[[1]]))
    with pytest.raises(RewardError, match=r"'overlong'.*cache 200 is not within"):
        load_reward("overlong", max_len=100, cache=200)(rows_for(["x"], ids=[[1]]))
    rows = rows_for(["ok", "no ids"], ids=[[1, 2], []])
    with pytest.raises(RewardError, match=r"^reward function 'overlong' raised ValueError: a completion has text but "
                                          r"no completion_ids; overlong counts tokens on row 1 of 2$"):
        load_reward("overlong", max_len=100, cache=20)(rows)


# ---------------------------------------------------------------------------------------------- registry, loading


def test_registry():
    assert {"accuracy", "format", "overlong"} <= set(registered_rewards())

    def always_half(rows):
        return [0.5] * len(rows)

    register_reward("test_always_half", always_half)
    assert load_reward("test_always_half")(rows_for(["a", "b"])) == [0.5, 0.5]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_always_half", always_half)
    register_reward("test_always_half", lambda rows: [1.0] * len(rows), overwrite=True)
    assert load_reward("test_always_half")(rows_for(["a"])) == [1.0]
    with pytest.raises(ValueError, match="without '.' or ':'"):
        register_reward("my.reward", always_half)
    with pytest.raises(TypeError, match="not callable"):
        register_reward("test_not_callable", 3)


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown reward 'acuracy': built-ins are accuracy, format, overlong"):
        load_reward("acuracy")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A package with reward functions on sys.path: rewardpkg_t/scoring.py, plus broken modules."""
    pkg = tmp_path / "rewardpkg_t"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text(textwrap.dedent("""
        THRESHOLD = 3

        def short_answer(rows, *, max_chars=10):
            return [None if r.answer is None else float(len(r.completion) <= max_chars) for r in rows]

        def flaky(rows):
            return [1.0 / (len(r.completion) - 3) for r in rows]  # ZeroDivisionError on 3-character rows

        def nan_on_second(rows):
            return [float("nan") if i == 1 else 0.0 for i in range(len(rows))]

        def too_few(rows):
            return [0.0] * (len(rows) - 1)

        def text_value(rows):
            return [0.0, "high"][: len(rows)]

        def infinite(rows):
            return [math.inf for _ in rows]

        def scalar(rows):
            return 1.0

        def batch_only(rows):
            if len(rows) > 2:
                raise RuntimeError("batch too large for the judge")
            return [0.0] * len(rows)

        class Scorer:
            @staticmethod
            def length(rows):
                return [float(len(r.completion)) for r in rows]

        import math
    """))
    (pkg / "broken.py").write_text("raise RuntimeError('config file missing')\n")
    (pkg / "needs_dep.py").write_text("import not_an_installed_package_t\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg


@pytest.mark.parametrize("spec", ["rewardpkg_t.scoring:short_answer", "rewardpkg_t.scoring.short_answer"])
def test_dotted_path_loading(user_module, spec):
    reward = load_reward(spec, max_chars=5)
    assert reward.name == spec
    rows = rows_for(["short", "much too long", "x"], answers=["a", "b", None])
    assert reward(rows) == [1.0, 0.0, None]


def test_dotted_path_to_a_class_attribute(user_module):
    assert load_reward("rewardpkg_t.scoring:Scorer.length")(rows_for(["abc"])) == [3.0]
    assert load_reward("rewardpkg_t.scoring.Scorer.length")(rows_for(["abcd"])) == [4.0]


@pytest.mark.parametrize("spec,message", [
    ("rewardpkg_t.missing:fn", r"^reward 'rewardpkg_t.missing:fn': cannot import module 'rewardpkg_t.missing' "
                               r"\(ModuleNotFoundError: No module named 'rewardpkg_t.missing'\)$"),
    ("no_such_pkg_t.mod.fn", r"cannot import module 'no_such_pkg_t.mod' \(ModuleNotFoundError"),
    ("rewardpkg_t.scoring:nothing", r"^reward 'rewardpkg_t.scoring:nothing': module 'rewardpkg_t.scoring' has no "
                                    r"attribute 'nothing'$"),
    ("rewardpkg_t.scoring:THRESHOLD", r"^reward 'rewardpkg_t.scoring:THRESHOLD': the object is a int, not a "
                                      r"callable$"),
    ("rewardpkg_t.broken:fn", r"importing module 'rewardpkg_t.broken' raised RuntimeError: config file missing"),
    ("rewardpkg_t.needs_dep:fn", r"importing module 'rewardpkg_t.needs_dep' failed \(ModuleNotFoundError: No module "
                                 r"named 'not_an_installed_package_t'\)"),
    ("rewardpkg_t.scoring:", r"expected package.module:function"),
])
def test_dotted_path_errors_are_one_line(user_module, spec, message):
    with pytest.raises(ValueError, match=message) as info:
        load_reward(spec)
    assert "\n" not in str(info.value)


def test_options_checked_at_load_time(user_module):
    with pytest.raises(ValueError, match=r"reward 'rewardpkg_t.scoring:short_answer' does not accept options "
                                         r"\['max_char'\]"):
        load_reward("rewardpkg_t.scoring:short_answer", max_char=3)
    with pytest.raises(ValueError, match=r"reward 'format' does not accept options \['strict'\]"):
        load_reward("format", strict=True)


def test_callable_is_accepted_directly():
    def my_reward(rows, *, bonus=0.0):
        return [1.0 + bonus for _ in rows]

    reward = load_reward(my_reward, bonus=0.5)
    assert isinstance(reward, Reward) and reward.name == "my_reward"
    assert reward(rows_for(["a"])) == [1.5]


# ----------------------------------------------------------------------------------------------------- validation


def test_raising_function_names_function_and_row(user_module):
    rows = rows_for(["long enough", "fine text", "abc", "more"])
    with pytest.raises(RewardError, match=r"^reward function 'rewardpkg_t.scoring:flaky' raised ZeroDivisionError: "
                                          r"float division by zero on row 2 of 4$") as info:
        load_reward("rewardpkg_t.scoring:flaky")(rows)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_batch_only_failure_is_reported_as_such(user_module):
    with pytest.raises(RewardError, match=r"'rewardpkg_t.scoring:batch_only' raised RuntimeError: batch too large "
                                          r"for the judge on the batch of 3 rows \(no single row reproduces it\)"):
        load_reward("rewardpkg_t.scoring:batch_only")(rows_for(["a", "b", "c"]))


@pytest.mark.parametrize("fn,message", [
    ("nan_on_second", r"'rewardpkg_t.scoring:nan_on_second' returned nan for row 1; return None when"),
    ("infinite", r"'rewardpkg_t.scoring:infinite' returned inf for row 0"),
    ("too_few", r"'rewardpkg_t.scoring:too_few' returned 1 rewards for 2 rows"),
    ("text_value", r"'rewardpkg_t.scoring:text_value' returned str 'high' for row 1, expected a float or None"),
    ("scalar", r"'rewardpkg_t.scoring:scalar' returned float, expected a list of 2 rewards"),
])
def test_bad_return_values(user_module, fn, message):
    with pytest.raises(RewardError, match=message):
        load_reward(f"rewardpkg_t.scoring:{fn}")(rows_for(["a", "b"]))


def test_numpy_and_bool_values_are_floats():
    reward = load_reward(lambda rows: np.array([True, 0.25], dtype=object))
    assert reward(rows_for(["a", "b"])) == [1.0, 0.25]
    assert all(type(v) is float for v in reward(rows_for(["a", "b"])))


# ----------------------------------------------------------------------------------------------------- combining


def test_compute_rewards_table():
    rows = rows_for(["<think>r</think>\n\\boxed{2}", "<think>r</think>\n\\boxed{3}", "no format"],
                    answers=["2", "2", None], ids=[[1] * 5, [1] * 95, [1] * 200])
    rewards = [load_reward("accuracy"), load_reward("format"), load_reward("overlong", max_len=100, cache=20)]
    table = compute_rewards(rewards, rows)
    expected = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, -0.75], [np.nan, 0.0, -1.0]])
    np.testing.assert_array_equal(table, expected)


def test_weighted_sum_by_hand():
    components = {"accuracy": [1.0, 0.0, None, None], "format": [1.0, None, 1.0, None]}
    got = weighted_sum(components, {"accuracy": 2.0, "format": 0.5})
    # row 0: 2*1 + 0.5*1; row 1: 2*0 (format skipped); row 2: 0.5*1; row 3: every term missing -> NaN
    np.testing.assert_array_equal(got, [2.5, 0.0, 0.5, np.nan])
    np.testing.assert_array_equal(weighted_sum(components), [2.0, 0.0, 1.0, np.nan])
    np.testing.assert_array_equal(weighted_sum(components, [1.0, -1.0]), [0.0, 0.0, -1.0, np.nan])


def test_weighted_sum_matches_trl_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    table = rng.normal(size=(64, 3))
    table[rng.random(size=table.shape) < 0.3] = np.nan
    table[5] = np.nan
    weights = np.array([1.0, 0.3, -0.5])
    # TRL 1.16 GRPOTrainer: (rewards_per_func * w).nansum(dim=1), then NaN where every function returned None
    r = torch.tensor(table, dtype=torch.float64)
    expected = (r * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    expected[torch.isnan(r).all(dim=1)] = torch.nan
    np.testing.assert_allclose(weighted_sum(table, weights), expected.numpy(), rtol=1e-15, atol=0)
    assert math.isnan(weighted_sum(table, weights)[5])


def test_weighted_sum_errors():
    with pytest.raises(ValueError, match="different row counts"):
        weighted_sum({"a": [1.0], "b": [1.0, 2.0]})
    with pytest.raises(ValueError, match="do not name the reward components"):
        weighted_sum({"a": [1.0]}, {"b": 1.0})
    with pytest.raises(ValueError, match="2 weights for 1 reward components"):
        weighted_sum({"a": [1.0]}, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"\[rows, functions\]"):
        weighted_sum(np.zeros(3))
