"""MPO's objective (objective.mpo): w_dpo * DPO + w_bco * BCO + w_sft * SFT of a policy on preference pairs, against a
frozen reference (skyjax.train.reference), with BCO's running reward shift as objective state.

One shared-prompt row per pair (skyjax.train.mpo): the prompt and its images run once, each response's tokens see
the prompt and their own branch only. The sequence log-probs log pi(y|x) are sums over each response's completion
tokens, in fp32; the reference's come from the same row under stop_gradient (the reference resident in the state),
or from the batch (`ref_logps`, reference.precompute). The terms themselves are skyjax.train.losses.preference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skyjax.train.config import MPOObjectiveConfig
from skyjax.train.global_batch import host_blocks
from skyjax.train.losses.preference import BCODeltaState, MPOConfig, mpo_loss
from skyjax.train.objectives.sft import token_nll


def losses_config(cfg: MPOObjectiveConfig) -> MPOConfig:
    return MPOConfig(beta=cfg.beta, dpo_weight=cfg.dpo_weight, bco_weight=cfg.bco_weight, sft_weight=cfg.sft_weight,
                     label_smoothing=cfg.label_smoothing, bco_delta=cfg.bco_delta, sft_average=cfg.sft_average)


def branch_positions(model, batch: dict) -> jax.Array:
    """Positions of a shared-prompt row: each token's position in its own (prompt + response) row. Qwen2.5-VL:
    M-RoPE positions [3, b, S]; R1V / Qwen2: 1-D positions [b, S]."""
    ids, mask, branch = batch["input_ids"], batch["attention_mask"], batch["branch_ids"]
    chosen_len = jnp.sum((branch == 1) & mask, axis=1, keepdims=True)  # [b, 1]
    shift = jnp.where(branch == 2, chosen_len, 0)
    vision = batch.get("vision", {})
    cfg = model.cfg
    if "image_grid_thw" in vision:  # Qwen2.5-VL
        from skyjax.nn.mrope import mm_token_types, mrope_positions

        types = mm_token_types(ids, cfg.image_token_id, cfg.video_token_id)
        positions, _ = mrope_positions(types, mask, vision["image_grid_thw"],
                                       spatial_merge_size=cfg.vision.spatial_merge_size, validate=False)
        return positions - shift[None].astype(positions.dtype)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    return positions - shift


def sequence_logps(model, batch: dict, logits_chunk: int = 0):
    """(chosen [b], rejected [b] sequence log-probs, per-token log-probs [b, S], chosen completion mask [b, S])."""
    ids, branch, completion = batch["input_ids"], batch["branch_ids"], batch["completion"]
    vision = dict(batch.get("vision", {}))
    hosts = host_blocks(batch)
    if hosts > 1 and vision:
        vision["feature_blocks"] = hosts
    hidden, _ = model.hidden_states(ids, attention_mask=batch["attention_mask"], positions=branch_positions(model, batch),
                                    branch_ids=branch, **vision)
    # token j is predicted by the hidden state of the token before it in its own row
    source = jax.vmap(lambda h, i: h[i])(hidden, batch["predict_from"])  # [b, S, E]
    nll, _ = token_nll(source, model.logits, ids, logits_chunk)
    token_logps = -nll
    chosen_mask = completion & (branch == 1)
    rejected_mask = completion & (branch == 2)
    chosen = jnp.sum(jnp.where(chosen_mask, token_logps, 0.0), axis=1)
    rejected = jnp.sum(jnp.where(rejected_mask, token_logps, 0.0), axis=1)
    return chosen, rejected, token_logps, chosen_mask


def mpo_objective(model, batch: dict, cfg: MPOObjectiveConfig, *, reference=None, state=None):
    """(loss, sums, new state) of one micro-batch; sums are the metrics times the micro-batch's pairs ("weight")."""
    chosen, rejected, token_logps, chosen_mask = sequence_logps(model, batch, cfg.logits_chunk)
    if "ref_logps" in batch:
        ref = jax.lax.stop_gradient(batch["ref_logps"].astype(jnp.float32))
        ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
    elif reference is not None:
        ref_chosen, ref_rejected, _, _ = jax.lax.stop_gradient(sequence_logps(reference, batch, cfg.logits_chunk))
    else:
        raise ValueError("the MPO objective needs a reference: a resident one in the train state, or precomputed "
                         "log-probs in the batch (reference.precompute)")
    bco = None if state is None else BCODeltaState(state["bco_total"], state["bco_batches"])
    weight = batch["pair_weight"].astype(jnp.float32)
    loss, metrics, new = mpo_loss(chosen, rejected, ref_chosen, ref_rejected, token_logps, chosen_mask, bco,
                                  losses_config(cfg), weight)
    total = jnp.sum(weight)
    sums = {k: v * total for k, v in metrics.items()}
    sums["weight"] = total
    new_state = None if new is None else {"bco_total": new.total, "bco_batches": new.batches}
    return loss, sums, new_state


def needs_reference(cfg: MPOObjectiveConfig) -> bool:
    return True


def init_state(cfg: MPOObjectiveConfig):
    """BCO's running shift (sum of batch means, batches) when it is used; else no state."""
    if cfg.bco_weight and cfg.bco_delta == "running":
        return {"bco_total": jnp.zeros((), jnp.float32), "bco_batches": jnp.zeros((), jnp.float32)}
    return None
