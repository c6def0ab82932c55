"""Judges of the adaptive-length CoT sampler: raw vision (S_v), text (S_t) and integration (S_I) scores per query.

    judge.score(queries) -> [JudgeScores]     one call per batch of queries, in order

Three built-ins (``make_judge``):

- ``heuristic``: local computation only (``skyjax.rl.distill.HeuristicJudge``): image clarity, keyword heuristics.
- ``model``: the policy itself. S_v = mean(clarity, sigmoid(image necessity)), where image necessity is the mean
  per-token log-probability of the reference answer WITH the row's images minus WITHOUT them (a context-ablation
  test: the answer becomes more likely when the picture matters). S_t and S_I stay the heuristics by default: a
  rating asked of a small policy is mostly noise, while the log-prob difference is well defined for any model;
  ``rate=True`` asks the policy the endpoint's rating prompt instead (see ``ModelJudge``).
- ``endpoint``: an OpenAI-compatible ``/chat/completions`` service (URL, model name, API key from an environment
  variable). It returns a JSON object of 0..10 ratings (``ENDPOINT_KEYS``); S_v = mean(clarity, necessity/10,
  relevance/10), S_t = mean(quality, difficulty, reasoning demand)/10, S_I = integration/10. Timeouts and HTTP 429 /
  5xx are retried with exponential backoff up to ``max_retries`` times; a malformed answer is a ``JudgeError``
  naming the row, never a default score. Up to ``workers`` requests are in flight at once.

A user judge is given by dotted path (``package.module:MyJudge``): a class or object with ``score(queries)`` or the
three ``QueryJudge`` methods of ``skyjax.rl.distill``.

Raw scores are min-max normalised over the data set afterwards (``skyjax.rl.distill.minmax_normalise``), so only
their ranking within one column matters.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from skyjax.rl.distill import HeuristicJudge, QueryJudge, image_clarity

JUDGES = ("heuristic", "model", "endpoint")


class JudgeError(ValueError):
    """A judge could not score a row (service down, malformed answer, missing reference answer)."""


@dataclass(frozen=True)
class Query:
    """One row to score. images: decoded PIL images; where: "file:line", for errors."""

    question: str
    images: tuple[Any, ...] = ()
    answer: str | None = None
    conversation: tuple[dict, ...] = ()  # the row's chat messages (the model judge feeds them to the policy)
    where: str = "<memory>"


@dataclass(frozen=True)
class JudgeScores:
    s_v: float
    s_t: float
    s_i: float
    clarity: float  # the local image-clarity part of s_v (0 for a row without an image)
    details: dict[str, float] = field(default_factory=dict)  # sub-scores the judge used, for the output rows


class Judge(Protocol):
    name: str

    def score(self, queries: Sequence[Query]) -> list[JudgeScores]: ...


def clarity_of(images: Sequence[Any]) -> float:
    """Mean clarity of a row's images; 0 without images (nothing to see clearly)."""
    return float(np.mean([image_clarity(im) for im in images])) if images else 0.0


class ProtocolJudge:
    """Any ``skyjax.rl.distill.QueryJudge`` (per-query ``vision_score`` / ``text_score`` / ``integration_score``) as a
    batch ``Judge``. S_v of a row with several images is the mean over its images; a row without one asks
    ``vision_score(None, question)``."""

    def __init__(self, base: QueryJudge, name: str):
        self.base, self.name = base, name

    def score(self, queries: Sequence[Query]) -> list[JudgeScores]:
        out = []
        for q in queries:
            if q.images:
                s_v = float(np.mean([self.base.vision_score(im, q.question) for im in q.images]))
            else:
                s_v = float(self.base.vision_score(None, q.question))
            out.append(JudgeScores(s_v, float(self.base.text_score(q.question)),
                                   float(self.base.integration_score(q.images[0] if q.images else None, q.question)),
                                   clarity_of(q.images)))
        return out


def HeuristicQueryJudge() -> ProtocolJudge:  # noqa: N802 -- reads as the judge it builds
    """The local heuristics (``HeuristicJudge``): S_v = mean image clarity, keyword heuristics for S_t and S_I."""
    return ProtocolJudge(HeuristicJudge(), "heuristic")


