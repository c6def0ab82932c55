"""Where the trainer's batches come from: a `BatchSource`, made by the run's task (Task.batch_source in
skyjax.train.tasks).

    batch, row_ids = source.next(state)     # one host batch (arrays [A, ...], this host's share) and its row ids
    source.get_state() / set_state(saved)   # JSON-serialisable position, saved in every checkpoint ("data" item)

`next` is given the current train state (skyjax.train.step: trainable / frozen params, optimizer state, reference,
objective state; sharded jax.Arrays, read-only: the source must neither keep nor modify them, since the next step
donates them). A record pipeline ignores it. An on-policy source needs it: GRPO's rollout source samples completions
of the next prompts with merge(trainable, frozen), scores them with the reward functions, computes group advantages
and returns the collated batch. A source may also add what depends on the frozen reference alone (its log-probs, for
`reference.precompute`): the state holds it. Passing the state on every call (rather than a callback registered once)
keeps the source a plain object with no reference to the trainer, and makes "the parameters the rollout used"
explicit: those of the state passed in, i.e. the step about to run.

On several hosts every host calls `next` once per step, in step (a rollout source may run collectives in it).
A source may keep `stats`, a dict of floats about its last batch (GRPO: the sample buffer, dynamic sampling,
rewards per function): the trainer logs them with the step's metrics, under names the objective does not use.
"""

from __future__ import annotations

from typing import Any, Protocol

from skyjax.train.batching import host_batch
from skyjax.train.pipeline import RecordPipeline


class BatchSource(Protocol):
    """The protocol the trainer loops over (see the module docstring)."""

    def next(self, state: dict) -> tuple[dict, list[str]]: ...

    def get_state(self) -> Any: ...

    def set_state(self, saved: Any) -> None: ...


class PipelineSource:
    """A record pipeline (skyjax.train.pipeline.RecordPipeline: a grain dataset) as a batch source: the next
    collated batch, whatever the parameters; its position is the grain iterator's state."""

    def __init__(self, pipeline: RecordPipeline):
        self.pipeline = pipeline
        self.iterator = iter(pipeline.dataset)

    def next(self, state: dict | None = None) -> tuple[dict, list[str]]:
        return host_batch(next(self.iterator))

    def get_state(self) -> Any:
        return self.iterator.get_state()

    def set_state(self, saved: Any) -> None:
        self.iterator.set_state(saved)


def pipeline_source(pipeline: RecordPipeline, bundle, cfg, trainer=None) -> PipelineSource:
    """The default `Task.batch_source`: the task's record pipeline itself, (pipeline, ModelBundle, RunConfig,
    trainer=the Trainer being built) -> source. A rollout task builds its source from the same arguments (the
    pipeline then yields prompts); MPO's reference.precompute source reads the trainer's model function, mesh and
    held-out files from `trainer`."""
    return PipelineSource(pipeline)
