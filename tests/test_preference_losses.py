"""MPO's terms (skyjax.train.losses.preference) and the shared log-prob helper against TRL 1.16 on the same tensors.

TRL's entry points: `DPOTrainer._compute_loss` (the trainer is built without its __init__, `object.__new__`, with
the attributes the loss reads and reference log-probs passed in as precomputed; the model is a stand-in whose fused
LM head returns a leaf tensor of per-token log-probs, so TRL's loss and its gradient with respect to those log-probs
are read directly), `trl.trainer.utils.selective_log_softmax` and `entropy_from_logits`.

TRL 1.16 no longer has a running BCO shift, a per-sequence SFT average, or label smoothing on its sigmoid loss;
those are checked against independent numpy computations written from the formulas (InternVL's MPO for the running
shift and the token SFT mean, the R1V2 paper's NLL / |y_c| for the sequence average), and the smoothed DPO form is
also checked against TRL's `aot` loss, which applies the same smoothing, on batches where aot's sorting only
permutes the pairs.
"""

from __future__ import annotations

import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skyjax.data.records import ContentPart, Message, Record
from skyjax.train.losses import (
    MPOConfig,
    NonFiniteLogProbs,
    check_finite_logprobs,
    identical_pairs,
    init_bco_state,
    mpo_loss,
    next_token_alignment,
    nonfinite_rows,
    token_entropy,
    token_logprobs,
)

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.utils import entropy_from_logits, selective_log_softmax  # noqa: E402

RTOL = 1e-6
ATOL = 1e-7  # for entries that are 0 or nearly so, where a relative bound says nothing


# --- a batch of pairs and TRL's DPO loss on it ------------------------------------------------------------------------


def make_pairs(seed: int, b: int = 4, s: int = 12, scale: float = 1.0) -> dict:
    """b pairs as TRL's DPO batch [chosen; rejected] of 2b rows of length s: completion masks with prompts and
    right padding of varied length, per-token log-probs [2b, s-1] (the stand-in model's output) and reference
    sequence log-probs [b] each."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((2 * b, s), np.int64)
    for i in range(2 * b):
        start = rng.integers(1, 4)
        mask[i, start:rng.integers(start + 2, s + 1)] = 1
    shifted = mask[:, 1:].astype(np.float32)
    logp = (-rng.gamma(2.0, 0.7, size=(2 * b, s - 1)) * scale).astype(np.float32)
    seq = (logp * shifted).sum(1)
    # the reference is near the policy, so that the implicit rewards beta*rho are of order 1
    ref = (seq + rng.normal(0.0, 3.0, size=2 * b)).astype(np.float32)
    return {"input_ids": rng.integers(0, 50, size=(2 * b, s)), "completion_mask": mask, "token_logps": logp,
            "ref_chosen": ref[:b], "ref_rejected": ref[b:]}


class StandInLM:
    """What `model(..., labels=labels, fused_lm_head=True)` returns in TRL: per-token log-probs zeroed where the
    next-token label is -100, plus the per-token fields DPO logs."""

    def __init__(self, token_logps: torch.Tensor):
        self.token_logps = token_logps

    def __call__(self, labels: torch.Tensor, **_) -> types.SimpleNamespace:
        valid = labels[:, 1:] != -100
        zeros = torch.zeros(valid.shape)
        return types.SimpleNamespace(log_probs=self.token_logps * valid, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros(valid.shape, dtype=torch.bool))


def trl_dpo(batch: dict, loss_types: list[str], loss_weights: list[float], beta: float = 0.1,
            label_smoothing: float = 0.0) -> tuple[float, np.ndarray, dict]:
    """TRL 1.16's DPO loss on `batch`: (loss, d loss / d per-token log-probs [2b, s-1], logged metrics)."""
    t = object.__new__(DPOTrainer)
    t.model = types.SimpleNamespace(training=True)
    t.accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                          gather_for_metrics=lambda x: x)
    t.aux_loss_enabled, t.ld_alpha, t.precompute_ref_logps = False, None, True
    t.f_divergence_type, t.use_weighting = "reverse_kl", False
    t.loss_types, t.loss_weights, t.beta, t.label_smoothing = loss_types, loss_weights, beta, label_smoothing
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens, t._tp_size = 0, 1
    leaf = torch.tensor(batch["token_logps"], requires_grad=True)
    ids = torch.tensor(batch["input_ids"])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "completion_mask": torch.tensor(batch["completion_mask"]),
              "ref_chosen_logps": torch.tensor(batch["ref_chosen"]),
              "ref_rejected_logps": torch.tensor(batch["ref_rejected"])}
    loss = t._compute_loss(StandInLM(leaf), inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in t._metrics["train"].items()}
    return loss.item(), leaf.grad.numpy(), metrics