# ------------------------------------------------------------------------------------------------------ model judge


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class ModelJudge:
    """Image necessity from the policy: mean log p(answer | images, question) - mean log p(answer | question).

    Rows without an image have necessity 0 (sigmoid 0.5) and S_v = their clarity 0 averaged with it. Rows without
    a reference answer cannot be ablated: a JudgeError names them. The text-only prompt is the row's
    conversation with the image parts removed (the text itself unchanged).

    rate=True also asks the policy the endpoint's fixed rating prompt (greedy, `rate_tokens` new tokens; text
    after the last ``</think>`` is read, so R1-style models may think first): S_t and S_I come from its ratings
    as for the endpoint judge, and S_v = (clarity + sigmoid(necessity) + relevance / 10) / 3 (the measured
    necessity replaces the rated one). An answer that does not parse is a JudgeError naming the row.
    `generate_fn` (a ``skyjax.rl.generation.GenerateFn``) replaces the model's greedy generator.
    """

    name = "model"

    def __init__(self, loaded, tokenizer, adapter=None, heuristic: HeuristicJudge = HeuristicJudge(), *,
                 rate: bool = False, rate_tokens: int = 1024, generate_fn=None):
        from skyjax.sample.adapters import adapter_for

        self.loaded, self.tokenizer = loaded, tokenizer
        self.adapter = adapter if adapter is not None else adapter_for(loaded)
        self.heuristic = heuristic
        self.rate, self.rate_tokens, self._generate = rate, rate_tokens, generate_fn
        self._forward = None

    def ratings(self, queries: Sequence[Query]) -> list[dict[str, float]]:
        """The policy's 0..10 ratings of each query (greedy answers to the fixed rating prompt)."""
        from skyjax.rl.generation import GenRequest

        if self._generate is None:
            from skyjax.rl.generation import model_generator
            from skyjax.sample.cli import default_stop_ids
            from skyjax.sample.decode import Sampling

            sampling = Sampling(max_new_tokens=self.rate_tokens, temperature=0.0,
                                stop_token_ids=tuple(default_stop_ids(self.loaded, self.tokenizer)))
            self._generate = model_generator(self.loaded, self.tokenizer, self.adapter, sampling,
                                             batch_size=max(len(queries), 1))
        results = self._generate([GenRequest(rating_conversation(q), q.images, 1.0, i)
                                  for i, q in enumerate(queries)], 0)
        out = []
        for q, comps in zip(queries, results):
            text = comps[0].text
            if comps[0].finish_reason != "stop":
                raise JudgeError(f"{q.where}: the model's rating was cut off after {comps[0].num_tokens} tokens "
                                 "(raise --judge-max-new-tokens)")
            answer = text.rsplit("</think>", 1)[-1]
            start, end = answer.find("{"), answer.rfind("}")  # the JSON object inside any surrounding prose
            out.append(parse_ratings(answer[start: end + 1] if 0 <= start < end else answer, q.where))
        return out

    def answer_logprobs(self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence[Any]],
                        answers: Sequence[str]) -> np.ndarray:
        """Mean per-token log-probability of each answer as the assistant's reply to its conversation (teacher
        forced), for a batch [B]. Prompts are left-padded to a sequence bucket by the adapter and the answers
        right-padded to a power of two (at least 8), so a data set compiles a handful of programs, not one per
        row."""
        import jax

        inputs = self.adapter.prepare([list(c) for c in conversations], [list(i) for i in images], self.tokenizer)
        self.adapter.check(inputs)
        targets = [self.tokenizer.encode(a, add_special_tokens=False) for a in answers]
        for i, t in enumerate(targets):
            if not t:
                raise ValueError(f"row {i}: the reference answer encodes to no tokens")
        width = 1 << max(3, (max(len(t) for t in targets) - 1).bit_length())
        prompt_ids = np.asarray(inputs["input_ids"])
        b, s = prompt_ids.shape
        tgt = np.zeros((b, width), np.int32)
        tmask = np.zeros((b, width), bool)
        for i, t in enumerate(targets):
            tgt[i, : len(t)], tmask[i, : len(t)] = t, True
        ids = np.concatenate([prompt_ids, tgt], axis=1)
        mask = np.concatenate([np.asarray(inputs["attention_mask"], bool), tmask], axis=1)
        kw = {k: v for k, v in self.adapter.device_inputs(inputs).items() if k not in ("input_ids", "attention_mask")}
        if self._forward is None:
            fn = self.loaded.fn

            def forward(params, ids, mask, kw, s):
                # position t's logits predict token t + 1: the answer is scored from column s - 1 on
                logits = fn.bind(params)(ids, attention_mask=mask, **kw)[0][:, s - 1: -1].astype("float32")
                return jax.numpy.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, s:, None], -1)[..., 0]

            self._forward = jax.jit(forward, static_argnums=4)
        picked = np.asarray(self._forward(self.loaded.params, ids, mask, kw, s))
        return (picked * tmask).sum(1) / tmask.sum(1)

    def answer_logprob(self, conversation: Sequence[dict], images: Sequence[Any], answer: str) -> float:
        """`answer_logprobs` of one row."""
        return float(self.answer_logprobs([conversation], [images], [answer])[0])

    def score(self, queries: Sequence[Query]) -> list[JudgeScores]:
        necessity = np.zeros(len(queries))
        with_images = [i for i, q in enumerate(queries) if q.images]
        for i in with_images:
            if not queries[i].answer:
                raise JudgeError(f"{queries[i].where}: the model judge needs the row's 'answer' to test image "
                                 "necessity")
        if with_images:
            qs = [queries[i] for i in with_images]
            answers = [str(q.answer) for q in qs]
            try:
                with_img = self.answer_logprobs([q.conversation for q in qs], [q.images for q in qs], answers)
                without = self.answer_logprobs([strip_images(q.conversation) for q in qs], [[] for _ in qs],
                                               answers)
            except ValueError as e:  # name the row: its index in the batch maps back to its file:line
                m = re.match(r"row (\d+): (.*)", str(e), re.S)
                where = qs[int(m.group(1))].where if m and int(m.group(1)) < len(qs) else \
                    ", ".join(q.where for q in qs)
                raise JudgeError(f"{where}: {m.group(2) if m else e}") from e
            necessity[with_images] = with_img - without
        rated = self.ratings(queries) if self.rate else [None] * len(queries)
        out = []
        for q, nec, r in zip(queries, necessity, rated):
            c = clarity_of(q.images)
            details = {"image_necessity": round(float(nec), 6)}
            if r is None:
                out.append(JudgeScores(0.5 * (c + sigmoid(float(nec))), self.heuristic.text_score(q.question),
                                       self.heuristic.integration_score(None, q.question), c, details))
                continue
            details.update({f"rated_{k}": v for k, v in r.items()})
            out.append(JudgeScores((c + sigmoid(float(nec)) + r["image_relevance"] / 10) / 3,
                                   (r["question_quality"] + r["difficulty"] + r["reasoning_demand"]) / 30,
                                   r["integration"] / 10, c, details))
        return out


