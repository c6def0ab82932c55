"""Every process of a training run stops at the same step on a stop signal (docs/preemption.md).

A TPU pod is preempted by a SIGTERM to every host, not at the same instant; Ctrl-C reaches one process. A signal
only sets a flag in the process that gets it (Trainer._on_signal). If each host acted on its own flag, the host that
saw the signal would enter the checkpoint save while the others entered the next train step, and the collectives
of the two would not match (a crash or a hang). So the flags are combined:

- one process: the flag itself, read after every step (no collective, nothing to wait for);
- several processes: after dispatching train step N every process dispatches a vote, the signal number it got (0
  for none) reduced with max over every device of the mesh (one int32 all-reduce), and reads the vote dispatched
  after step N-1. The loop already waits for step N-1's metrics at that point, so reading the vote adds no stall.
  Every process polls at the same points of the same loop, so all read the same value at the same step: they stop
  after the same step, save it together and raise `Preempted` with the signal some host got.
- `agree` is one blocking vote, for the points after the loop (the last step, the final evaluation) where a signal
  that came too late for the last poll must still stop every process alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class StopVote:
    """The stop signal every process of the job agrees on. Every process must call `poll` and `agree` at the same
    points: on several processes each call is a collective."""

    def __init__(self, mesh: Mesh, processes: int | None = None):
        self.processes = jax.process_count() if processes is None else processes
        self.votes = 0  # collectives dispatched (none on one process)
        self._pending = None
        if self.processes > 1:
            self._shape = (mesh.devices.size,)
            self._sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))  # one entry per device
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def _dispatch(self, signum: int) -> jax.Array:
        local = np.full((1,), signum, np.int32)
        self.votes += 1
        return self._max(jax.make_array_from_callback(self._shape, self._sharding, lambda index: local))

    @staticmethod
    def _read(vote: jax.Array) -> int:
        return int(np.asarray(vote.addressable_data(0)))

    def poll(self, signum: int | None) -> int | None:
        """Once per step, right after the step is dispatched: on several processes this step's vote is dispatched
        and the previous step's read (0: go on; else the signal to stop with). On one process None: the caller reads
        its own flag when it decides, as there is nothing to agree on."""
        if self.processes == 1:
            return None
        previous, self._pending = self._pending, self._dispatch(signum or 0)
        return 0 if previous is None else self._read(previous)

    def agree(self, signum: int | None) -> int:
        """The signal to stop with (0: none): this process's on one process; on several, the max over every
        process of a vote taken now (blocking)."""
        if self.processes == 1:
            return signum or 0
        self._pending = None  # the flags only ever go from 0 to a signal: a vote taken now covers the pending one
        return self._read(self._dispatch(signum or 0))
