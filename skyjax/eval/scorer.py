"""Scoring with a reward model: used by `skyjax score` and `skyjax eval`.

Bounded memory at any row length, few compiles, one progress bar:

1. every conversation is measured first (tokens, images counted from their headers, nothing decoded); one longer
   than the model allows (max_position_embeddings, or `max_length`) is an error naming its file:line, or is skipped;
2. conversations are sorted by length and cut into batches by a token budget (`max_batch_tokens`): a batch of
   sequence bucket L holds `rows_for(L)` rows (a power of two, at most `batch_size`), padded with empty rows, so
   every batch of one length bucket has one shape and a whole job compiles one program per length bucket (and
   per patch bucket of its images);
3. batches run longest first, so a job that cannot fit fails in its first seconds, not at its end; attention
   chunks its queries for long rows (skyjax.nn.attention), so no batch holds a full [S, S] score matrix;
4. each batch's scores go to `on_batch` as they are computed (the CLI appends them to a resumable log);
5. the host never waits when it need not: the next batch is prepared on a thread while the device computes this
   one; on an accelerator each batch shape's program is compiled on another thread as soon as the job starts (so
   the compile of the next length bucket overlaps the batches of this one); an image shared by several
   conversations (a pair's chosen and rejected answers) is decoded and resized once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import threading
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skyjax.convert.checkpoint import LoadedModel, load_model
from skyjax.data.chat import format_conversation
from skyjax.data.qwen_vl_image import ImageError, QwenVLImageConfig, image_grid_thw, load_image, preprocess_image
from skyjax.data.records import Record, parse_record
from skyjax.data.tokenizer import load_tokenizer
from skyjax.models.qwen2_5_vl_inputs import Buckets, prepare_vl_batch
from skyjax.parallel.mesh import make_mesh
from skyjax.parallel.rules import use_mesh
from skyjax.progress import JobProgress

DEFAULT_BATCH_ROWS = 64
# Sequence buckets for scoring: powers of two and 1.5x powers of two (at most 50% padding instead of 100%, so the
# attention of a long row, which grows with the square of its length, wastes at most 2.25x instead of 4x). Finer
# steps cost more compiles than they save on VL-RewardBench's length distribution.
SCORE_SEQ_BUCKETS = tuple(sorted({2**k for k in range(6, 16)} | {3 * 2**k for k in range(5, 14)}))
# A length bucket with this few batches or fewer joins the next one (when that takes as many rows per batch): on a
# CPU one compile costs about as much as eight batches.
MIN_BATCHES_PER_PROGRAM = 8


def default_max_batch_tokens() -> int:
    """Tokens per batch when --max-batch-tokens is not given: 16k on a CPU or an accelerator under 64 GiB (a 7B
    model's forward activations for 16k tokens take a few GiB), 64k on larger accelerators."""
    try:
        limit = jax.devices()[0].memory_stats().get("bytes_limit", 0)
    except Exception:  # CPUs report no memory stats
        limit = 0
    return 65536 if limit >= 64 * 2**30 else 16384


class RowError(ValueError):
    """A row that cannot be scored; names its file and line."""


@dataclasses.dataclass
class Conversation:
    messages: list[dict]
    image_paths: tuple[str, ...]
    where: str
    key: Hashable = None  # names the conversation in a resumable score log (e.g. (line, "chosen"))
    # the images already decoded (PIL, in image_paths' order), when the caller has them: no file is read then
    # (GRPO's reward model scores each prompt's images once per completion)
    images: Sequence[Any] | None = None


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A conversation left out with on_error="skip": where it came from and why."""

    where: str
    reason: str
    index: int = -1  # position in the conversations scored

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def conversations_of(record: Record) -> list[Conversation]:
    """One conversation for a `response` row, two (chosen, rejected) for a pair."""
    where = f"{record.source}:{record.line}"
    keys = ("response",) if record.response is not None else ("chosen", "rejected")
    return [Conversation(record.conversation(k), tuple(record.images), where, (record.line, k)) for k in keys]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Conversation indices, padded to `rows` rows of `length` tokens (its compiled shape)."""

    indices: tuple[int, ...]
    rows: int
    length: int


def rows_for(length: int, max_batch_tokens: int, max_rows: int) -> int:
    """Rows per batch of sequence bucket `length`: the largest power of two within the token budget and `max_rows`
    (at least 1: a single row longer than the budget still runs, its attention chunked)."""
    fit = max(1, min(max_rows, max_batch_tokens // length))
    return 1 << (fit.bit_length() - 1)


def plan_batches(lengths: dict[int, int], seq_buckets: Sequence[int], max_batch_tokens: int,
                 max_rows: int, min_batches: int = MIN_BATCHES_PER_PROGRAM) -> list[Batch]:
    """Cut conversations (index -> tokens) into batches, longest batches first.

    Sorted by length, rows fill a batch until it holds rows_for(L) rows; a row needing a longer bucket joins the
    current batch (raising its L) while it still fits the longer bucket's row count, so each length bucket ends
    with at most one partly empty batch. A length bucket that would hold at most `min_batches` batches moves up to
    the next bucket when that one takes as many rows per batch: a few batches' padding costs less than compiling
    one more program."""
    def bucket(n):
        return min(b for b in seq_buckets if b >= n)

    used = sorted({bucket(n) for n in lengths.values()})
    count = {b: sum(1 for n in lengths.values() if bucket(n) == b) for b in used}
    target = {b: b for b in used}
    for b, up in zip(used, used[1:]):  # short buckets first: a merged bucket's rows may move on again
        rows = rows_for(b, max_batch_tokens, max_rows)
        if -(-count[b] // rows) <= min_batches and rows_for(up, max_batch_tokens, max_rows) == rows:
            count[up] += count[b]
            for k, v in target.items():
                if v == b:
                    target[k] = up

    batches, cur, length = [], [], 0
    for i in sorted(lengths, key=lambda i: (lengths[i], i)):
        need = target[bucket(lengths[i])]
        if cur and len(cur) + 1 > rows_for(max(length, need), max_batch_tokens, max_rows):
            batches.append(Batch(tuple(cur), rows_for(length, max_batch_tokens, max_rows), length))
            cur, length = [], 0
        cur.append(i)
        length = max(length, need)
    if cur:
        batches.append(Batch(tuple(cur), rows_for(length, max_batch_tokens, max_rows), length))
    return batches[::-1]


class _ImageCache:
    """Preprocessed images (patches, grid) by key (a path; for an image given decoded, the path and the image),
    kept while a later conversation of the job still needs them (`expect` counts the uses) and within a byte budget;
    anything else is simply preprocessed again."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._uses: dict[str, int] = {}
        self._lock = threading.Lock()

    def expect(self, paths) -> None:
        with self._lock:
            for p in paths:
                self._uses[p] = self._uses.get(p, 0) + 1

    def peek(self, path: Hashable):
        with self._lock:
            return self._items.get(path)

    def get(self, path: Hashable, make):
        with self._lock:
            item = self._items.get(path)
            left = self._uses.get(path, 0) - 1
            if left >= 0:
                self._uses[path] = left
        if item is None:
            item = make()
        with self._lock:
            if left > 0 and path not in self._items and self.bytes + item[0].nbytes <= self.max_bytes:
                self._items[path] = item
                self.bytes += item[0].nbytes
            elif left <= 0 and path in self._items:
                self.bytes -= self._items.pop(path)[0].nbytes
        return item

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._uses.clear()
            self.bytes = 0


class RewardScorer:
    """Scalar rewards for conversations, from a Hugging Face reward folder or a skyjax checkpoint.

    `mesh`: the devices to score on (default: a new mesh of `mesh_shape` over every device); GRPO passes the
    trainer's mesh, so the reward model sits beside the policy. `model` may be a path or an already loaded
    `LoadedModel` (placed on `mesh` by its loader; `dtype` then does not apply). `sticky_vision`: every batch keeps
    room for the largest images seen by any earlier call, not only by this call's conversations, so a caller that
    scores many small jobs (a GRPO step's completions) compiles again only when a larger image arrives.
    """

    def __init__(self, model: str | os.PathLike | LoadedModel, *, mesh=None, mesh_shape=(1, -1, 1),
                 dtype: str | None = None, batch_size: int = DEFAULT_BATCH_ROWS, max_batch_tokens: int | None = None,
                 max_length: int | None = None, buckets: Buckets = Buckets(seq=SCORE_SEQ_BUCKETS),
                 progress: bool = True, sticky_vision: bool = False):
        self.mesh = mesh if mesh is not None else make_mesh(mesh_shape)
        if isinstance(model, LoadedModel):
            if dtype is not None:
                raise ValueError("RewardScorer: dtype applies when loading; the model given is loaded already")
            self.model = model
        else:
            self.model = load_model(model, mesh=self.mesh, dtype=dtype)
        if not hasattr(self.model.fn.bind(self.model.params), "score"):
            raise ValueError(f"{self.model.folder}: architecture {self.model.arch.name!r} has no value head (expected "
                             f"a reward model: a Qwen2.5-VL folder with value_head.safetensors, or a trained "
                             f"checkpoint)")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.tokenizer = load_tokenizer(self.model.folder)
        self.image_cfg = QwenVLImageConfig.from_folder(self.model.folder)
        self.batch_size, self.buckets, self.progress = batch_size, buckets, progress
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens()
        model_limit = self.model.config.text.max_position_embeddings
        limits = [("max_position_embeddings of the model", model_limit)]
        if max_length is not None:
            limits.append(("--max-length", max_length))
        if buckets.seq is not None:
            limits.append(("the largest sequence bucket", max(buckets.seq)))
        self.limit_name, self.max_length = min(limits, key=lambda x: x[1])
        self.seq_buckets = tuple(b for b in (buckets.seq or ()) if b < self.max_length) + (self.max_length,) \
            if buckets.seq is not None else None
        self.max_image_patches = self.image_cfg.max_patches
        self.sticky_vision = sticky_vision
        self._vision_floor = (0, 0)  # (patches, images) per row kept from earlier calls when sticky_vision
        fn = self._bounded_vision(self.max_image_patches)
        self._score = jax.jit(lambda p, ids, kw: fn.bind(p).score(ids, **kw))
        self._programs: dict[Hashable, Any] = {}  # input shapes -> compiled program
        # Compiling the next shapes while the device computes pays only when the device is not the host's own
        # cores: on a CPU backend a background compile takes cores from the batches it overlaps (measured slower
        # on 2 cores), so there programs compile when their first batch comes.
        self._compile_in_background = self.mesh.devices.flat[0].platform != "cpu"
        self._image_cache = _ImageCache()

    def _bounded_vision(self, bound: int):
        """The model with its vision tower told the most patches one image can have (the processor's max_pixels):
        full-attention vision blocks then attend by blocks of neighbouring patches instead of under a dense mask
        over every patch of the batch (quadratic in the batch's rows), the same result for less work."""
        from skyjax.nn.functional import Functional

        loaded = self.model
        vision = getattr(loaded.config, "vision", None)
        if vision is None or not hasattr(vision, "max_image_patches") or vision.max_image_patches == bound:
            return loaded.fn
        config = dataclasses.replace(loaded.config, vision=dataclasses.replace(vision, max_image_patches=bound))
        return Functional.create(lambda r: loaded.arch.build(config, r))  # traced only; same parameters

    @property
    def compiles(self) -> int:
        """Programs compiled so far by this scorer (one per batch shape)."""
        return len(self._programs)

    # --- measuring ------------------------------------------------------------------------------------------------

    def _image_patches(self, path: str) -> int:
        import PIL.Image

        if not os.path.isfile(path):
            raise ImageError(f"image file not found: {path}")
        try:
            with PIL.Image.open(path) as im:
                width, height = im.size
        except Exception as e:
            raise ImageError(f"not a readable image file: {path} ({type(e).__name__})") from None
        return int(np.prod(image_grid_thw(height, width, self.image_cfg)))

    def _conversation_patches(self, conv: Conversation) -> list[int]:
        """Vision patches of each image: from the decoded images when the conversation has them, else the headers."""
        if conv.images is None:
            return [self._image_patches(p) for p in conv.image_paths]
        if len(conv.images) != len(conv.image_paths):
            raise ValueError(f"{len(conv.images)} decoded images for {len(conv.image_paths)} image paths")
        return [int(np.prod(image_grid_thw(im.height, im.width, self.image_cfg))) for im in conv.images]

    def measure(self, conv: Conversation) -> int:
        """Tokens of a conversation (images counted from their headers); RowError naming file:line when it cannot
        be rendered or is longer than the model allows. The vision patches it needs go to `self._patches`."""
        try:
            patches = self._conversation_patches(conv)
            if patches and max(patches) > self.max_image_patches:  # only an extreme aspect ratio gets here
                raise ValueError(f"an image of {max(patches)} patches, more than the {self.max_image_patches} of "
                                 f"max_pixels {self.image_cfg.max_pixels}")
            counts = [n // self.image_cfg.merge_size**2 for n in patches]
            length = len(format_conversation(self.tokenizer, conv.messages, num_image_tokens=counts).input_ids)
            self._patches = (sum(patches), len(patches))
        except ValueError as e:
            raise RowError(f"{conv.where}: {e}") from None
        if length > self.max_length:
            raise RowError(f"{conv.where}: {length} tokens, longer than the {self.max_length} of the "
                           f"{self.limit_name}")
        return length

    def _preprocess(self, path: str):
        return preprocess_image(load_image(path), self.image_cfg)

    def _preprocess_source(self, path: str, image=None):
        """An image given decoded is preprocessed as it is; otherwise its file is read."""
        return self._preprocess(path) if image is None else preprocess_image(image, self.image_cfg)

    @staticmethod
    def _image_keys(conv: Conversation) -> list[tuple[str, int | None]]:
        """Cache keys of the conversation's images: the path, and for an image given decoded the object too (two
        decoded images under one path name are two images)."""
        if conv.images is None:
            return [(p, None) for p in conv.image_paths]
        return [(p, id(im)) for p, im in zip(conv.image_paths, conv.images)]

    def _sources(self, conv: Conversation):
        """(cache key, path, decoded image or None) of each image of the conversation."""
        decoded = conv.images if conv.images is not None else [None] * len(conv.image_paths)
        return list(zip(self._image_keys(conv), conv.image_paths, decoded))

    def _images(self, conv: Conversation):
        """The conversation's images, preprocessed ((patches, grid) each); shared images come from the cache."""
        try:
            return [self._image_cache.get(k, lambda p=p, im=im: self._preprocess_source(p, im))
                    for k, p, im in self._sources(conv)]
        except ImageError as e:
            raise RowError(f"{conv.where}: {e}") from None

    # --- scoring --------------------------------------------------------------------------------------------------

    def score_conversations(self, convs: Sequence[Conversation], desc: str = "score", *,
                            done: dict[Hashable, float] | None = None,
                            on_batch: Callable[[list[Hashable], list[float]], None] | None = None,
                            on_error: str = "raise", skipped: list[Skipped] | None = None,
                            progress: JobProgress | None = None) -> np.ndarray:
        """Scores [len(convs)] fp32, in the order given. `done` (key -> score) are taken as scored already (a
        resumed job); `on_batch(keys, scores)` receives each batch's results as soon as they exist. With
        on_error="skip" a bad conversation scores NaN and is appended to `skipped`; otherwise RowError."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        out = np.full(len(convs), np.nan, np.float32)
        done = done or {}

        def fail(i: int, e: RowError):
            if on_error == "raise":
                raise e
            if skipped is not None:
                skipped.append(Skipped(convs[i].where, str(e).split(": ", 1)[-1], i))
            if bar is not None:
                bar.write(f"skipped: {e}")

        own_bar = progress is None and self.progress
        bar = JobProgress(len(convs), desc, enabled=True) if own_bar else progress
        try:
            lengths, most_patches, most_images = {}, 0, 0
            for i, conv in enumerate(convs):
                if conv.key is not None and conv.key in done:
                    out[i] = done[conv.key]
                    continue
                try:
                    lengths[i] = self.measure(conv)
                except RowError as e:
                    fail(i, e)
                    continue
                most_patches, most_images = max(most_patches, self._patches[0]), max(most_images, self._patches[1])
            if self.sticky_vision:
                most_patches = max(most_patches, self._vision_floor[0])
                most_images = max(most_images, self._vision_floor[1])
                self._vision_floor = (most_patches, most_images)
            self._vision_room = (most_patches, most_images)
            if bar is not None:
                bar.update(len(convs) - len(lengths))  # resumed and skipped rows count as done
            buckets = self.seq_buckets or sorted(set(lengths.values()))
            plan = plan_batches(lengths, buckets, self.max_batch_tokens, self.batch_size)
            self._image_cache.expect(k for i in lengths for k in self._image_keys(convs[i]))
            # Host work (decoding images, tokenizing) for the next batch runs on a thread while the device computes
            # this one; PIL and numpy release the GIL. Errors surface in order, from the main thread. A second
            # thread compiles each batch shape's program, in the order the batches need them, from the start.
            with concurrent.futures.ThreadPoolExecutor(1) as pool, \
                    concurrent.futures.ThreadPoolExecutor(1) as compiler:
                compiling = self._compile_ahead(compiler, convs, plan) if self._compile_in_background else {}
                ahead = pool.submit(self._prepare, convs, plan[0], fail) if plan else None
                for n, batch in enumerate(plan):
                    prepared = ahead.result()
                    ahead = pool.submit(self._prepare, convs, plan[n + 1], fail) if n + 1 < len(plan) else None
                    if prepared is None:
                        if bar is not None:
                            bar.update(len(batch.indices))
                        continue
                    self._collect(convs, *self._dispatch(*prepared, bar, compiling), out, on_batch, bar)
                for future in compiling.values():
                    future.cancel()
        finally:
            self._image_cache.clear()
            if own_bar and bar is not None:
                bar.close()
        return out

    def _prepare(self, convs, batch: Batch, fail, cache: bool = True):
        """(batch, rows kept, input ids, model kwargs) on the host, or None when every row failed."""
        rows, images = [], []
        for i in batch.indices:  # images decoded only now, one batch at a time
            try:
                images.append(self._images(convs[i]) if cache else [
                    self._image_cache.peek(k) or self._preprocess_source(p, im)
                    for k, p, im in self._sources(convs[i])])
                rows.append(i)
            except RowError as e:
                fail(i, e)
        if not rows:
            return None
        buckets = dataclasses.replace(self.buckets, seq=(batch.length,))
        most_patches, most_images = self._vision_room
        if most_images and self.buckets.patches is not None and self.buckets.images is not None:
            # room for the job's largest images in every row: one vision shape per batch shape (not one per mix of
            # image sizes), and exactly that room (a patch bucket could double the vision work)
            patches = max(batch.rows * most_patches, self.model.config.vision.merge_unit)
            buckets = dataclasses.replace(buckets, patches=(patches,), images=(batch.rows * most_images,))
        try:
            vl = prepare_vl_batch([convs[i].messages for i in rows], images, self.tokenizer, self.image_cfg,
                                  self.model.config.vision, pad_side="right", buckets=buckets,
                                  always_vision=bool(most_images))
        except ValueError as e:
            raise RowError(f"{convs[rows[0]].where} (batch starting there): {e}") from None
        pad = batch.rows - len(rows)  # empty rows (all padding): one shape per length bucket
        ids = np.pad(vl.input_ids, ((0, pad), (0, 0)), constant_values=self.tokenizer.pad_token_id or 0)
        kw = vl.model_kwargs()
        kw["attention_mask"] = np.pad(vl.attention_mask, ((0, pad), (0, 0)))
        return batch, rows, ids, kw

    def _compile_ahead(self, pool, convs, plan) -> dict[tuple[int, int], concurrent.futures.Future]:
        """Submit one compile per batch shape (rows, length) of the plan, in plan order, to `pool`. The inputs of
        each shape come from preparing its first batch once more (a fraction of a second; errors are left to the
        real preparation, which reports them in order)."""
        first: dict[tuple[int, int], Batch] = {}
        for batch in plan:
            first.setdefault((batch.rows, batch.length), batch)

        def compile_(batch):
            try:
                prepared = self._prepare(convs, batch, lambda i, e: None, cache=False)
                if prepared is not None:
                    self._program(prepared[2], prepared[3])
            except Exception:  # noqa: BLE001 -- the batch's own preparation or dispatch raises it, in order
                pass

        return {shape: pool.submit(compile_, batch) for shape, batch in first.items()}

    def _program(self, ids, kw):
        """The compiled program for these input shapes (compiled now if it is new)."""
        key = (np.shape(ids), jax.tree_util.tree_structure(kw),
               tuple((np.shape(x), np.asarray(x).dtype.str) for x in jax.tree_util.tree_leaves(kw)))
        program = self._programs.get(key)
        if program is None:
            with use_mesh(self.mesh):
                program = self._score.lower(self.model.params, jnp.asarray(ids), kw).compile()
            program = self._programs.setdefault(key, program)
        return program

    def _dispatch(self, batch: Batch, rows, ids, kw, bar, compiling=None):
        """Start the batch on the device (asynchronously). The first batch of a shape waits for its program
        (compiled ahead on a thread), and the bar says so while it waits."""
        shape = (batch.rows, batch.length) + (() if kw.get("pixel_values") is None else (kw["pixel_values"].shape[0],))
        step = bar.step(shape) if bar is not None else contextlib.nullcontext()
        with step, use_mesh(self.mesh):
            future = (compiling or {}).get((batch.rows, batch.length))
            if future is not None:
                future.result()
            scores = self._program(ids, kw)(self.model.params, jnp.asarray(ids), kw)
        return batch, rows, scores

    def _collect(self, convs, batch: Batch, rows, scores, out, on_batch, bar) -> None:
        scores = np.asarray(scores)[: len(rows)]
        out[rows] = scores
        if on_batch is not None:
            on_batch([convs[i].key for i in rows], [float(s) for s in scores])
        if bar is not None:
            bar.update(len(batch.indices))

    def __call__(self, rows: Sequence[dict]) -> np.ndarray:
        """The `PairScorer` protocol of skyjax.eval: records (dicts) -> (n, 2) [score_chosen, score_rejected]."""
        convs = []
        for i, row in enumerate(rows):
            record = parse_record(row, kind="preference", source="<benchmark>", line=i + 1)
            convs.extend(conversations_of(record))
        return self.score_conversations(convs, progress=JobProgress(0, "", enabled=False)).reshape(-1, 2)


def score_records(scorer: RewardScorer, records: Sequence[Record], **kwargs: Any) -> list[dict[str, Any] | None]:
    """Output fields for each record: `score`, or `score_chosen` and `score_rejected`; None for a record one of
    whose conversations was skipped. Keyword arguments go to `score_conversations`."""
    convs, owners = [], []
    for i, record in enumerate(records):
        for c in conversations_of(record):
            convs.append(c)
            owners.append(i)
    skipped = kwargs.setdefault("skipped", [])
    scores = scorer.score_conversations(convs, **kwargs)
    bad = {owners[s.index] for s in skipped if s.index >= 0}
    mine: list[list[float]] = [[] for _ in records]
    for s, o in zip(scores, owners):
        mine[o].append(float(s))
    out: list[dict[str, Any] | None] = []
    for i, (record, s) in enumerate(zip(records, mine)):
        if i in bad:
            out.append(None)
        else:
            out.append({"score": s[0]} if record.response is not None else
                       {"score_chosen": s[0], "score_rejected": s[1]})
    return out
