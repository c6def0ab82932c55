"""The model-facing part of self-distillation and of the model judge: generation requests, their completions, and
`model_generator`, a `GenerateFn` on `skyjax.sample.decode.generate` (shared by skyjax.rl.distill_run and
skyjax.rl.judge, which both import it from here)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GenRequest:
    conversation: tuple[dict, ...]  # chat messages, instruction (and hint) already added
    images: tuple[Any, ...]
    penalty: float  # the row's repetition penalty P
    key: int  # the input line: a row's samples do not depend on its batch


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" | "length"
    think_opened: bool = False  # the prompt ended with <think> (R1-distilled templates): the text starts inside it
    token_ids: tuple[int, ...] = ()


GenerateFn = Callable[[Sequence[GenRequest], int], list[list[Completion]]]


def model_generator(loaded, tokenizer, adapter, sampling, *, batch_size: int = 8, seed: int = 0,
                    step: Callable[[Any], Any] | None = None) -> GenerateFn:
    """A `GenerateFn` on `skyjax.sample.decode.generate`: requests in batches of `batch_size` (padded with empty
    rows, so one program serves every batch), each row's penalty its repetition penalty, samples keyed by
    (seed, round, input line). `step(shape)`, a context manager such as `JobProgress.step`, is entered around each
    batch's device work (its shape: the input arrays' shapes), so a progress bar can say when a batch compiles."""
    import contextlib

    import jax

    from skyjax.sample.cli import _completion, _pad_batch
    from skyjax.sample.decode import generate
    from skyjax.sample.processors import ProcessorFlags

    base = sampling.rows(1)
    flags = ProcessorFlags.from_rows(base["temperature"], base["top_k"], base["top_p"], base["min_p"],
                                     base["repetition_penalty"], adapter.vocab_size).union(ProcessorFlags(penalty=True))
    root = jax.random.key(seed)
    g = int(sampling.num_samples)

    def opened(conversation) -> bool:
        """Whether the rendered prompt ends inside an opened think block (R1-distilled templates)."""
        from skyjax.data.chat import renderable_messages

        _, text = renderable_messages(tokenizer, list(conversation), "<image>", add_generation_prompt=True)
        return text.rstrip().endswith("<think>")

    def run(requests: Sequence[GenRequest], rnd: int) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        round_key = jax.random.fold_in(root, rnd)
        for start in range(0, len(requests), batch_size):
            chunk = requests[start: start + batch_size]
            n = len(chunk)
            inputs = adapter.prepare([list(r.conversation) for r in chunk], [list(r.images) for r in chunk],
                                     tokenizer)
            adapter.check(inputs)
            inputs = _pad_batch(inputs, batch_size)
            penalties = [r.penalty for r in chunk] + [1.0] * (batch_size - n)
            keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(
                np.asarray([r.key for r in chunk] + [0] * (batch_size - n), np.int32))
            shape = tuple(np.shape(v) for v in jax.tree_util.tree_leaves(inputs))
            with step(shape) if step is not None else contextlib.nullcontext():
                res = generate(adapter, loaded.params, inputs,
                               dataclasses.replace(sampling, repetition_penalty=tuple(penalties)),
                               prompt_keys=keys, flags=flags, check=False)
                toks = np.asarray(res.tokens)  # wait inside the step: "compiling" shows until the batch is done
            lens, stopped = np.asarray(res.lengths), np.asarray(res.stopped)
            for i, r in enumerate(chunk):
                think = opened(r.conversation)
                comps = []
                for j in range(i * g, i * g + g):
                    d = _completion(tokenizer, toks[j, : lens[j]].tolist(), bool(stopped[j]))
                    comps.append(Completion(d["text"], d["num_tokens"], d["finish_reason"], think,
                                            tuple(d["token_ids"])))
                out.append(comps)
        return out

    return run
