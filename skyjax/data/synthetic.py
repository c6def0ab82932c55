"""A synthetic visual preference task, generated locally: questions that can only be answered by looking.

Each image holds shapes drawn with PIL; the question asks for the colour, the shape, the side (left/right) or the
count. `chosen` is the right answer, `rejected` a plausible wrong one drawn uniformly from the other answers, so
chosen and rejected answers have the same distribution: a model that ignores the image is at chance (50%).

Records are written in the project's JSONL format with PNG files beside them, so training reads them through the same
pipeline as real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")
# Short questions and a short system turn: the byte-level tokenizer makes every character a token, and a tiny model
# learns the image-answer binding much faster when the answer is not diluted among a hundred tokens.
SYSTEM = "Look."
QUESTIONS = {
    "colour": ("Colour?", [c.capitalize() + "." for c in COLOURS]),
    "shape": ("Shape?", [s.capitalize() + "." for s in SHAPES]),
    "position": ("Left or right?", ["Left.", "Right."]),
    "count": ("How many?", ["One.", "Two.", "Three."]),
}
BACKGROUND = (235, 235, 235)
TEXT_TASKS = ("arithmetic",)  # text-only pairs (stage 2 mixes them with the image pairs)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour):
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def draw_scene(rng: np.random.RandomState, task: str, size: int) -> tuple[Image.Image, int]:
    """An image and the index of the right answer among QUESTIONS[task][1]."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    colour_names = list(COLOURS)
    colour = rng.randint(len(colour_names))
    shape = rng.randint(len(SHAPES))
    side = rng.randint(2)
    count = rng.randint(3) + 1 if task == "count" else 1
    half = size // 2
    s = int(size * (0.38 if task != "count" else 0.26))
    cells = rng.permutation(4)[:count]  # count task: distinct quadrants, so shapes never overlap
    for k in range(count):
        if task == "count":
            cx, cy = (cells[k] % 2) * half + half // 2, (cells[k] // 2) * half + half // 2
        else:
            cx = side * half + half // 2 + rng.randint(-2, 3)
            cy = half + rng.randint(-size // 6, size // 6 + 1)
        box = (cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2)
        _draw_shape(draw, SHAPES[shape], box, COLOURS[colour_names[colour]])
    noise = rng.randint(-12, 13, (size, size, 3))
    image = Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))
    answer = {"colour": colour, "shape": shape, "position": side, "count": count - 1}[task]
    return image, answer


def prepare_folder(folder: str | Path, tasks) -> Path:
    """Check the task names and create `folder`/images; returns the folder as a Path."""
    for task in tasks:
        if task not in QUESTIONS and task not in TEXT_TASKS:
            raise ValueError(f"unknown synthetic task {task!r} (known: {', '.join([*QUESTIONS, *TEXT_TASKS])})")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    return folder


def make_records(folder: str | Path, name: str, n: int, *, seed: int, image_size: int = 56,
                 tasks=("colour", "shape", "position"), blank: bool = False) -> Path:
    """Write `name`.jsonl (+ PNGs under images/) with n preference pairs; returns the JSONL path.

    `blank` writes the same questions and answers over one uniform grey image: the blind control.
    """
    folder = prepare_folder(folder, tasks)
    rng = np.random.RandomState(seed)
    blank_path = folder / "images" / "blank.png"
    if blank:
        Image.new("RGB", (image_size, image_size), (128, 128, 128)).save(blank_path)
    out = folder / f"{name}.jsonl"
    with out.open("w") as f:
        for i in range(n):
            task = tasks[rng.randint(len(tasks))]
            if task == "arithmetic":  # a text-only pair: no image, the right sum against an off-by-a-little one
                a, b = rng.randint(1, 10, 2)
                wrong_sum = a + b + rng.choice([-2, -1, 1, 2])
                row = {"id": f"{name}-{i}", "prompt": f"What is {a} + {b}?", "chosen": f"{a + b}.",
                       "rejected": f"{wrong_sum}.", "meta": {"task": task}}
                f.write(json.dumps(row) + "\n")
                continue
            question, answers = QUESTIONS[task]
            image, right = draw_scene(rng, task, image_size)
            wrong = rng.choice([j for j in range(len(answers)) if j != right])
            rel = f"images/{name}_{i:06d}.png"
            if blank:
                rel = "images/blank.png"
            else:
                image.save(folder / rel)
            row = {"id": f"{name}-{i}", "images": [rel],
                   "prompt": [{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                   "chosen": [{"role": "assistant", "content": answers[right]}],
                   "rejected": [{"role": "assistant", "content": answers[wrong]}],
                   "meta": {"task": task}}
            f.write(json.dumps(row) + "\n")
    return out


def make_prompts(folder: Path, name: str, n: int, *, seed: int, image_size: int, tasks) -> Path:
    """`name`.jsonl with n generate rows {"images", "prompt", "answer"} of the synthetic task (prompt: the system
    turn and the user turn with the image, as half of the SFT rows have it)."""
    folder = prepare_folder(folder, tasks)
    rng = np.random.RandomState(seed)
    out = folder / f"{name}.jsonl"
    with out.open("w") as f:
        for i in range(n):
            task = tasks[rng.randint(len(tasks))]
            question, answers = QUESTIONS[task]
            image, right = draw_scene(rng, task, image_size)
            rel = f"images/{name}_{i:06d}.png"
            image.save(folder / rel)
            prompt = [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            f.write(json.dumps({"id": f"{name}-{i}", "images": [rel], "prompt": prompt, "answer": answers[right],
                                "meta": {"task": task}}) + "\n")
    return out
