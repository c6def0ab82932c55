"""The reward protocol of GRPO: rows of rollouts in, one float-or-None per row out.

A reward function is any callable ``fn(rows, **options) -> list[float | None]`` taking a list of ``Rollout`` rows
(prompt, image paths, completion text and token ids, ground truth, free-form meta) and returning one reward per row,
in order. ``None`` means "does not apply to this row" (no ground truth, a question type the function does not
judge); it is not zero: ``weighted_sum`` leaves it out, and a row every function skipped is NaN (unscorable).

Built-ins, by name: ``accuracy`` (the final answer verified against the ground truth), ``format`` (R1-style
``<think>...</think>`` then an answer) and ``overlong`` (DAPO's soft overlong penalty, in tokens). User functions
are loaded by dotted path, ``package.module:function`` or ``package.module.function``::

    # my_rewards.py
    def short_answer(rows, *, max_chars=200):
        return [None if r.answer is None else float(len(r.completion) <= max_chars) for r in rows]

    reward = load_reward("my_rewards:short_answer", max_chars=100)
    values = reward(rows)              # validated: right length, finite floats or None

A function that raises, returns the wrong number of rewards, NaN, infinity or a non-number raises ``RewardError``
naming the function and, where there is one, the row.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from skyjax.eval.verifiers import THINK_OPEN, check_format, verify


@dataclass(frozen=True)
class Rollout:
    """One completion of one prompt, as the reward functions see it.

    prompt: the prompt text as the policy saw it (chat template applied). completion: the generated text.
    completion_ids: its token ids (length rewards count these). images: paths of the prompt's images.
    answer: the ground truth, None when the data set has none. meta: any other data-set columns (``choices`` for
    multiple choice, a question id, a difficulty tag, ...).
    """

    prompt: str
    completion: str
    completion_ids: Sequence[int] = ()
    images: Sequence[str] = ()
    answer: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


RewardFn = Callable[..., Sequence[float | None]]


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names the function and the row."""


# ------------------------------------------------------------------------------------------------------ built-ins


def accuracy_reward(rows: Sequence[Rollout], *, rel_tol: float = 1e-4, abs_tol: float = 1e-8,
                    units_optional: bool = True, percent_as_fraction: bool = True, round_to_truth: bool = False,
                    choices_key: str = "choices") -> list[float | None]:
    """1.0 when the completion's final answer equals the row's ground truth, else 0.0; None without a ground truth.
    Multiple choice when ``meta[choices_key]`` holds the options (or the answer is a bare letter). A think block
    left open (a truncated completion) scores 0: there is no final answer."""
    out: list[float | None] = []
    for row in rows:
        if row.answer is None or not str(row.answer).strip():
            out.append(None)
            continue
        result = verify(row.completion, str(row.answer), choices=row.meta.get(choices_key), rel_tol=rel_tol,
                        abs_tol=abs_tol, units_optional=units_optional, percent_as_fraction=percent_as_fraction,
                        round_to_truth=round_to_truth)
        out.append(1.0 if result.correct else 0.0)
    return out


def format_reward(rows: Sequence[Rollout], *, mode: Literal["strict", "lenient"] = "strict") -> list[float | None]:
    """1.0 when the completion has the ``<think>...</think> answer`` format (see ``check_format``), else 0.0.
    A prompt ending in ``<think>`` (R1-distilled chat templates open the block for the model) counts as the
    completion's opening tag."""
    return [1.0 if check_format(row.completion, mode=mode, think_opened=row.prompt.rstrip().endswith(THINK_OPEN))
            else 0.0 for row in rows]


def overlong_reward(rows: Sequence[Rollout], *, max_len: int | None = None, cache: int = 0) -> list[float | None]:
    """DAPO's soft overlong penalty on the completion's token count L:
    0 for L <= max_len - cache, ((max_len - cache) - L) / cache in between (linear from 0 to -1), -1 beyond max_len.
    Counted in tokens (``completion_ids``), never characters: the budget the sampler enforces is in tokens."""
    if max_len is None or max_len <= 0:
        raise ValueError(f"overlong reward needs max_len > 0 (the completion token budget), got {max_len}")
    if not 0 <= cache <= max_len:
        raise ValueError(f"overlong reward: cache {cache} is not within [0, max_len={max_len}]")
    out: list[float | None] = []
    for row in rows:
        n = len(row.completion_ids)
        if n == 0 and row.completion:
            # the Reward wrapper names the row: it reruns the function row by row when it fails
            raise ValueError("a completion has text but no completion_ids; overlong counts tokens")
        if n <= max_len - cache:
            out.append(0.0)
        elif n <= max_len:
            out.append(((max_len - cache) - n) / cache)
        else:
            out.append(-1.0)
    return out