def strip_images(conversation: Sequence[dict]) -> list[dict]:
    """The conversation with every image part removed (text parts and their order unchanged)."""
    out = []
    for m in conversation:
        content = m["content"]
        if not isinstance(content, str):
            content = [p for p in content if p.get("type") != "image"]
        out.append({**m, "content": content})
    return out


# --------------------------------------------------------------------------------------------------- endpoint judge

ENDPOINT_KEYS = ("image_necessity", "image_relevance", "question_quality", "difficulty", "reasoning_demand",
                 "integration")

ENDPOINT_PROMPT = """You rate one exam question (with its image(s), if any) for a training-data filter.
Give each criterion an integer from 0 (lowest) to 10 (highest):
- image_necessity: how much answering needs the image (0 if there is no image, or the text alone suffices)
- image_relevance: how relevant the image is to the question (0 if there is no image)
- question_quality: how clear and well posed the question is
- difficulty: how hard the question is
- reasoning_demand: how many reasoning steps the answer takes
- integration: how much the answer needs the image and the text together (causal why/how questions, several
  objects in spatial relation and domain terms score high; what/where look-ups score low)
Reply with ONLY a JSON object with exactly these keys, e.g.
{"image_necessity": 7, "image_relevance": 8, "question_quality": 9, "difficulty": 4, "reasoning_demand": 5, "integration": 6}

Question:
"""