def skyjax_mpo(batch: dict, cfg: MPOConfig, state=None, pair_weight=None):
    """skyjax's MPO on the same batch, as a function of the same per-token log-probs: (loss, grad, metrics, state)."""
    b = batch["ref_chosen"].shape[0]
    mask = jnp.asarray(batch["completion_mask"][:, 1:])

    def f(token_logps):
        per_token = token_logps * mask
        seq = per_token.sum(1)
        loss, metrics, new_state = mpo_loss(seq[:b], seq[b:], jnp.asarray(batch["ref_chosen"]),
                                            jnp.asarray(batch["ref_rejected"]), per_token[:b], mask[:b], state, cfg,
                                            pair_weight)
        return loss, (metrics, new_state)

    (loss, (metrics, new_state)), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(batch["token_logps"]))
    return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}, new_state


def close(actual, expected, atol: float = ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=RTOL,
                               atol=atol)


# --- each TRL-computable term, value and gradient ---------------------------------------------------------------------


@pytest.mark.parametrize("term", ["sigmoid", "bco_pair", "sft"])
def test_each_term_matches_trl(term):
    """One term at weight 1 (the others at 0): value, gradient and the reward metrics equal TRL's."""
    batch = make_pairs(seed=1)
    weights = {"dpo_weight": float(term == "sigmoid"), "bco_weight": float(term == "bco_pair"),
               "sft_weight": float(term == "sft")}
    cfg = MPOConfig(beta=0.1, bco_delta="none", sft_average="token", **weights)
    loss, grad, metrics, _ = skyjax_mpo(batch, cfg)
    t_loss, t_grad, t_metrics = trl_dpo(batch, [term], [1.0], beta=0.1)
    close(loss, t_loss)
    close(grad, t_grad)
    assert np.abs(t_grad).max() > 1e-3  # the comparison is not between two zero gradients
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        close(metrics[key], t_metrics[key])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_mpo_with_trl_weights_matches_trl(beta):
    """TRL's MPO recipe, loss_type [sigmoid, bco_pair, sft] weights [0.8, 0.2, 1.0]: skyjax with bco_delta='none'
    gives TRL's value and gradient, and the per-term metrics add up to the loss."""
    batch = make_pairs(seed=2, b=5)
    cfg = MPOConfig(beta=beta, bco_delta="none")
    loss, grad, metrics, state = skyjax_mpo(batch, cfg, state=None)
    t_loss, t_grad, _ = trl_dpo(batch, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=beta)
    close(loss, t_loss)
    close(grad, t_grad)
    assert state is None and metrics["bco_delta"] == 0.0
    close(0.8 * metrics["dpo_loss"] + 0.2 * metrics["bco_loss"] + metrics["sft_loss"], metrics["loss"])


