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
naming the function and, where there is one, the row (and the prompt row's file:line when the rows carry it);
``compute_rewards(..., on_error="skip")`` instead leaves the failed rows unscored and reports them.

A reward that needs the run itself (the reward model: the trainer's mesh and dtype) is a *factory*, marked with
``@reward_factory``: ``load_reward`` calls it once with a ``RewardContext`` and the options, and the function it
returns is the reward. The built-in ``reward_model`` (skyjax.rl.reward_model) is one; user factories load by dotted
path like any reward.
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

from skyjax.errors import UserError
from skyjax.eval.verifiers import THINK_OPEN, check_format, verify


@dataclass(frozen=True)
class Rollout:
    """One completion of one prompt, as the reward functions see it.

    prompt: the prompt text as the policy saw it (chat template applied). completion: the generated text.
    completion_ids: its token ids (length rewards count these). images: paths of the prompt's images.
    answer: the ground truth, None when the data set has none. meta: any other data-set columns (``choices`` for
    multiple choice, a question id, a difficulty tag, ...). messages: the prompt conversation before any chat
    template (TRL's conversational messages, images as ``{"type": "image"}`` parts), for rewards that render it
    with a template of their own (the reward model). image_data: the prompt's images decoded (PIL, in ``images``
    order) when the caller has them, so a reward need not read the files again. where: the prompt row's file:line,
    named by errors.
    """

    prompt: str
    completion: str
    completion_ids: Sequence[int] = ()
    images: Sequence[str] = ()
    answer: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    messages: Sequence[Mapping[str, Any]] = ()
    image_data: Sequence[Any] = ()
    where: str = ""


RewardFn = Callable[..., Sequence[float | None]]


class RewardError(UserError, ValueError):
    """A reward function failed or returned something unusable; the message names the function and the row."""


class RowFailures(Exception):
    """Raised by a reward function that scored what it could and knows which rows it could not: ``values`` holds one
    entry per row (ignored for the failed ones), ``reasons`` maps a failed row's index to why. The rows are then not
    rerun one by one; the reward model raises it for a conversation longer than it accepts."""

    def __init__(self, values: Sequence[float | None], reasons: Mapping[int, str]):
        super().__init__(f"{len(reasons)} rows failed")
        self.values, self.reasons = list(values), dict(reasons)


@dataclass(frozen=True)
class RewardFailure:
    """One row a reward function could not score: which function, which row (index and file:line) and why."""

    reward: str
    row: int
    where: str
    message: str  # the one-line error, naming the function and the row
    cause: BaseException | None = None


@dataclass(frozen=True)
class RewardContext:
    """What a reward factory receives from the run that loads it: the mesh the policy lives on (the reward model is
    placed on it: no second set of devices), the run's compute dtype, and the policy's tokenizer. All None outside
    a run (a factory then picks its own defaults)."""

    mesh: Any = None
    dtype: str | None = None
    tokenizer: Any = None


def reward_factory(fn: Callable) -> Callable:
    """Mark ``fn(context, **options) -> reward function`` as a factory (see the module docstring)."""
    fn.__skyjax_reward_factory__ = True
    return fn


def is_reward_factory(obj: Any) -> bool:
    return bool(getattr(obj, "__skyjax_reward_factory__", False))


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


_REGISTRY: dict[str, RewardFn | str] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "overlong": overlong_reward,
    # a dotted path, imported when loaded: the reward model needs JAX and the models, the rest of this module not
    "reward_model": "skyjax.rl.reward_model:reward_model",
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
    """A reward function bound to its options; calling it validates what the function returns.

    ``on_error`` (None: the caller's choice, see ``compute_rewards``) says what a failure does: "raise" a
    ``RewardError``, or "skip" the rows that fail (``evaluate`` reports them)."""

    name: str
    fn: RewardFn
    options: Mapping[str, Any] = field(default_factory=dict)
    on_error: Literal["raise", "skip"] | None = None

    def __call__(self, rows: Sequence[Rollout]) -> list[float | None]:
        values, failures = self.evaluate(rows, on_error="raise")
        return values

    def evaluate(self, rows: Sequence[Rollout], on_error: Literal["raise", "skip"] = "raise"
                 ) -> tuple[list[float | None], list[RewardFailure]]:
        """(one value per row, the rows that failed). With "raise" the first failure is a ``RewardError`` instead;
        with "skip" a failed row's value is None and its failure is listed."""
        rows = list(rows)
        try:
            values = self.fn(rows, **self.options)
        except RowFailures as e:
            failures = [self._failure(rows, i, f"reward function '{self.name}' could not score row {i} of "
                                               f"{len(rows)}{_at(rows, i)}: {why}")
                        for i, why in sorted(e.reasons.items())]
            if failures and on_error == "raise":
                raise RewardError(failures[0].message) from None
            values = [None if i in e.reasons else v for i, v in enumerate(e.values)]
            checked, more = self._check(rows, values, on_error)
            return checked, failures + more
        except Exception as e:  # noqa: BLE001 - any failure is reported with the row that causes it
            if on_error == "raise":
                raise RewardError(self._locate_failure(rows, e)) from e
            return self._row_by_row(rows)
        return self._check(rows, values, on_error)

    def _check(self, rows, values, on_error) -> tuple[list[float | None], list[RewardFailure]]:
        """Validated values; a value that is not a finite float or None fails its row."""
        n = len(rows)
        try:
            _check_container(self.name, values, n)
        except RewardError as e:
            if on_error == "raise":
                raise
            return [None] * n, [self._failure(rows, i, str(e)) for i in range(n)]
        out: list[float | None] = []
        failures: list[RewardFailure] = []
        for i, v in enumerate(values):
            try:
                out.append(_value(self.name, v, i, _at(rows, i)))
            except RewardError as e:
                if on_error == "raise":
                    raise
                out.append(None)
                failures.append(self._failure(rows, i, str(e)))
        return out, failures

    def _failure(self, rows, i: int, message: str, cause: BaseException | None = None) -> RewardFailure:
        return RewardFailure(self.name, i, rows[i].where if i < len(rows) else "", message, cause)

    def _row_by_row(self, rows: list[Rollout]) -> tuple[list[float | None], list[RewardFailure]]:
        """on_error="skip" after the batch raised: each row alone; a row that fails alone is skipped, the others
        keep the value they get alone. Only a function that fails on every row alone skips them all."""
        out: list[float | None] = []
        failures: list[RewardFailure] = []
        for i, row in enumerate(rows):
            try:
                value = self.fn([row], **self.options)
            except Exception as single:  # noqa: BLE001
                out.append(None)
                failures.append(self._failure(rows, i, f"reward function '{self.name}' raised "
                                                       f"{type(single).__name__}: {single} on row {i} of "
                                                       f"{len(rows)}{_at(rows, i)}", single))
                continue
            try:
                _check_container(self.name, value, 1)
                out.append(_value(self.name, value[0], i, _at(rows, i)))
            except RewardError as bad:
                out.append(None)
                failures.append(self._failure(rows, i, str(bad)))
        return out, failures

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
                            f"on row {i} of {len(rows)}{_at(rows, i)}")
            return f"reward function '{self.name}' raised {what} on the batch of {len(rows)} rows " \
                   "(no single row reproduces it)"
        return f"reward function '{self.name}' raised {what} on row 0 of {len(rows)}{_at(rows, 0)}"


def _at(rows: Sequence[Rollout], i: int) -> str:
    """" (file:line)" of row i's prompt when the rows carry it, else nothing."""
    where = rows[i].where if i < len(rows) else ""
    return f" ({where})" if where else ""


def _check_container(name: str, values: Any, n: int) -> None:
    """A sequence of n values; RewardError naming the function otherwise."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward function '{name}' returned {type(values).__name__}, expected a list of {n} "
                          "rewards (float or None)")
    if len(values) != n:
        raise RewardError(f"reward function '{name}' returned {len(values)} rewards for {n} rows")


def _value(name: str, v: Any, i: int, at: str = "") -> float | None:
    """A float or None, finite; RewardError naming the function and row i (at: its file:line) otherwise."""
    if v is None:
        return None
    if not isinstance(v, numbers.Real):  # bool, int, float, numpy scalars; not str, not arrays
        raise RewardError(f"reward function '{name}' returned {type(v).__name__} {v!r:.40} for row {i}{at}, "
                          "expected a float or None")
    f = float(v)
    if not math.isfinite(f):
        raise RewardError(f"reward function '{name}' returned {f} for row {i}{at}; return None when a reward "
                          "does not apply to a row")
    return f


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


def load_reward(spec: str | Callable, context: RewardContext | None = None, /, **options: Any) -> Reward:
    """A ``Reward`` from a registered name ("accuracy", "format", "overlong", "reward_model"), a dotted path to a user
    function ("package.module:function" or "package.module.function"), or a callable. ``options`` are passed to the
    function as keyword arguments on every call; they are checked against its signature now, not at the first
    rollout. A reward factory (``@reward_factory``) is called now, with ``context`` (the run's mesh, dtype and
    tokenizer; an empty context when None) and the options, and the function it returns is the reward."""
    if callable(spec):
        name, fn = getattr(spec, "__name__", type(spec).__name__), spec
    elif spec in _REGISTRY:
        name, fn = spec, _REGISTRY[spec]
        if isinstance(fn, str):
            fn = _import_object(fn)
    elif "." in spec or ":" in spec:
        name, fn = spec, _import_object(spec)
        if not callable(fn):
            raise ValueError(f"reward {spec!r}: the object is a {type(fn).__name__}, not a callable")
    else:
        raise ValueError(f"unknown reward {spec!r}: built-ins are {', '.join(registered_rewards())}; a user "
                         "function is given as package.module:function")
    factory = is_reward_factory(fn)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have no signature: check at call time
        signature = None
    if signature is not None:
        try:
            if factory:
                signature.bind(context, **options)
            else:
                signature.bind([], **options)
        except TypeError as e:
            raise ValueError(f"reward {name!r} does not accept options {sorted(options)}: {e}") from None
    if factory:
        built = fn(context if context is not None else RewardContext(), **options)
        if not callable(built):
            raise ValueError(f"reward {name!r}: the factory returned a {type(built).__name__}, not a callable")
        return Reward(name, built, {})
    return Reward(name, fn, dict(options))


# ------------------------------------------------------------------------------------------------------ combining


def compute_rewards(rewards: Sequence[Reward], rows: Sequence[Rollout], *, on_error: Literal["raise", "skip"] = "raise",
                    failures: list[RewardFailure] | None = None) -> np.ndarray:
    """Every reward on every row: float64 [len(rows), len(rewards)], NaN where a function returned None.

    on_error: what a function that raises or returns something unusable does (a reward's own ``on_error`` wins):
    "raise" a ``RewardError`` naming the function and the row, or "skip": the failed cells stay NaN and each failure
    is appended to ``failures`` (``failed_rows`` turns them into a mask: such a row should get no reward at all,
    not the sum of the functions that did not fail)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    rows = list(rows)
    table = np.full((len(rows), len(rewards)), np.nan, dtype=np.float64)
    for k, reward in enumerate(rewards):
        values, failed = reward.evaluate(rows, reward.on_error or on_error)
        if failures is not None:
            failures.extend(failed)
        for i, v in enumerate(values):
            if v is not None:
                table[i, k] = v
    return table


def failed_rows(failures: Sequence[RewardFailure], n: int) -> np.ndarray:
    """bool [n]: the rows at least one reward function failed on."""
    mask = np.zeros(n, bool)
    for f in failures:
        mask[f.row] = True
    return mask


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