def _image_url(image: Any) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def parse_ratings(text: str, where: str) -> dict[str, float]:
    """The 0..10 ratings of ``ENDPOINT_KEYS`` in a judge's answer text (a fenced ```json block is accepted);
    JudgeError naming `where` when anything is off."""
    text = str(text).strip()
    if text.startswith("```"):  # a fenced block: ```json ... ```
        text = text.strip("`").removeprefix("json").strip()
    try:
        ratings = json.loads(text)
    except ValueError as e:
        raise JudgeError(f"{where}: judge answer is not JSON ({e}): {text[:200]!r}") from None
    if not isinstance(ratings, dict):
        raise JudgeError(f"{where}: judge answer must be a JSON object, got {text[:200]!r}")
    missing = [k for k in ENDPOINT_KEYS if k not in ratings]
    if missing:
        raise JudgeError(f"{where}: judge answer lacks {missing}: {text[:200]!r}")
    out = {}
    for k in ENDPOINT_KEYS:
        v = ratings[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10:
            raise JudgeError(f"{where}: judge rating {k}={v!r} is not a number in 0..10")
        out[k] = float(v)
    return out


def parse_endpoint_answer(body: bytes, where: str) -> dict[str, float]:
    """The ratings in a chat-completions response body; JudgeError naming `where` when anything is off."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise JudgeError(f"{where}: judge response is not a chat completion ({type(e).__name__}: {e}): "
                         f"{body[:200]!r}") from None
    return parse_ratings(content, where)


def rating_conversation(query: Query) -> tuple[dict, ...]:
    """The fixed rating prompt with the query's images, as one user turn."""
    parts = [{"type": "image"} for _ in query.images] + [{"type": "text", "text": ENDPOINT_PROMPT + query.question}]
    return ({"role": "user", "content": parts},)


@dataclass
class EndpointJudge:
    """OpenAI-compatible chat completions judge. `url` is the full endpoint (``.../v1/chat/completions``); the key
    is read from the environment variable `api_key_env` (unset or empty: no Authorization header, for local
    servers). Every request is bounded: at most 1 + max_retries attempts of `timeout` seconds each."""

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0  # seconds before the first retry, doubled after each
    workers: int = 4  # requests in flight at once (rows are independent; the service is the bottleneck)
    sleep: Callable[[float], None] = time.sleep
    name: str = "endpoint"

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--judge-url must be an http(s) URL, got {self.url!r}")
        if self.timeout <= 0 or self.max_retries < 0 or self.backoff < 0 or self.workers < 1:
            raise ValueError("judge timeout must be > 0, retries and backoff >= 0, workers >= 1")

    def request(self, query: Query) -> bytes:
        content: list[dict] = [{"type": "image_url", "image_url": {"url": _image_url(im)}} for im in query.images]
        content.append({"type": "text", "text": ENDPOINT_PROMPT + query.question})
        payload = {"model": self.model, "temperature": 0, "response_format": {"type": "json_object"},
                   "messages": [{"role": "user", "content": content}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(payload).encode("utf-8")
        delay, last = self.backoff, ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(delay)
                delay *= 2
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return resp.read()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code != 429 and e.code < 500:  # a bad request stays bad: do not retry
                    raise JudgeError(f"{query.where}: judge endpoint answered {last}") from None
            except (socket.timeout, TimeoutError) as e:
                last = f"timed out after {self.timeout}s ({e})"
            except urllib.error.URLError as e:
                if isinstance(e.reason, (socket.timeout, TimeoutError)):
                    last = f"timed out after {self.timeout}s"
                else:
                    last = f"cannot reach {self.url}: {e.reason}"
        raise JudgeError(f"{query.where}: judge endpoint failed {self.max_retries + 1} time(s); last: {last}")

    def score_one(self, q: Query) -> JudgeScores:
        r = parse_endpoint_answer(self.request(q), q.where)
        c = clarity_of(q.images)
        s_v = (c + r["image_necessity"] / 10 + r["image_relevance"] / 10) / 3
        s_t = (r["question_quality"] + r["difficulty"] + r["reasoning_demand"]) / 30
        return JudgeScores(s_v, s_t, r["integration"] / 10, c, r)

    def score(self, queries: Sequence[Query]) -> list[JudgeScores]:
        if self.workers == 1 or len(queries) <= 1:
            return [self.score_one(q) for q in queries]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(self.workers, len(queries))) as pool:
            futures = [pool.submit(self.score_one, q) for q in queries]
            return [f.result() for f in futures]  # in row order; the first failing row's error is raised


def load_user_judge(spec: str) -> Judge:
    """A judge from a dotted path ``package.module:attr``: an object with ``score(queries)`` (a ``Judge``) or the
    three ``QueryJudge`` methods, or a class / factory called without arguments that returns one."""
    from skyjax.rl.rewards import _import_object

    try:
        obj = _import_object(spec)
    except ValueError as e:
        raise ValueError(str(e).replace("reward ", "judge ", 1)) from None
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "score") and not hasattr(obj, "text_score")):
        obj = obj()
    if hasattr(obj, "score"):
        if not getattr(obj, "name", None):
            obj.name = spec
        return obj
    if all(hasattr(obj, m) for m in ("vision_score", "text_score", "integration_score")):
        return ProtocolJudge(obj, spec)
    raise ValueError(f"judge {spec!r}: {type(obj).__name__} has neither score(queries) nor the QueryJudge methods "
                     "vision_score / text_score / integration_score")


def make_judge(name: str, *, loaded=None, tokenizer=None, adapter=None, url: str | None = None,
               model: str | None = None, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
               max_retries: int = 3, workers: int = 4, rate: bool = False, rate_tokens: int = 1024) -> Judge:
    """A built-in judge by name (see the module docstring)."""
    if name == "heuristic":
        return HeuristicQueryJudge()
    if name == "model":
        if loaded is None or tokenizer is None:
            raise ValueError("the model judge needs the loaded model and its tokenizer")
        return ModelJudge(loaded, tokenizer, adapter, rate=rate, rate_tokens=rate_tokens)
    if name == "endpoint":
        if not url or not model:
            raise ValueError("--judge endpoint needs --judge-url and --judge-model")
        return EndpointJudge(url, model, api_key_env, timeout, max_retries, workers=workers)
    if ":" in name or "." in name:
        return load_user_judge(name)
    raise ValueError(f"unknown judge {name!r}; choose one of {JUDGES} or give package.module:Judge")
