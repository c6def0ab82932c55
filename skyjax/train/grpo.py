"""GRPO's data: prompts -> rollouts with the policy's CURRENT parameters on the training mesh -> rewards ->
group advantages -> the batch the step trains on (`RolloutSource`, the batch source of kind grpo).

Each step (skyjax.train.batch_source: `next(state)`), for data.batch_size prompts (generate records: prompt, images,
optional answer):

    1. the sampler (skyjax.sample.decode.generate) draws rollout.num_generations completions per prompt with
       merge(state.trainable, state.frozen): the very parameters the step is about to update, no copy of the weights;
       keys fold (rollout.seed, the rollout's index, the prompt's position), so a resumed run draws the same samples;
    2. every reward function (skyjax.rl.rewards; rollout.rewards, a weight each) scores every completion; the
       weighted sum gives one reward per completion, and group_advantages (skyjax.train.losses.advantages) the
       advantage of each against its prompt's group;
    3. the batch: per completion one row [left-padded prompt | completion | padding] (the sampler's own layout, so
       positions and log-probs agree), `completion` marks its tokens, `old_logps` holds the sampler's raw log-probs
       (pi_old), `advantages`; the prompt's tiles are repeated for each of its completions.

The same rollout batch serves rollout.num_iterations optimizer steps (pi_old stays the sampler's log-probs, so from
the second step on the importance ratio moves off 1 and the clip acts). A checkpoint saved in the middle of a reused
batch holds that batch (its arrays, exact, but the images; its rows' prompt records, whose images are read and
prepared again on restore), so a resumed run trains on the very same batch, buffered rows and dynamic sampling's
picks included. Policies: Skywork R1V (InternVL tiles), Qwen2.5-VL (patches, M-RoPE; skyjax.train.grpo_rows) and
text-only Qwen2 (skyjax.train.grpo_text).
Logging beyond the step's metrics (reward components, throughput, the completions table): skyjax.train.grpo_log.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skyjax.config import ConfigError
from skyjax.data.records import Record
from skyjax.train.batching import BadRowError, row_location
from skyjax.train.bundle import ModelBundle
from skyjax.train.config import DataConfig
from skyjax.train.optimizer import merge_params
from skyjax.train.pipeline import RecordPipeline
from skyjax.train.sft import load_images


@dataclasses.dataclass
class PromptExample:
    row_id: str  # file:line
    where: str
    record: Record
    images: list  # PIL images, decoded
    weight: float = 1.0  # 0: the stand-in for a row the pipeline skipped (data.on_error: skip); trains nothing


class PromptPipeline(RecordPipeline):
    """Generate records -> batches of decoded prompts (host objects: the rollout source tokenizes and samples)."""

    example_type = PromptExample

    def featurize(self, record: Record) -> PromptExample:
        where = row_location(record)
        return PromptExample(where, where, record, load_images(record, where, self.blank))

    def collate(self, examples, weights) -> dict:
        # a skipped row's stand-in is a copy of a good example: its own object, so its weight travels with it
        examples = [e if w > 0 else dataclasses.replace(e, weight=float(w)) for e, w in zip(examples, weights)]
        return {"prompts": list(examples), "weights": list(weights), "row_ids": [e.row_id for e in examples]}


def _prompt_text(tokenizer, record: Record) -> str:
    from skyjax.data.chat import renderable_messages

    _, text = renderable_messages(tokenizer, record.conversation(), "<image>", add_generation_prompt=True)
    return text


GRPO_ARCHITECTURES = ("internvl", "internvl_chat", "qwen2_5_vl")  # policies kind grpo samples and trains


class RolloutSource:
    """The batch source of kind grpo (see the module docstring). `stats` holds the last rollout's metrics."""

    def __init__(self, pipeline: PromptPipeline, bundle: ModelBundle, cfg, trainer):
        from skyjax.rl.rewards import load_reward
        from skyjax.sample.adapters import adapter_for
        from skyjax.train.grpo_text import TEXT_POLICIES, is_text_policy

        arch = bundle.model.arch.name
        if arch not in (*GRPO_ARCHITECTURES, *TEXT_POLICIES):
            raise ConfigError(f"kind grpo: {arch} policies are not supported (Skywork R1V / InternVL, Qwen2.5-VL and "
                              f"the text-only {', '.join(TEXT_POLICIES)} are)")
        self.pipeline, self.iterator = pipeline, iter(pipeline.dataset)
        self.cfg, self.rollout = cfg, cfg.rollout
        self.tokenizer = bundle.tokenizer
        from skyjax.train.grpo_log import RolloutLog
        from skyjax.train.grpo_rows import placeholder_ids

        self.adapter, self.fmt = adapter_for(bundle.model), None
        if not is_text_policy(arch):
            # the run's tiling (data.max_tiles) or pixel range (data.min/max_pixels), as SFT and MPO see their
            # images; the format also packs each training micro-batch's images (skyjax.train.grpo_rows)
            from skyjax.train.sft import vision_format

            self.fmt = vision_format(bundle, cfg.data)
            self.adapter = dataclasses.replace(self.adapter, image_cfg=self.fmt.image_cfg)
        self.placeholders = placeholder_ids(bundle.model.config)
        self.rollout_log = RolloutLog(trainer.run_dir, cfg.rollout.log_completions_every, cfg.rollout.num_iterations,
                                      lead=jax.process_index() == 0)
        self.records: dict = {}  # file:line -> record, the cached batch's rows' prompts (saved in its middle)
        self.restored: dict | None = None  # a saved state whose reused batch is rebuilt by the next call
        self.model_cfg = bundle.model.config
        from skyjax.rl.rewards import RewardContext

        # reward factories (the reward model) get the trainer's mesh: they load beside the policy, not elsewhere
        context = RewardContext(mesh=trainer.mesh, dtype=cfg.model.dtype, tokenizer=bundle.tokenizer)
        try:
            self.rewards = [dataclasses.replace(load_reward(r.name, context, **r.options), on_error=r.on_error)
                            for r in cfg.rollout.rewards]
        except ValueError as e:
            raise ConfigError(f"rollout.rewards: {e}") from None
        self.log = getattr(trainer, "log", print)
        self.reward_failures: list = []  # this rollout's (rollout.on_reward_error: skip)
        self._failed_rows: set = set()
        self.skipped_completions = 0  # over the run
        self.weights = [float(r.weight) for r in cfg.rollout.rewards]
        from skyjax.sample.cli import default_stop_ids

        self.stop_ids = tuple(default_stop_ids(bundle.model, self.tokenizer))
        self.rollouts = 0  # rollout batches drawn so far (keys the sampler)
        self.cached: tuple[dict, list[str]] | None = None
        self.used = 0
        self.stats: dict[str, float] = {}
        from skyjax.train.grpo_buffer import SampleBuffer  # rollout.buffer / rollout.dynamic_sampling

        self.buffer = SampleBuffer(cfg.rollout.buffer, cfg.rollout.seed) if cfg.rollout.buffer.enabled else None
        self.log = getattr(trainer, "log", None) or print

    # --- rollouts ----------------------------------------------------------------------------------------------

    def sampling(self):
        from skyjax.sample.decode import Sampling

        r = self.rollout
        return Sampling(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                        repetition_penalty=r.repetition_penalty, stop_token_ids=self.stop_ids,
                        num_samples=r.num_generations)

    def prepare(self, examples: Sequence[PromptExample]) -> dict:
        """The sampler's prompt batch (chat template, images, left padding), checked (image tokens)."""
        if not self.adapter.supports_images:
            for e in examples:
                if e.images:
                    raise BadRowError(f"{e.where}: {len(e.images)} image(s), but the policy is a text-only "
                                      f"{self.adapter.name} model: drop the row's images or train an R1V policy")
        inputs = self.adapter.prepare([e.record.conversation() for e in examples], [e.images for e in examples],
                                      self.tokenizer)
        self.adapter.check(inputs)
        return inputs

    def generate(self, state: dict, examples: Sequence[PromptExample]):
        """(prepared inputs, tokens [B*G, N], raw log-probs [B*G, N], lengths [B*G], stopped [B*G]) host arrays."""
        from skyjax.sample.decode import generate

        inputs = self.prepare(examples)
        params = merge_params(state["trainable"], state["frozen"])
        root = jax.random.fold_in(jax.random.key(self.rollout.seed), self.rollouts)
        keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(len(examples)))
        out = generate(self.adapter, params, inputs, self.sampling(), prompt_keys=keys, check=False)
        return inputs, *(np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths, out.stopped))

    def score(self, examples, tokens, lengths):
        """Rewards per completion [B*G] (weighted sum; NaN for a completion a reward function failed on, with
        rollout.on_reward_error: skip), per component [B*G, K], and the completions' texts."""
        from skyjax.rl.rewards import Rollout, compute_rewards, failed_rows, weighted_sum

        g = self.rollout.num_generations
        prompts = [_prompt_text(self.tokenizer, e.record) for e in examples]  # once per prompt, not per completion
        messages = [e.record.conversation() for e in examples]
        rows, texts = [], []
        for r in range(tokens.shape[0]):
            e = examples[r // g]
            ids = tokens[r, : lengths[r]].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            texts.append(text)
            rows.append(Rollout(prompt=prompts[r // g], completion=text, completion_ids=ids,
                                images=tuple(e.record.images), answer=e.record.answer,
                                meta=dict(e.record.meta or {}), messages=messages[r // g],
                                image_data=tuple(e.images), where=e.row_id))
        failures: list = []
        table = compute_rewards(self.rewards, rows, on_error=self.rollout.on_reward_error, failures=failures)
        total = weighted_sum(table, self.weights)
        # a completion some function failed on gets no reward at all (not the sum of the others): advantage 0;
        # a skipped prompt's stand-in (weight 0) has none either, so it is in no statistic (not a batch std)
        failed = failed_rows(failures, len(rows))
        total[failed | np.repeat([e.weight <= 0 for e in examples], g)] = np.nan
        self._note_failures(failures, [(id(examples[r // g]), r % g) for r in np.flatnonzero(failed)])
        return total, table, texts

    def _note_failures(self, failures, keys) -> None:
        """Keep this rollout's reward failures (skipped completions, by (example object, completion index): dynamic
        sampling may pick rows from several draws); say the first few of the run."""
        self.reward_failures += list(failures)
        self._failed_rows |= set(keys)
        before = self.skipped_completions
        self.skipped_completions += len(keys)
        for f in failures[: max(0, 10 - before)]:
            self.log(f"reward skipped (rollout.on_reward_error: skip): {f.message}")

    def build_batch(self, examples, inputs, tokens, logps, lengths, stopped, advantages, rewards) -> dict:
        """The training batch [A, b, ...] of B*G completion rows (see the module docstring)."""
        from skyjax.train.grpo_rows import completion_vision, placeholder_cut, prompt_images

        g, a = self.rollout.num_generations, self.cfg.optimizer.grad_accum
        ids_p = np.repeat(np.asarray(inputs["input_ids"]), g, axis=0)  # [R, S_p] (left padded)
        mask_p = np.repeat(np.asarray(inputs["attention_mask"]).astype(bool), g, axis=0)
        rows, n = tokens.shape
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        live = np.arange(n)[None] < lengths[:, None]  # [R, N]
        # a sampled image placeholder is fed as padding; it and what follows it are not trained (grpo_rows)
        keep, placeholder = placeholder_cut(tokens, lengths, self.placeholders)
        completion = keep & (stopped[:, None] if self.rollout.mask_truncated_completions else True)
        ids = np.concatenate([ids_p, np.where(live & ~placeholder, tokens, pad)], axis=1).astype(np.int32)
        mask = np.concatenate([mask_p, live], axis=1)
        comp = np.concatenate([np.zeros_like(mask_p), completion], axis=1)
        old = np.concatenate([np.zeros(mask_p.shape, np.float32), np.where(live, logps, 0.0)], axis=1)
        if rows % a:
            raise ConfigError(f"{rows} completion rows (data.batch_size x rollout.num_generations) do not split into "
                              f"optimizer.grad_accum={a} micro-batches")
        per = rows // a
        where = ", ".join(e.where for e in examples[:3]) + (" ..." if len(examples) > 3 else "")
        vision = completion_vision(self.fmt, prompt_images(inputs, [len(e.images) for e in examples]), ids, g, a,
                                   where)
        batch = {"input_ids": ids, "attention_mask": mask, "completion": comp, "old_logps": old.astype(np.float32),
                 "advantages": np.asarray(advantages, np.float32), "rewards": np.nan_to_num(rewards).astype(np.float32),
                 "lengths": lengths.astype(np.float32), "truncated": (~stopped).astype(np.float32),
                 "zero_std": self._zero_std(rewards),
                 "row_weight": np.ones(rows, np.float32)}
        out = {k: v.reshape(a, per, *v.shape[1:]) for k, v in batch.items()}
        if vision is not None:
            out["vision"] = vision
        return out

    def _zero_std(self, rewards) -> np.ndarray:
        """1 for each completion whose prompt's group rewards are all equal (no learning signal), else 0."""
        g = self.rollout.num_generations
        grouped = np.nan_to_num(np.asarray(rewards, np.float64)).reshape(-1, g)
        return np.repeat(np.ptp(grouped, axis=1) <= 1e-8, g).astype(np.float32)

    def next(self, state: dict) -> tuple[dict, list[str]]:
        from skyjax.train.grpo_buffer import dynamic_sampling, mix_buffer
        from skyjax.train.grpo_log import rollout_stats
        from skyjax.train.losses.advantages import group_advantages

        jax.block_until_ready(state["trainable"])  # the previous step is done: what follows is this rollout's time
        self.rollout_log.ready()
        step = int(state["step"]) + 1  # the step this batch trains
        self.rollout_log.truncate(step - 1)  # a resumed run: the killed run's lines of later steps go
        if self.restored is not None:
            return self._serve(self._rebuild(self.restored))
        if self.cached is not None and self.used < self.rollout.num_iterations:
            self.used += 1
            return self._serve(self.cached)
        prompts = next(self.iterator)
        examples = prompts["prompts"]
        start = time.perf_counter()
        self.reward_failures, self._failed_rows = [], set()
        inputs, tokens, logps, lengths, stopped = self.generate(state, examples)
        self.rollout_log.sampled(time.perf_counter() - start, int(np.sum(lengths)))
        rewards, table, _ = self.score(examples, tokens, lengths)
        extra = {}
        if self.rollout.dynamic_sampling.enabled:  # more prompt batches until the groups' rewards differ
            (examples, inputs, tokens, logps, lengths, stopped, rewards, table), extra = dynamic_sampling(
                self, state, examples, (inputs, tokens, logps, lengths, stopped), rewards, table)
        adv, metrics = group_advantages(jnp.asarray(rewards), self.rollout.num_generations,
                                        self.rollout.scale_rewards)
        adv = np.asarray(adv)
        self.rollouts += 1
        batch = self.build_batch(examples, inputs, tokens, logps, lengths, stopped, adv, rewards)
        row_ids = [e.row_id for e in examples for _ in range(self.rollout.num_generations)]
        records = {e.row_id: e.record for e in examples}
        if self.buffer is not None:  # the prompts a buffered row may come from, by file:line
            records.update({row_location(p.record): p.record for p in self.buffer.prompts.values()})
        batch, row_ids, more = mix_buffer(self, state, batch, row_ids, examples, inputs)  # + `effective` per row
        self.records = {r: records[r] for r in row_ids}
        self._add_row_flags(batch, examples)
        self.stats = {k: float(v) for k, v in metrics.items()} | extra | more
        self.stats.update(rollout_stats(self.reward_names(), table, lengths, self._cut(tokens, lengths)))
        if self.rollout_log.wants(step):
            self._write_completions(step, examples, tokens, lengths, stopped, adv, rewards, table)
        self.cached, self.used = (batch, row_ids), 1
        return self._serve(self.cached)

    def metrics(self) -> dict:
        """Sampling and update throughput since the last call (skyjax.train.grpo_log), for the trainer's log row."""
        return self.rollout_log.metrics()

    def reward_names(self) -> list[str]:
        """Each reward's name in the logs: its built-in name, a dotted path's function name (then its position
        when two share one)."""
        names = [spec.name.split(":")[-1].split(".")[-1] for spec in self.cfg.rollout.rewards]
        return [n if names.count(n) == 1 else f"{n}_{k}" for k, n in enumerate(names)]

    def _cut(self, tokens, lengths) -> np.ndarray:
        from skyjax.train.grpo_rows import placeholder_cut

        return placeholder_cut(tokens, lengths, self.placeholders)[1].any(axis=1)

    def _serve(self, cached: tuple[dict, list[str]]) -> tuple[dict, list[str]]:
        self.rollout_log.served(int(np.sum(cached[0]["attention_mask"])))
        return cached

    def _write_completions(self, step: int, examples, tokens, lengths, stopped, adv, rewards, table) -> None:
        g, names = self.rollout.num_generations, self.reward_names()
        prompts = [_prompt_text(self.tokenizer, e.record) for e in examples]
        rows = []
        for r in range(tokens.shape[0]):
            e = examples[r // g]
            text = self.tokenizer.decode(tokens[r, : lengths[r]].tolist(), skip_special_tokens=True)
            rows.append({"step": step, "rollout": self.rollouts - 1, "row": e.row_id, "prompt": prompts[r // g],
                         "images": [str(p) for p in e.record.images], "completion": text,
                         "reward": _number(rewards[r]),
                         "rewards": {n: _number(table[r, k]) for k, n in enumerate(names)},
                         "advantage": float(adv[r]), "length": int(lengths[r]), "stopped": bool(stopped[r])})
        self.rollout_log.write(rows)

    def _rebuild(self, saved: dict) -> tuple[dict, list[str]]:
        """The reused batch of a checkpoint saved in its middle: its arrays as saved, its images read and prepared
        again from its rows' prompt records (each prompt alone: the same pixels as in the batch it was sampled in)
        and packed as the batch packed them."""
        from skyjax.train.grpo_buffer import record_from_json
        from skyjax.train.grpo_rows import prompt_images, rows_vision

        self.restored = None
        arrays = {k: _unpack(v) for k, v in saved["arrays"].items()}
        row_ids = list(saved["row_ids"])
        self.records = {r: record_from_json(rec) for r, rec in saved["records"].items()}
        per_prompt = {}
        for r, record in self.records.items():
            images = load_images(record, r, self.pipeline.blank)
            inputs = self.prepare([PromptExample(r, r, record, images)])
            per_prompt[r] = prompt_images(inputs, [len(images)])
        batch = dict(arrays)
        if any(p is not None for p in per_prompt.values()):
            a, per, s = arrays["input_ids"].shape
            per_row = [None if per_prompt[r] is None else per_prompt[r][0] for r in row_ids]
            batch["vision"] = rows_vision(self.fmt, per_row, arrays["input_ids"].reshape(a * per, s), a,
                                          ", ".join(row_ids[:3]))
        self.stats = dict(saved["stats"])
        self.cached, self.used = (batch, row_ids), int(saved["used"]) + 1
        return self.cached

    def _add_row_flags(self, batch: dict, examples) -> None:
        """A prompt the pipeline skipped (data.on_error: skip, e.g. a missing image) is a zero-weight copy of a good
        one: its completions get row_weight 0. `reward_skipped` marks the completions a reward function failed on
        (logged as reward_skipped_fraction). A row the buffer placed (rollout.buffer) is neither."""
        g = self.rollout.num_generations
        a, per = batch["row_weight"].shape
        rows = a * per
        weight = np.array([examples[r // g].weight for r in range(rows)], np.float32)
        skipped = np.array([(id(examples[r // g]), r % g) in self._failed_rows for r in range(rows)], np.float32)
        buffered = np.asarray(batch.get("buffered", np.zeros((a, per)))).reshape(-1) > 0
        batch["row_weight"] = np.where(buffered, batch["row_weight"].reshape(-1),
                                       batch["row_weight"].reshape(-1) * weight).reshape(a, per)
        batch["reward_skipped"] = np.where(buffered, 0.0, skipped).astype(np.float32).reshape(a, per)

    def get_state(self) -> Any:
        from skyjax.train.grpo_buffer import buffer_state, record_to_json

        out = {"pipeline": self.iterator.get_state(), "rollouts": self.rollouts, **buffer_state(self)}
        if self.restored is not None:  # restored, not yet rebuilt: still that batch
            out["reuse"] = self.restored
        elif self.cached is not None and self.used < self.rollout.num_iterations:
            batch, row_ids = self.cached
            out["reuse"] = {"used": self.used, "row_ids": list(row_ids), "stats": dict(self.stats),
                            "arrays": {k: _pack(v) for k, v in batch.items() if k != "vision"},
                            "records": {r: record_to_json(rec) for r, rec in self.records.items()}}
        return out

    def set_state(self, saved: Any) -> None:
        from skyjax.train.grpo_buffer import restore_buffer

        self.iterator.set_state(saved["pipeline"])
        self.rollouts = int(saved["rollouts"])
        restore_buffer(self, saved)
        self.cached, self.used = None, 0
        self.restored = saved.get("reuse")


def _number(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _pack(array) -> dict:
    """A host array as JSON (the checkpoint's data item): its .npy bytes, base64 (exact)."""
    import base64
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return {"npy": base64.b64encode(buf.getvalue()).decode("ascii")}


def _unpack(packed: dict) -> np.ndarray:
    import base64
    import io

    return np.load(io.BytesIO(base64.b64decode(packed["npy"])), allow_pickle=False)


def rollout_source(pipeline, bundle: ModelBundle, cfg, trainer=None) -> RolloutSource:
    if trainer is None:
        raise ValueError("the rollout source needs the trainer (its mesh and model)")
    return RolloutSource(pipeline, bundle, cfg, trainer)


# --- held-out evaluation ----------------------------------------------------------------------------------------------


def greedy_eval(trainer, path, *, blank_images: bool = False, max_new_tokens: int | None = None) -> dict:
    """Held-out greedy accuracy of the current policy on generate rows with answers (skyjax.eval.verifiers), and the
    mean completion length, with the trainer's parameters on its mesh."""
    from skyjax.eval.verifiers import verify
    from skyjax.parallel.rules import use_mesh
    from skyjax.sample.decode import generate
    from skyjax.train.pipeline import read_records

    src: RolloutSource = trainer.batches
    cfg = trainer.cfg
    records, _ = read_records([path], cfg.data.on_error, kind="generate")
    sampling = dataclasses.replace(src.sampling(), temperature=0.0, num_samples=1,
                                   max_new_tokens=max_new_tokens or src.rollout.max_new_tokens)
    params = merge_params(trainer.state["trainable"], trainer.state["frozen"])
    correct, lengths = [], []
    bs = cfg.trainer.eval_batch_size
    with use_mesh(trainer.mesh):
        for start in range(0, len(records), bs):
            chunk = records[start:start + bs]
            images = [load_images(r, row_location(r), blank_images) for r in chunk]
            convs = [r.conversation() for r in chunk]
            n = len(chunk)
            convs += [convs[0]] * (bs - n)  # one shape for every batch
            images += [images[0]] * (bs - n)
            inputs = src.adapter.prepare(convs, images, src.tokenizer)
            out = generate(src.adapter, params, inputs, sampling, seed=0)
            toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
            for i, r in enumerate(chunk):
                text = src.tokenizer.decode(toks[i, : lens[i]].tolist(), skip_special_tokens=True)
                if r.answer is None:
                    raise BadRowError(f"{row_location(r)}: held-out rows of kind grpo need an 'answer'")
                correct.append(verify(text, r.answer).correct)
                lengths.append(int(lens[i]))
    return {"accuracy": float(np.mean(correct)), "completion_length": float(np.mean(lengths)),
            "rows": len(records)}


def grpo_summary(trainer, evals: dict) -> dict:
    out: dict[str, Any] = {"eval": evals}
    if "heldout" in evals:
        out["heldout_accuracy"] = evals["heldout"]["accuracy"]
    return out


def synthetic_prompts(folder, name, n, **kw):
    from skyjax.data.synthetic import make_prompts

    return make_prompts(folder, name, n, **kw)


def abstract_grpo_batch(bundle: ModelBundle, data: DataConfig, micro_batches: int, mesh, hosts: int = 1, **_):
    raise ConfigError("skyjax aot does not compile the GRPO step yet")