_REGISTRY: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "overlong": overlong_reward,
}


def register_reward(name: str, fn: RewardFn, *, overwrite: bool = False) -> None:
    """Make ``fn`` loadable by ``name`` (a plain word: names with '.' or ':' are dotted paths)."""
    if not name or "." in name or ":" in name:
        raise ValueError(f"reward name {name!r} must be a non-empty word without '.' or ':'")
    if not callable(fn):
        raise TypeError(f"reward {name!r}: {type(fn).__name__} object is not callable")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = fn


def registered_rewards() -> tuple[str, ...]:
    """Names ``load_reward`` resolves without a dotted path."""
    return tuple(sorted(_REGISTRY))


# --------------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Reward:
    """A reward function bound to its options; calling it validates what the function returns."""

    name: str
    fn: RewardFn
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, rows: Sequence[Rollout]) -> list[float | None]:
        rows = list(rows)
        try:
            values = self.fn(rows, **self.options)
        except Exception as e:  # noqa: BLE001 - any failure is reported with the row that causes it
            raise RewardError(self._locate_failure(rows, e)) from e
        return _validate(self.name, values, len(rows))

    def _locate_failure(self, rows: list[Rollout], error: Exception) -> str:
        """Name the first row that fails on its own. The function runs again row by row: only on this error path,
        so a reward with side effects (a remote judge) repeats its calls only when it has already failed."""
        what = f"{type(error).__name__}: {error}"
        if len(rows) > 1:
            for i, row in enumerate(rows):
                try:
                    self.fn([row], **self.options)
                except Exception as single:  # noqa: BLE001
                    return (f"reward function '{self.name}' raised {type(single).__name__}: {single} "
                            f"on row {i} of {len(rows)}")
            return f"reward function '{self.name}' raised {what} on the batch of {len(rows)} rows " \
                   "(no single row reproduces it)"
        return f"reward function '{self.name}' raised {what} on row 0 of {len(rows)}"