def test_padding_pairs_change_nothing():
    """Rows with pair_weight 0 (padding) leave the loss, gradient of the real rows and metrics as TRL computes them
    on the real pairs alone; the padding rows get no gradient."""
    real = make_pairs(seed=3, b=3)
    junk = make_pairs(seed=4, b=2)
    b, bj = 3, 2
    padded = {
        "input_ids": np.concatenate([real["input_ids"][:b], junk["input_ids"][:bj], real["input_ids"][b:],
                                     junk["input_ids"][bj:]]),
        "completion_mask": np.concatenate([real["completion_mask"][:b], junk["completion_mask"][:bj],
                                           real["completion_mask"][b:], junk["completion_mask"][bj:]]),
        "token_logps": np.concatenate([real["token_logps"][:b], junk["token_logps"][:bj], real["token_logps"][b:],
                                       junk["token_logps"][bj:]]),
        "ref_chosen": np.concatenate([real["ref_chosen"], junk["ref_chosen"]]),
        "ref_rejected": np.concatenate([real["ref_rejected"], junk["ref_rejected"]]),
    }
    weight = jnp.asarray([1.0] * b + [0.0] * bj)
    loss, grad, metrics, _ = skyjax_mpo(padded, MPOConfig(bco_delta="none"), pair_weight=weight)
    t_loss, t_grad, t_metrics = trl_dpo(real, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    close(loss, t_loss)
    close(grad[:b], t_grad[:b])
    close(grad[b + bj:2 * b + bj], t_grad[b:])
    assert not np.any(grad[b:b + bj]) and not np.any(grad[2 * b + bj:])
    for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies"):
        close(metrics[key], t_metrics[key])
    # the running BCO shift does not see the padding rows either
    run_pad = skyjax_mpo(padded, MPOConfig(), state=init_bco_state(), pair_weight=weight)
    run_real = skyjax_mpo(real, MPOConfig(), state=init_bco_state())
    close(run_pad[2]["bco_delta"], run_real[2]["bco_delta"])
    close(run_pad[0], run_real[0])
    assert float(run_pad[3].batches) == 1.0


# --- what TRL 1.16 no longer computes: numpy from the formulas -----------------------------------------------------


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_running_bco_delta_over_three_batches():
    """bco_delta='running': over three batches of different sizes, delta is the mean of the batch means of
    beta*[rho_c; rho_r] seen so far (this batch included); the BCO term's value and gradient and the whole MPO loss
    (TRL's sigmoid and sft terms plus the running BCO term) match, computed in float64 numpy."""
    beta = 0.1
    cfg = MPOConfig(beta=beta)  # running delta, token SFT: InternVL's MPO
    state = init_bco_state()
    batch_means = []
    for seed, b in [(10, 3), (11, 5), (12, 2)]:
        batch = make_pairs(seed=seed, b=b)
        mask = batch["completion_mask"][:, 1:].astype(np.float64)
        seq = (batch["token_logps"].astype(np.float64) * mask).sum(1)
        rc = beta * (seq[:b] - batch["ref_chosen"])
        rr = beta * (seq[b:] - batch["ref_rejected"])
        batch_means.append(np.concatenate([rc, rr]).mean())
        delta = np.mean(batch_means)
        bco = np.mean(-np_logsig(rc - delta) - np_logsig(-(rr - delta)))
        # d bco / d token logp = d bco / d rho * mask (rho is a sum over the row's tokens)
        g_rho = np.concatenate([-beta * np_sig(-(rc - delta)), beta * np_sig(rr - delta)]) / b
        bco_grad = g_rho[:, None] * mask

        loss, grad, metrics, state = skyjax_mpo(batch, cfg, state)
        close(metrics["bco_delta"], delta)
        close(metrics["bco_loss"], bco)
        t_loss, t_grad, _ = trl_dpo(batch, ["sigmoid", "sft"], [0.8, 1.0], beta=beta)
        close(loss, t_loss + 0.2 * bco)
        close(grad, t_grad + 0.2 * bco_grad)
    assert float(state.batches) == 3.0
    # the shift is the mean of batch means, not the mean over all 20 rewards (batches of 6, 10 and 4 rewards)
    close(float(state.total) / 3.0, np.mean(batch_means))


def test_sequence_average_sft():
    """sft_average='sequence': mean over pairs of (the chosen response's NLL / its token count), value and gradient
    against numpy; it differs from TRL's token mean when lengths differ."""
    batch = make_pairs(seed=5, b=4)
    b = 4
    cfg = MPOConfig(dpo_weight=0.0, bco_weight=0.0, sft_weight=1.0, sft_average="sequence")
    loss, grad, _, _ = skyjax_mpo(batch, cfg)
    mask = batch["completion_mask"][:b, 1:].astype(np.float64)
    logp = batch["token_logps"][:b].astype(np.float64)
    lengths = mask.sum(1)
    close(loss, np.mean(-(logp * mask).sum(1) / lengths))
    expected_grad = np.zeros_like(batch["token_logps"], np.float64)
    expected_grad[:b] = -mask / lengths[:, None] / b
    close(grad, expected_grad)
    token_loss, _, _ = trl_dpo(batch, ["sft"], [1.0])
    assert len(set(lengths)) > 1 and abs(loss - token_loss) > 1e-3


@pytest.mark.parametrize("ls", [0.1, 0.3])
def test_label_smoothing(ls):
    """Conservative DPO, -(1-ls) log sig(m) - ls log sig(-m): against numpy (value and gradient), and against TRL's
    `aot` loss, which smooths the same way, on a batch whose reference margins ref_c - ref_r are all equal (aot
    sorts the policy and reference margins separately; with a constant reference margin the sort only permutes
    the pairs, and the batch mean does not see the order)."""
    beta = 0.2
    batch = make_pairs(seed=6, b=5)
    cfg = MPOConfig(beta=beta, label_smoothing=ls, dpo_weight=1.0, bco_weight=0.0, sft_weight=0.0)
    loss, grad, _, _ = skyjax_mpo(batch, cfg)
    b = 5
    mask = batch["completion_mask"][:, 1:].astype(np.float64)
    seq = (batch["token_logps"].astype(np.float64) * mask).sum(1)
    m = beta * ((seq[:b] - batch["ref_chosen"]) - (seq[b:] - batch["ref_rejected"]))
    close(loss, np.mean(-(1 - ls) * np_logsig(m) - ls * np_logsig(-m)))
    g_m = (-(1 - ls) * np_sig(-m) + ls * np_sig(m)) * beta / b
    close(grad, np.concatenate([g_m, -g_m])[:, None] * mask)

    const_ref = dict(batch, ref_rejected=(batch["ref_chosen"] - 7.0).astype(np.float32))
    loss_c, grad_c, _, _ = skyjax_mpo(const_ref, cfg)
    t_loss, t_grad, _ = trl_dpo(const_ref, ["aot"], [1.0], beta=beta, label_smoothing=ls)
    close(loss_c, t_loss)
    close(grad_c, t_grad)
    # and TRL 1.16's own sigmoid ignores label_smoothing: smoothing changes the value
    t_plain, _, _ = trl_dpo(const_ref, ["sigmoid"], [1.0], beta=beta, label_smoothing=ls)
    assert abs(t_plain - t_loss) > 1e-4


def test_mpo_is_jittable_and_state_threads_through_jit():
    """The whole objective compiles with its config static and the BCO state as an argument, and the jitted step
    gives the eager values."""
    batch = make_pairs(seed=7, b=3)
    cfg = MPOConfig()
    mask = jnp.asarray(batch["completion_mask"][:, 1:])

    def step(token_logps, state):
        def f(x):
            per_token = x * mask
            seq = per_token.sum(1)
            loss, metrics, new = mpo_loss(seq[:3], seq[3:], jnp.asarray(batch["ref_chosen"]),
                                          jnp.asarray(batch["ref_rejected"]), per_token[:3], mask[:3], state, cfg)
            return loss, (metrics, new)
        return jax.value_and_grad(f, has_aux=True)(token_logps)

    x = jnp.asarray(batch["token_logps"])
    state = init_bco_state()
    (l_eager, (m_eager, s_eager)), g_eager = step(x, state)
    jitted = jax.jit(step)
    (l_jit, (m_jit, s_jit)), g_jit = jitted(x, state)
    close(l_jit, l_eager)
    close(g_jit, g_eager)
    close(m_jit["bco_delta"], m_eager["bco_delta"])
    (_, (m2, s2)), _ = jitted(x + 0.5, s_jit)  # a second batch through the same compiled step
    assert float(s2.batches) == 2.0 and float(m2["bco_delta"]) != float(m_jit["bco_delta"])


def test_running_delta_needs_state():
    batch = make_pairs(seed=8, b=2)
    with pytest.raises(ValueError, match="BCODeltaState"):
        skyjax_mpo(batch, MPOConfig(bco_delta="running"), state=None)
    with pytest.raises(ValueError, match="bco_delta"):
        MPOConfig(bco_delta="ema")


# --- the log-prob helper ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_trl_selective_log_softmax(temperature):
    """Per-token log-probs (value and gradient with respect to the logits) and entropies equal TRL's
    selective_log_softmax / entropy_from_logits on the same logits; bf16 logits are scored in fp32."""
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 3, size=(3, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(3, 7))
    mask = (rng.random((3, 7)) > 0.3).astype(np.int32)
    labels_with_ignore = np.where(mask > 0, labels, -100)
    cot = rng.normal(size=(3, 7)).astype(np.float32)  # a random cotangent, so that every position's gradient shows

    t_logits = torch.tensor(logits, requires_grad=True)
    t_lp = selective_log_softmax(t_logits, torch.tensor(labels), temperature=temperature) * torch.tensor(mask)
    (t_lp * torch.tensor(cot)).sum().backward()
    t_ent = entropy_from_logits(torch.tensor(logits) / temperature) * torch.tensor(mask)

    def f(lg):
        per_token, per_seq = token_logprobs(lg, jnp.asarray(labels_with_ignore), jnp.asarray(mask), temperature)
        return jnp.sum(per_token * cot), (per_token, per_seq)

    (_, (per_token, per_seq)), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits))
    close(per_token, t_lp.detach().numpy())
    close(per_seq, t_lp.detach().numpy().sum(1))
    # d logp / d logit = onehot - p cancels at the chosen token: an fp32 error of a few ulps of 1, so this one is
    # bounded relative to the gradient's scale rather than entry by entry
    t_grad = t_logits.grad.numpy()
    close(grad, t_grad, atol=RTOL * np.abs(t_grad).max())
    close(token_entropy(jnp.asarray(logits), jnp.asarray(mask), temperature), t_ent.numpy())
    bf16, _ = token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), jnp.asarray(mask), temperature)
    assert bf16.dtype == jnp.float32


