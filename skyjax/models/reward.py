"""Skywork-VL Reward: Qwen2.5-VL with a scalar value head.

    score = v_head(final post-norm hidden state at the LAST REAL token of the row, in fp32)

The head is `Linear(hidden, 1, bias)` (TRL's ValueHead layout, `v_head.summary.*`), shipped beside an unmodified
Qwen2.5-VL folder in `value_head.safetensors`. "Last real token" is found from the attention mask, so left- and
right-padded batches score alike (the release card's `attention_mask.sum(-1) - 1` is only right for right padding).
The LM head is kept (the release ships it) but unused for scoring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from skyjax.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from skyjax.nn.layers import normal_init

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nnx.Module):
    """`summary`: Linear(hidden -> 1, bias), always computed in fp32."""

    def __init__(self, hidden: int, *, init_std: float = 0.02, rngs: nnx.Rngs):
        # a Dict so the parameter paths read v_head/summary/{kernel,bias}, mirroring v_head.summary.{weight,bias}
        self.summary = nnx.Dict(
            kernel=nnx.Param(normal_init(init_std)(rngs.params(), (hidden, 1), jnp.float32), axes=("embed", None)),
            bias=nnx.Param(jnp.zeros((1,), jnp.float32), axes=(None,)),
        )

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., E] -> [...] fp32."""
        kernel = self.summary["kernel"][...].astype(jnp.float32)
        bias = self.summary["bias"][...].astype(jnp.float32)
        return (jnp.dot(hidden.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST) + bias)[..., 0]


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """[B, S] mask -> [B] index of each row's last real token (any padding side)."""
    mask = attention_mask.astype(bool)
    s = mask.shape[1]
    return s - 1 - jnp.argmax(mask[:, ::-1], axis=1)


class Qwen2_5_VLRewardModel(Qwen2_5_VLForConditionalGeneration):
    def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.v_head = ValueHead(cfg.text.hidden_size, init_std=cfg.text.initializer_range, rngs=rngs)

    def score(self, input_ids: jax.Array, *, attention_mask: jax.Array, index: jax.Array | None = None,
              **kwargs) -> jax.Array:
        """Scalar rewards [B] (fp32) for each row of the batch, read at each row's last real token; with `index`
        [B, K] (positions in the row), rewards [B, K] read at those positions (several responses in one row)."""
        hidden, _ = self.hidden_states(input_ids, attention_mask=attention_mask, **kwargs)  # [B, S, E]
        if index is not None:
            picked = jnp.take_along_axis(hidden, index[:, :, None].astype(jnp.int32), axis=1)  # [B, K, E]
            return self.v_head(picked)
        last = last_token_index(attention_mask)
        picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, E]
        return self.v_head(picked)

    def __call__(self, input_ids: jax.Array, **kwargs):
        """Like the base model: (logits, cache). Use `score` for rewards."""
        return super().__call__(input_ids, **kwargs)
