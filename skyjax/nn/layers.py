"""Basic layers: Linear, Embed, RMSNorm, LayerNorm and the SwiGLU MLP.

Every parameter is an `nnx.Param` with an `axes` metadata entry naming its logical axes; `skyjax.parallel.rules`
turns those names into shardings. Parameters are stored in `param_dtype` and cast to the compute `dtype` at use, so
bf16 compute with fp32 master weights is one config line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from skyjax.parallel.rules import constrain

DType = jnp.dtype


def normal_init(std: float = 0.02):
    return jax.nn.initializers.normal(stddev=std)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel is (in, out): a torch Linear weight (out, in) transposed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = False,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        precision: jax.lax.Precision | str | None = None,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(
            normal_init(init_std)(rngs.params(), (in_features, out_features), param_dtype), axes=axes
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[1],)) if use_bias else None
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table (vocab, embed); `attend` computes tied-head logits."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision=None, init_std: float = 0.02, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            normal_init(init_std)(rngs.params(), (num_embeddings, features), param_dtype), axes=("vocab", "embed")
        )
        self.dtype = dtype
        self.precision = precision

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather the table's `embed` shards first (as FSDP does for every weight before use): the lookup output is
        # then replicated over the feature axis and slicing it to the batch layout is local. Looking up in the
        # feature-sharded table instead forces XLA into a full rematerialization to reach the batch layout.
        table = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T, precision=self.precision)


class RMSNorm(nnx.Module):
    """Qwen/LLaMA RMSNorm: normalise in fp32, cast back to the input dtype, THEN multiply by the weight.

    The cast order matters in bf16: multiplying before the cast (as some ports do) differs from the reference.
    """

    def __init__(self, features: int, *, eps: float = 1e-6, axis_name: str = "norm", param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype), axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(in_dtype) * x32.astype(in_dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with affine weight and bias, statistics in fp32."""

    def __init__(self, features: int, *, eps: float = 1e-5, axis_name: str = "norm", param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype), axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(in_dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), the Qwen2 MLP (and, with biases, the Qwen2.5-VL vision MLP). Runs `swiglu`."""

    def __init__(self, features: int, hidden: int, *, use_bias: bool = False, embed_axis: str = "embed",
                 mlp_axis: str = "mlp", dtype=jnp.float32, param_dtype=jnp.float32, precision=None,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, init_std=init_std,
                  rngs=rngs)
        self.gate_proj = Linear(features, hidden, axes=(embed_axis, mlp_axis), **kw)
        self.up_proj = Linear(features, hidden, axes=(embed_axis, mlp_axis), **kw)
        self.down_proj = Linear(hidden, features, axes=(mlp_axis, embed_axis), **kw)
        self.mlp_axis = mlp_axis
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        kernels = tuple(p.kernel[...].astype(dt) for p in projs)
        biases = () if self.gate_proj.bias is None else tuple(p.bias[...].astype(dt) for p in projs)
        axes = ("batch", "seq", self.mlp_axis) if x.ndim == 3 else None
        return swiglu(x.astype(dt), *kernels, biases, self.precision, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def swiglu(x, w_gate, w_up, w_down, biases=(), precision=None, hidden_axes=None):
    """down(silu(x @ w_gate + b_gate) * (x @ w_up + b_up)) + b_down, with a hand-written backward pass.

    biases: () or (b_gate, b_up, b_down). hidden_axes: logical axes of the [..., hidden] activations (a sharding
    constraint), or None. The backward pass equals autodiff's (tested) but is laid out for the matmul
    libraries: every weight gradient is one [tokens, in]^T @ [tokens, out] matmul on the activations as saved, and
    the residuals are x and the two projections only. Autodiff's version of it, inside a scanned layer stack,
    fuses the silu derivative with a transposed copy of the stacked residuals, which XLA:CPU runs an order of
    magnitude below memory speed (the benchmark's reward-model step spent a third of its text-layer time there)."""
    return _swiglu_forward(x, w_gate, w_up, w_down, biases, precision, hidden_axes)[0]


def _swiglu_forward(x, w_gate, w_up, w_down, biases, precision, hidden_axes):
    b_gate, b_up, b_down = biases or (None, None, None)

    def proj(inp, w, b):
        y = jnp.dot(inp, w, precision=precision)
        return y if b is None else y + b

    gate = _constrain_hidden(proj(x, w_gate, b_gate), hidden_axes)
    up = _constrain_hidden(proj(x, w_up, b_up), hidden_axes)
    out = proj(jax.nn.silu(gate) * up, w_down, b_down)
    return out, (x, gate, up, w_gate, w_up, w_down, biases)


def _swiglu_backward(precision, hidden_axes, residuals, d_out):
    x, gate, up, w_gate, w_up, w_down, biases = residuals
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    hidden = silu * up
    d_hidden = jnp.dot(d_out, w_down.T, precision=precision)
    d_gate = _constrain_hidden(d_hidden * up * (sig * (1 + gate * (1 - sig))), hidden_axes)
    d_up = _constrain_hidden(d_hidden * silu, hidden_axes)

    def weight_grad(inp, d):  # sum over every token of inp^T d
        return jnp.dot(inp.reshape(-1, inp.shape[-1]).T, d.reshape(-1, d.shape[-1]), precision=precision)

    d_x = jnp.dot(d_gate, w_gate.T, precision=precision) + jnp.dot(d_up, w_up.T, precision=precision)
    grads = (weight_grad(x, d_gate), weight_grad(x, d_up), weight_grad(hidden, d_out))
    token_axes = tuple(range(d_out.ndim - 1))
    d_biases = () if not biases else tuple(d.sum(token_axes).astype(b.dtype)
                                           for d, b in zip((d_gate, d_up, d_out), biases))
    return (d_x.astype(x.dtype), *(g.astype(w.dtype) for g, w in zip(grads, (w_gate, w_up, w_down))), d_biases)


def _constrain_hidden(h, axes):
    return h if axes is None else constrain(h, axes)


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_token_id: int,
                         groups: int = 1, feature_blocks: int = 1) -> jax.Array:
    """Write image features over the image-placeholder tokens: the k-th placeholder (row-major over the batch)
    takes feature row k. embeds [B, S, E], input_ids [B, S], features [U, E] (real rows first) -> [B, S, E].

    With `groups=g` the rows form g equal groups (e.g. a preference batch's chosen rows, then its rejected rows)
    that each read the features from row 0. The features are replicated first (they are few): the lookup is then
    local to every batch shard, with no resharding of the activations.

    With `feature_blocks=H` (a multi-host global batch, see skyjax.train.global_batch) the features are H equal
    blocks of U / H rows, host h's packed features (real rows first inside each block), and the g groups are spread
    evenly over them in order: group i reads block i // (g / H) from its first row. g must be a multiple of H.
    H = 1 is the single-host case above.
    """
    feats = constrain(features.astype(embeds.dtype), (None, None))
    is_image = input_ids == image_token_id  # [B, S]
    if is_image.shape[0] % groups:
        raise ValueError(f"{is_image.shape[0]} rows do not form {groups} equal image groups")
    if groups % feature_blocks or feats.shape[0] % feature_blocks:
        raise ValueError(f"{groups} image groups and {feats.shape[0]} feature rows do not split into "
                         f"{feature_blocks} equal feature blocks")
    per_block = feats.shape[0] // feature_blocks
    index = jnp.cumsum(is_image.reshape(groups, -1), axis=1) - 1  # [g, rows per group * S]
    block = jnp.arange(groups) // (groups // feature_blocks)  # [g]: the feature block of each group
    index = (jnp.clip(index, 0, per_block - 1) + block[:, None] * per_block).reshape(is_image.shape)
    return jnp.where(is_image[..., None], jnp.take(feats, index, axis=0), embeds)