def test_next_token_alignment():
    """Position t's logits score token t+1, and count when token t+1 is a completion token."""
    logits = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    ids = jnp.asarray([[5, 6, 7, 8], [1, 2, 3, 4]])
    cm = jnp.asarray([[0, 0, 1, 1], [0, 1, 1, 0]])
    lg, lab, m = next_token_alignment(logits, ids, cm)
    assert lg.shape == (2, 3, 3) and np.array_equal(lg, logits[:, :3])
    assert np.array_equal(lab, [[6, 7, 8], [2, 3, 4]]) and np.array_equal(m, [[0, 1, 1], [1, 1, 0]])


# --- host-side checks -------------------------------------------------------------------------------------------------


def test_nonfinite_rows_are_named():
    chosen = np.array([-3.0, np.nan, -1.0, -np.inf])
    per_token = np.zeros((4, 5))
    per_token[2, 4] = np.inf  # masked out: not an error
    per_token[0, 1] = np.nan  # counted
    mask = np.ones((4, 5))
    mask[2, 4] = 0
    rows = nonfinite_rows({"policy_chosen": chosen, "chosen_tokens": per_token, "ref": np.zeros(4)},
                          masks={"chosen_tokens": mask})
    assert rows == {"policy_chosen": [1, 3], "chosen_tokens": [0]}
    with pytest.raises(NonFiniteLogProbs, match=r"policy_chosen rows \[1, 3\]") as err:
        check_finite_logprobs({"policy_chosen": chosen})
    assert err.value.rows == {"policy_chosen": [1, 3]}
    check_finite_logprobs({"ref": np.zeros(4), "chosen_tokens": per_token[1:2]})  # all finite: no error


def test_identical_pairs_are_found():
    def rec(chosen, rejected):
        return Record(images=(), prompt=(Message("user", "q"),), chosen=(Message("assistant", chosen),),
                      rejected=(Message("assistant", rejected),))

    parts = (ContentPart("text", "same "), ContentPart("image"))
    records = [
        rec("a", "b"),
        rec("answer 42", "answer 42\n"),  # differs only in trailing whitespace
        Record(images=("x.png",), prompt=(), chosen=(Message("assistant", parts),),
               rejected=(Message("assistant", (ContentPart("text", "same"), ContentPart("image"))),)),
        rec("a", "A"),
        Record(images=(), prompt=(), response=(Message("assistant", "r"),)),  # not a pair
    ]
    assert identical_pairs(records) == [1, 2]
