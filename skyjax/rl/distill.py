"""Scores of the adaptive-length chain-of-thought sampler: how clear the image is, how demanding the question is,
how much the answer needs image and text together, and the repetition penalty these set for sampling.

Pure functions of an image and a question; the sampler that uses them lives elsewhere.

- ``image_clarity``: sharpness (variance of the Laplacian of the grayscale image, squashed to 0..1) combined with a
  resolution term (log pixel count between ``min_pixels`` and ``max_pixels``): the locally computable vision score.
- ``text_score`` (question quality, difficulty, reasoning demand) and ``integration_score`` (causal why/how
  questions, several objects in spatial relation, co-occurring domain terms score high; what/where look-ups score
  low): transparent keyword heuristics returning 0..1. A model or external judge can replace them through the
  ``QueryJudge`` protocol.
- ``minmax_normalise`` over a data set, then ``drlc_penalty``:
  P = min(cap, exp(alpha * (1 - (S_v + beta*S_t + gamma*S_I) / (1 + beta + gamma)))).
  High scores (a clear image, a hard question that needs the image) give P near 1, long chains of thought;
  low scores give up to ``cap``, short chains.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# ------------------------------------------------------------------------------------------------- image clarity


@dataclass(frozen=True)
class ClarityConfig:
    """How ``image_clarity`` scores an image.

    sharpness_scale: the Laplacian variance (grayscale 0..255) that scores 0.5; 100 is the usual blur threshold
      for the variance-of-Laplacian test, so a borderline image lands in the middle.
    min_pixels / max_pixels: the resolution term is 0 at or below min_pixels and 1 at or above max_pixels, log-linear
      in between. Defaults: a quarter of one 448 x 448 tile (below it the vision encoder mostly sees upsampling) and
      12 tiles (the most InternVL-style dynamic tiling uses; larger images are downscaled, so more pixels add nothing).
    sharpness_weight / resolution_weight: the clarity is their weighted mean; equal by default, since neither the
      blur nor the resolution analysis is said to matter more.
    """

    sharpness_scale: float = 100.0
    min_pixels: int = 224 * 224
    max_pixels: int = 12 * 448 * 448
    sharpness_weight: float = 0.5
    resolution_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.sharpness_scale <= 0:
            raise ValueError(f"sharpness_scale must be > 0, got {self.sharpness_scale}")
        if not 0 < self.min_pixels < self.max_pixels:
            raise ValueError(f"need 0 < min_pixels < max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.sharpness_weight < 0 or self.resolution_weight < 0 or \
                self.sharpness_weight + self.resolution_weight <= 0:
            raise ValueError("clarity weights must be >= 0 and not both 0")


def to_grayscale(image: Any) -> np.ndarray:
    """float64 [H, W] luminance on a 0..255 scale (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, as PIL's "L" mode).

    image: a path, a PIL image, or an array [H, W] / [H, W, 3|4]; integer arrays are 0..255, float arrays 0..1.
    Alpha is dropped. Kept in float so that faint detail is not rounded away before the Laplacian.
    """
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            return to_grayscale(im)
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image, without importing PIL for arrays
        image = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    arr = np.asarray(image)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64) * 255.0
    else:
        arr = arr.astype(np.float64)
    if arr.ndim == 3:
        if arr.shape[2] not in (3, 4):
            raise ValueError(f"image array has {arr.shape[2]} channels; expected 3 (RGB) or 4 (RGBA)")
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    elif arr.ndim != 2:
        raise ValueError(f"image array must be [H, W] or [H, W, C], got shape {arr.shape}")
    return arr


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels (no padding: a padded border would add edges
    the image does not have). 0 for images under 3 x 3."""
    g = np.asarray(gray, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def sharpness_score(variance: float, scale: float = 100.0) -> float:
    """v / (v + scale): 0 for a flat image, 0.5 at ``scale``, towards 1 for a sharp one; monotone in v."""
    v = max(float(variance), 0.0)
    return v / (v + scale)


def resolution_score(height: int, width: int, min_pixels: int = 224 * 224, max_pixels: int = 12 * 448 * 448) -> float:
    """log(pixels / min_pixels) / log(max_pixels / min_pixels), clipped to 0..1: doubling the pixels adds the same
    amount anywhere in the range, as detail grows with the scale factor rather than the pixel difference."""
    pixels = max(int(height) * int(width), 1)
    t = math.log(pixels / min_pixels) / math.log(max_pixels / min_pixels)
    return min(max(t, 0.0), 1.0)


def image_clarity(image: Any, config: ClarityConfig = ClarityConfig()) -> float:
    """Clarity in 0..1: (w_s * sharpness + w_r * resolution) / (w_s + w_r), see ``ClarityConfig``."""
    gray = to_grayscale(image)
    sharp = sharpness_score(laplacian_variance(gray), config.sharpness_scale)
    res = resolution_score(gray.shape[0], gray.shape[1], config.min_pixels, config.max_pixels)
    w_s, w_r = config.sharpness_weight, config.resolution_weight
    return (w_s * sharp + w_r * res) / (w_s + w_r)


# ------------------------------------------------------------------------------------------------- normalisation


def minmax_normalise(scores: Sequence[float] | np.ndarray, *, constant: float = 0.5) -> np.ndarray:
    """(s - min) / (max - min) over a data set, per column for a 2-D array [rows, scores].

    A constant column maps to ``constant`` (0.5 by default): it carries no ranking, and the midpoint is the neutral
    value of the penalty formula. 0 would push every row to the shortest chains and 1 to the longest, a decision
    the data gave no evidence for. Non-finite scores raise: a missing score must be filled in by the caller.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim not in (1, 2):
        raise ValueError(f"scores must be [rows] or [rows, scores], got shape {s.shape}")
    bad = np.argwhere(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"score at index {tuple(int(i) for i in bad[0])} is {s[tuple(bad[0])]}; scores must be finite")
    if s.shape[0] == 0:
        return s.copy()
    lo, hi = s.min(axis=0), s.max(axis=0)
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    return np.where(span > 0, (s - lo) / safe, constant)


# ----------------------------------------------------------------------------------------------------------- DRLC


@dataclass(frozen=True)
class DRLCConfig:
    """The penalty formula's constants. The method leaves alpha, beta and gamma open; the defaults here are chosen:
    alpha = ln 2 makes the penalty span exactly [1, 2] (all scores 0 -> 2, all 1 -> 1) so the cap never clips and
    the full range is used; beta = gamma = 1 weighs the vision, text and integration scores equally. cap is 2 as in
    the method."""

    alpha: float = math.log(2.0)
    beta: float = 1.0
    gamma: float = 1.0
    cap: float = 2.0


def drlc_penalty(s_v: float | np.ndarray, s_t: float | np.ndarray, s_i: float | np.ndarray,
                 alpha: float = DRLCConfig.alpha, beta: float = DRLCConfig.beta, gamma: float = DRLCConfig.gamma,
                 cap: float = DRLCConfig.cap) -> float | np.ndarray:
    """Sampling repetition penalty min(cap, exp(alpha * (1 - (S_v + beta*S_t + gamma*S_I) / (1 + beta + gamma)))).

    Scores are min-max normalised (0..1; broadcasting arrays allowed). Returns a float for scalar inputs.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (a penalty below 1 would reward repetition), got {alpha}")
    if beta < 0 or gamma < 0:
        raise ValueError(f"beta and gamma must be >= 0, got {beta}, {gamma}")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    arrays = [np.asarray(x, dtype=np.float64) for x in (s_v, s_t, s_i)]
    for name, a in zip(("s_v", "s_t", "s_i"), arrays):
        if not np.all(np.isfinite(a)) or np.any(a < -1e-9) or np.any(a > 1 + 1e-9):
            raise ValueError(f"{name} must be normalised scores in [0, 1] (see minmax_normalise)")
    v, t, i = arrays
    combined = (v + beta * t + gamma * i) / (1.0 + beta + gamma)
    p = np.minimum(cap, np.exp(alpha * (1.0 - combined)))
    return float(p) if p.ndim == 0 else p


def dataset_penalties(s_v: Sequence[float], s_t: Sequence[float], s_i: Sequence[float],
                      config: DRLCConfig = DRLCConfig()) -> np.ndarray:
    """Raw scores of a whole data set -> one penalty per row: each score min-max normalised, then ``drlc_penalty``."""
    raw = np.stack([np.asarray(x, dtype=np.float64) for x in (s_v, s_t, s_i)], axis=1)
    norm = minmax_normalise(raw)
    return np.asarray(drlc_penalty(norm[:, 0], norm[:, 1], norm[:, 2], config.alpha, config.beta, config.gamma,
                                   config.cap))


# ------------------------------------------------------------------------------------------- question heuristics


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def _count_phrases(text: str, phrases: Sequence[str]) -> int:
    """How many of the phrases occur in the text as whole words (each counted once)."""
    low = " " + re.sub(r"[^a-z0-9]+", " ", text.lower()) + " "
    return sum(1 for p in phrases if f" {p} " in low)


_REASONING_VERBS = ("why", "how", "explain", "prove", "show that", "derive", "calculate", "compute", "determine",
                    "estimate", "compare", "justify", "infer", "predict", "evaluate", "solve", "find", "deduce")
_CONDITIONS = ("if", "given", "assume", "assuming", "suppose", "such that", "then", "respectively", "after",
               "before", "when", "while", "each", "total", "unless", "otherwise", "at least", "at most")
_MATH = re.compile(r"\d+(?:\.\d+)?|[=+*/^<>≤≥√π∑∫]|\\[a-zA-Z]+|\b(?:sin|cos|tan|log|ln)\b")


@dataclass(frozen=True)
class TextScoreWeights:
    """Weights of ``text_score``'s parts (each 0..1); they sum to 1 so the score stays in 0..1."""

    length: float = 0.25  # min(1, words / 40): a fuller statement carries more constraints
    reasoning: float = 0.35  # distinct reasoning verbs (why, how, prove, calculate, ...) / 2
    quantitative: float = 0.25  # numbers, operators and LaTeX commands / 4
    conditions: float = 0.15  # conditional and multi-step connectives (if, given, then, each, ...) / 2


def text_score(question: str, weights: TextScoreWeights = TextScoreWeights()) -> float:
    """Heuristic question quality, difficulty and reasoning demand in 0..1.

    A weighted sum of saturating counts (see ``TextScoreWeights``). Questions under 3 words score 0: too short to
    be well posed. A stand-in for a judge model: cheap, deterministic, and ranking long quantitative multi-step
    problems above short factual ones.
    """
    words = _words(question)
    if len(words) < 3:
        return 0.0
    # "how many" / "how much" ask for a count or amount, not for reasoning: drop them before counting "how"
    reasoning_text = re.sub(r"\bhow\s+(?:many|much)\b", " ", question, flags=re.IGNORECASE)
    parts = {
        "length": min(1.0, len(words) / 40.0),
        "reasoning": min(1.0, _count_phrases(reasoning_text, _REASONING_VERBS) / 2.0),
        "quantitative": min(1.0, len(_MATH.findall(question)) / 4.0),
        "conditions": min(1.0, _count_phrases(question, _CONDITIONS) / 2.0),
    }
    score = sum(getattr(weights, k) * v for k, v in parts.items())
    return min(max(score, 0.0), 1.0)


_CAUSAL = ("why", "how does", "how do", "how did", "how would", "how can", "how could", "how will", "how is",
           "how are", "what causes", "what caused", "what would happen", "what happens", "explain", "because",
           "effect of", "lead to", "leads to", "result in", "results in", "reason", "cause", "affect", "affects")
_LOOKUP_START = ("what", "where", "which", "who", "when", "is there", "are there", "how many", "how much",
                 "name", "identify")
_SPATIAL = ("left of", "right of", "to the left", "to the right", "above", "below", "under", "over", "beneath",
            "behind", "in front of", "next to", "between", "beside", "near", "nearest", "closest", "farthest",
            "on top of", "inside", "outside", "adjacent", "relative to", "opposite", "parallel", "perpendicular",
            "intersect", "intersects", "overlapping", "surrounding", "across from")
_GROUNDING = ("figure", "image", "diagram", "chart", "graph", "table", "picture", "shown", "plot", "photo", "map",
              "illustration", "illustrated", "depicted", "drawing", "panel", "scene")
_DOMAINS: dict[str, tuple[str, ...]] = {
    "physics": ("force", "velocity", "acceleration", "mass", "friction", "energy", "momentum", "gravity", "current",
                "voltage", "resistance", "circuit", "incline", "pressure", "wave", "frequency", "magnetic",
                "electric", "charge", "torque"),
    "chemistry": ("molecule", "atom", "bond", "reaction", "acid", "base", "electron", "ion", "compound", "solution",
                  "concentration", "catalyst", "oxidation", "molar", "equilibrium"),
    "biology": ("cell", "protein", "gene", "dna", "enzyme", "membrane", "organism", "species", "tissue", "neuron",
                "mitochondria", "photosynthesis", "population", "mutation", "ecosystem"),
    "geometry": ("angle", "triangle", "circle", "radius", "diameter", "area", "perimeter", "tangent", "chord",
                 "polygon", "vertex", "hypotenuse", "arc", "parallelogram", "rectangle", "congruent", "similar"),
    "economics": ("price", "demand", "supply", "cost", "revenue", "profit", "market", "inflation", "interest",
                  "gdp", "elasticity", "equilibrium", "tax", "marginal"),
    "statistics": ("mean", "median", "variance", "distribution", "probability", "sample", "correlation",
                   "regression", "percentile", "trend", "average"),
}


@dataclass(frozen=True)
class IntegrationWeights:
    """Weights of ``integration_score``'s parts (each 0..1); the positive ones sum to 1."""

    causal: float = 0.35  # why / how-does / what-causes questions
    spatial: float = 0.25  # spatial relation terms / 2, halved unless two or more objects are named
    domain: float = 0.25  # co-occurring terms of one domain: (distinct terms - 1) / 2
    grounding: float = 0.15  # the question points at the image (figure, diagram, shown, ...)
    lookup: float = 0.25  # subtracted: a what/where/which/how-many question that is not causal


def integration_score(question: str, weights: IntegrationWeights = IntegrationWeights()) -> float:
    """Heuristic vision-text integration in 0..1: how much answering needs reasoning over image and text together.

    High for causal why/how questions, several objects in spatial relation and co-occurring domain terms; low for
    what/where look-ups. A weighted sum of the parts in ``IntegrationWeights``, clipped to 0..1.
    """
    low = " ".join(_words(question))
    causal = 1.0 if _count_phrases(question, _CAUSAL) else 0.0
    n_spatial = _count_phrases(question, _SPATIAL)
    # objects: distinct nouns after a determiner or number word ("the ball", "two blocks", "each car")
    objects = set(re.findall(r"\b(?:the|a|an|each|both|two|three|four|another|other)\s+([a-z]{3,})", low))
    spatial = min(1.0, n_spatial / 2.0) * (1.0 if len(objects) >= 2 else 0.5)
    domain_hits = max(_count_phrases(question, terms) for terms in _DOMAINS.values())
    domain = min(1.0, max(domain_hits - 1, 0) / 2.0)
    grounding = 1.0 if _count_phrases(question, _GROUNDING) else 0.0
    lookup = 1.0 if not causal and any(low.startswith(p + " ") or low == p for p in _LOOKUP_START) else 0.0
    score = (weights.causal * causal + weights.spatial * spatial + weights.domain * domain
             + weights.grounding * grounding - weights.lookup * lookup)
    return min(max(score, 0.0), 1.0)


# --------------------------------------------------------------------------------------------------------- judges


class QueryJudge(Protocol):
    """Scores one query for the sampler; raw scores, min-max normalised over the data set afterwards.
    The heuristics below are one implementation; a reward model or an external service is another."""

    def vision_score(self, image: Any, question: str) -> float: ...

    def text_score(self, question: str) -> float: ...

    def integration_score(self, image: Any, question: str) -> float: ...


@dataclass(frozen=True)
class HeuristicJudge:
    """``QueryJudge`` from local computation only: image clarity for S_v, the keyword heuristics for S_t and S_I.
    A query without an image scores S_v = 0 (nothing to see clearly)."""

    clarity: ClarityConfig = ClarityConfig()
    text_weights: TextScoreWeights = TextScoreWeights()
    integration_weights: IntegrationWeights = IntegrationWeights()

    def vision_score(self, image: Any, question: str) -> float:
        return 0.0 if image is None else image_clarity(image, self.clarity)

    def text_score(self, question: str) -> float:
        return text_score(question, self.text_weights)

    def integration_score(self, image: Any, question: str) -> float:
        return integration_score(question, self.integration_weights)