def _validate(name: str, values: Any, n: int) -> list[float | None]:
    """Floats or None, one per row, all finite; RewardError naming the function (and row) otherwise."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward function '{name}' returned {type(values).__name__}, expected a list of {n} "
                          "rewards (float or None)")
    if len(values) != n:
        raise RewardError(f"reward function '{name}' returned {len(values)} rewards for {n} rows")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, numbers.Real):  # bool, int, float, numpy scalars; not str, not arrays
            raise RewardError(f"reward function '{name}' returned {type(v).__name__} {v!r:.40} for row {i}, "
                              "expected a float or None")
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"reward function '{name}' returned {f} for row {i}; return None when a reward "
                              "does not apply to a row")
        out.append(f)
    return out


def _import_object(spec: str) -> Any:
    """The object at ``package.module:attr.attr`` or ``package.module.attr``; one-line ValueError otherwise."""
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
        candidates = [(module_name, attr_path)]
    else:
        parts = spec.split(".")
        # "a.b.c" is module "a.b", attribute "c" (or module "a", attribute "b.c"): try the longest module first
        candidates = [(".".join(parts[:k]), ".".join(parts[k:])) for k in range(len(parts) - 1, 0, -1)]
    if not all(m and a for m, a in candidates):
        raise ValueError(f"reward {spec!r}: expected package.module:function or package.module.function")
    first_error: str | None = None
    for module_name, attr_path in candidates:
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
                # the module exists but one of its own imports is missing: that is the error to report
                raise ValueError(f"reward {spec!r}: importing module '{module_name}' failed "
                                 f"({type(e).__name__}: {e})") from None
            first_error = first_error or f"cannot import module '{module_name}' ({type(e).__name__}: {e})"
            continue
        except Exception as e:  # noqa: BLE001 - the module's own code failed while importing
            raise ValueError(f"reward {spec!r}: importing module '{module_name}' raised "
                             f"{type(e).__name__}: {e}") from None
        for attr in attr_path.split("."):
            if not hasattr(obj, attr):
                raise ValueError(f"reward {spec!r}: module '{module_name}' has no attribute '{attr_path}'")
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f"reward {spec!r}: {first_error}")


def load_reward(spec: str | Callable, **options: Any) -> Reward:
    """A ``Reward`` from a registered name ("accuracy", "format", "overlong"), a dotted path to a user function
    ("package.module:function" or "package.module.function"), or a callable. ``options`` are passed to the
    function as keyword arguments on every call; they are checked against its signature now, not at the first
    rollout."""
    if callable(spec):
        name, fn = getattr(spec, "__name__", type(spec).__name__), spec
    elif spec in _REGISTRY:
        name, fn = spec, _REGISTRY[spec]
    elif "." in spec or ":" in spec:
        name, fn = spec, _import_object(spec)
        if not callable(fn):
            raise ValueError(f"reward {spec!r}: the object is a {type(fn).__name__}, not a callable")
    else:
        raise ValueError(f"unknown reward {spec!r}: built-ins are {', '.join(registered_rewards())}; a user "
                         "function is given as package.module:function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have no signature: check at call time
        signature = None
    if signature is not None:
        try:
            signature.bind([], **options)
        except TypeError as e:
            raise ValueError(f"reward {name!r} does not accept options {sorted(options)}: {e}") from None
    return Reward(name, fn, dict(options))


# ------------------------------------------------------------------------------------------------------ combining


def compute_rewards(rewards: Sequence[Reward], rows: Sequence[Rollout]) -> np.ndarray:
    """Every reward on every row: float64 [len(rows), len(rewards)], NaN where a function returned None."""
    rows = list(rows)
    table = np.full((len(rows), len(rewards)), np.nan, dtype=np.float64)
    for k, reward in enumerate(rewards):
        for i, v in enumerate(reward(rows)):
            if v is not None:
                table[i, k] = v
    return table


def weighted_sum(components: Mapping[str, Sequence[float | None]] | np.ndarray,
                 weights: Mapping[str, float] | Sequence[float] | None = None) -> np.ndarray:
    """r = sum_k w_k * r_k per row, skipping None/NaN terms (a nansum), NaN for a row where every term is missing.

    components: name -> one value per row (None = not applicable), or an array [rows, functions] with NaN for
    missing. weights: per function (a mapping by name, or a sequence in the components' order); all 1 when None.
    A missing term contributes nothing whatever its weight; a row with no term at all stays NaN so the advantage
    computation can leave it out of its group's baseline rather than treat it as a reward of 0.
    """
    if isinstance(components, Mapping):
        names = list(components)
        columns = [[np.nan if v is None else float(v) for v in components[n]] for n in names]
        lengths = {len(c) for c in columns}
        if len(lengths) > 1:
            raise ValueError(f"reward components have different row counts: "
                             f"{ {n: len(c) for n, c in zip(names, columns)} }")
        table = np.array(columns, dtype=np.float64).T.reshape(lengths.pop() if lengths else 0, len(names))
    else:
        names = None
        table = np.asarray(components, dtype=np.float64)
        if table.ndim != 2:
            raise ValueError(f"reward components must be [rows, functions], got shape {table.shape}")
    n_funcs = table.shape[1]
    if weights is None:
        w = np.ones(n_funcs)
    elif isinstance(weights, Mapping):
        if names is None:
            raise ValueError("weights by name need components by name")
        if set(weights) != set(names):
            raise ValueError(f"weights {sorted(weights)} do not name the reward components {sorted(names)}")
        w = np.array([float(weights[n]) for n in names])
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n_funcs,):
            raise ValueError(f"{w.size} weights for {n_funcs} reward components")
    missing = np.isnan(table)
    total = np.where(missing, 0.0, table * w).sum(axis=1)
    return np.where(missing.all(axis=1), np.nan, total)  # with no functions every row is unscorable
