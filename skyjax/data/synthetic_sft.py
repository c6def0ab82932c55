"""A synthetic visual SFT task, generated locally: questions about drawn images with short assistant answers.

The scenes and questions are those of `skyjax.data.synthetic` (colour, shape, side, count of PIL-drawn shapes; an
optional text-only arithmetic task). Rows use both SFT record styles, so a run reads them through the same pipeline
as real data:

- conversational: ``{"images": [...], "messages": [system, user(image + question), assistant(answer)]}``, every
  fourth row with a second exchange (``"Sure?"`` -> ``"Yes."``), whose assistant turn is trained too;
- prompt/completion: ``{"images": [...], "prompt": "question", "completion": "answer"}`` (the string prompt is a user
  turn with the image before the text).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import ImageFilter

from skyjax.data.synthetic import QUESTIONS, SYSTEM, draw_scene, prepare_folder


REASONED = "<think>I see {answer}</think> Answer: {answer}"


def make_sft_records(folder: str | Path, name: str, n: int, *, seed: int, image_size: int = 56,
                     tasks=("colour", "shape", "position"), blur: float = 0.0, reasoning: float = 0.0) -> Path:
    """Write `name`.jsonl (+ PNGs under images/) with n SFT rows; returns the JSONL path. `blur` > 0 blurs each
    image with a Gaussian of radius drawn uniformly from [0, blur] px, independently of its answer (images of
    varying sharpness, for quality scores such as skyjax.rl.distill.image_clarity); 0 leaves the rows exactly as
    without it. `reasoning` is the fraction of answers written R1-style, ``<think>...</think>`` then
    ``Answer: X`` (REASONED), so a format reward has something to prefer; 0 leaves the rows as without it."""
    folder = prepare_folder(folder, tasks)
    rng = np.random.RandomState(seed)
    styles = np.random.RandomState(seed + 7919)  # its own stream: reasoning=0 draws nothing from `rng`
    out = folder / f"{name}.jsonl"
    with out.open("w") as f:
        for i in range(n):
            task = tasks[rng.randint(len(tasks))]
            row = {"id": f"{name}-{i}", "meta": {"task": task}}
            if task == "arithmetic":  # text only
                a, b = rng.randint(1, 10, 2)
                question, answer, images = f"What is {a} + {b}?", f"{a + b}.", []
            else:
                question, answers = QUESTIONS[task]
                image, right = draw_scene(rng, task, image_size)
                if blur > 0:
                    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, blur))))
                rel = f"images/{name}_{i:06d}.png"
                image.save(folder / rel)
                answer, images = answers[right], [rel]
            if reasoning > 0 and styles.rand() < reasoning:
                answer = REASONED.format(answer=answer)
            row["images"] = images
            if i % 2:  # prompt/completion
                row.update(prompt=question, completion=answer)
            else:  # conversational
                user = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
                row["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                                   {"role": "assistant", "content": answer}]
                if i % 4 == 2:
                    row["messages"] += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
            f.write(json.dumps(row) + "\n")
    return out
