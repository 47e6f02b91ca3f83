"""The RL objective: group advantages, GSPO and token-clip losses, MISC, WPSM, hints, mismatch KL.

Layout: N = P * G rollouts, row n belongs to prompt (group) n // G; per-token arrays are
[N, S] and aligned with `Rollouts.targets` (log-probs of the generated token at s, 0 where
the mask is 0). Masks are float arrays (1 = counted). Everything is pure jnp and jit-able;
every coefficient is an argument (the values live in config.rl).

Sources
- GRPO group-normalised advantage: Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300, Sec. 4.1).
- GSPO sequence-level ratio and clipping: Zheng et al. 2025 (arXiv 2507.18071, eqs. 5-7).
- PPO token-level clipping: Schulman et al. 2017 (arXiv 1707.06347, eq. 7).
- MISC (multi-granularity importance-sampling clipping), WPSM (well-learned positive
  sample masking) and adaptive hints: ERNIE 5.0 technical report, RL section.
- k3 KL estimator: J. Schulman, "Approximating KL divergence" (2020 blog note).

Typical use in the training step (logp_new differentiable, the rest constants):
  keep = response_mask * misc_mask(logp_old, infer_logprobs, response_mask, alpha=, beta=)
  adv = group_advantages(rewards, G, eps=)
  w = wpsm_weights(rewards, G, seq_entropy, solved_threshold=, entropy_threshold=, down_weight=)
  loss, metrics = gspo_loss(logp_new, logp_old, keep, adv, clip_low=, clip_high=, weights=w)
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

_sg = jax.lax.stop_gradient


def _check_group_size(n: int, group_size: int) -> None:
  if not isinstance(group_size, numbers.Integral) or group_size < 1:
    raise ValueError(f"group_size={group_size!r} is not accepted: expected an int >= 1")
  if n % group_size:
    raise ValueError(f"rewards has {n} rows, not a multiple of group_size={group_size}: "
                     "expected N = prompts * group_size (row n = prompt n // group_size)")


def _check_clip(clip_low, clip_high) -> None:
  # Traced values cannot be checked; config.validate checks the configured ones.
  if isinstance(clip_low, (int, float)) and not 0.0 <= clip_low < 1.0:
    raise ValueError(f"clip_low={clip_low!r} is not accepted: expected 0 <= clip_low < 1")
  if isinstance(clip_high, (int, float)) and clip_high < 0.0:
    raise ValueError(f"clip_high={clip_high!r} is not accepted: expected clip_high >= 0")


def masked_sequence_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-row mean of values [N, S] over mask [N, S] -> [N]; 0 for rows with an empty mask."""
  mask = mask.astype(jnp.float32)
  total = jnp.sum(values * mask, axis=-1)  # [N]
  return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of values over all entries where mask = 1 (0 when the mask is empty)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def group_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-6) -> jax.Array:
  """GRPO/GSPO advantages (r - mean_g) / (std_g + eps) within each group of G rows: [N] -> [N].

  std_g is the population standard deviation (ddof=0) of the group's rewards; a group
  whose rewards are all equal gets advantage 0 for every row.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  _check_group_size(rewards.shape[0], group_size)
  r = rewards.reshape(-1, group_size)  # [P, G]
  mean = jnp.mean(r, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(r - mean), axis=-1, keepdims=True))
  return ((r - mean) / (std + eps)).reshape(-1)


def sequence_log_ratio(logp_new: jax.Array, logp_old: jax.Array, mask: jax.Array) -> jax.Array:
  """GSPO log s_i = mean over masked tokens of (logp_new - logp_old): [N, S] -> [N].

  s_i = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|) (arXiv 2507.18071, eq. 7), |y_i| being
  the number of tokens in the mask; a row with an empty mask gets log s = 0 (s = 1).
  """
  return masked_sequence_mean(logp_new - _sg(logp_old), _sg(mask))


def _clipped_surrogate(ratio, adv, clip_low, clip_high):
  """PPO surrogate min(ratio A, clip(ratio, 1 - cl, 1 + ch) A) and the outside-range flag."""
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  surrogate = jnp.minimum(ratio * adv, clipped * adv)
  outside = jnp.logical_or(ratio < 1.0 - clip_low, ratio > 1.0 + clip_high)
  return surrogate, outside.astype(jnp.float32)


def gspo_loss(logp_new: jax.Array, logp_old: jax.Array, mask: jax.Array, advantages: jax.Array,
              *, clip_low: float, clip_high: float, weights: jax.Array | None = None,
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GSPO loss -mean_i w_i min(s_i A_i, clip(s_i, 1-cl, 1+ch) A_i) over sequences with tokens.

  Args:
    logp_new: [N, S] log pi_theta(targets) of the current parameters (the only input the
      gradient flows through).
    logp_old: [N, S] log pi_old(targets) (the policy that generated the rollouts).
    mask: [N, S] float, 1 on response tokens that count. Pass response_mask * misc_mask(...)
      to apply MISC: masked tokens leave the length-normalised mean of log s_i altogether.
    advantages: [N] (group_advantages), constants.
    clip_low, clip_high: the sequence ratio is clipped to [1 - clip_low, 1 + clip_high].
    weights: [N] per-sequence weights (WPSM), constants; None = 1.

  Returns:
    (loss, metrics); the mean is over sequences whose mask is non-empty (a sequence whose
    every token is masked contributes nothing). metrics: clip_fraction (share of those
    sequences with s outside the clip range), ratio_mean, ratio_min, ratio_max (of s).
  """
  _check_clip(clip_low, clip_high)
  mask = _sg(mask).astype(jnp.float32)
  adv = _sg(jnp.asarray(advantages, jnp.float32))
  w = jnp.ones_like(adv) if weights is None else _sg(jnp.asarray(weights, jnp.float32))
  ratio = jnp.exp(sequence_log_ratio(logp_new, logp_old, mask))  # [N]
  surrogate, outside = _clipped_surrogate(ratio, adv, clip_low, clip_high)  # [N]
  valid = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)  # [N]
  count = jnp.maximum(jnp.sum(valid), 1.0)
  loss = -jnp.sum(w * surrogate * valid) / count
  ratio_sg = _sg(ratio)
  metrics = {
      "clip_fraction": jnp.sum(outside * valid) / count,
      "ratio_mean": jnp.sum(ratio_sg * valid) / count,
      "ratio_min": jnp.min(jnp.where(valid > 0, ratio_sg, jnp.inf)),
      "ratio_max": jnp.max(jnp.where(valid > 0, ratio_sg, -jnp.inf)),
  }
  return loss, metrics


def token_clip_loss(logp_new: jax.Array, logp_old: jax.Array, mask: jax.Array,
                    advantages: jax.Array, *, clip_low: float, clip_high: float,
                    weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO/GRPO token-level clip baseline: -mean_i w_i mean_t min(r_it A_i, clip(r_it) A_i).

  r_it = exp(logp_new - logp_old) per token, clipped to [1 - clip_low, 1 + clip_high]; the
  inner mean is over the sequence's masked tokens, the outer one over sequences with a
  non-empty mask (GRPO's 1/G sum_i 1/|o_i| sum_t, arXiv 2402.03300 eq. 3, without the KL
  term). Same inputs as gspo_loss; metrics: clip_fraction (share of masked tokens with r
  outside the range), ratio_mean (over masked tokens).
  """
  _check_clip(clip_low, clip_high)
  mask = _sg(mask).astype(jnp.float32)
  adv = _sg(jnp.asarray(advantages, jnp.float32))
  w = jnp.ones_like(adv) if weights is None else _sg(jnp.asarray(weights, jnp.float32))
  ratio = jnp.exp(logp_new - _sg(logp_old))  # [N, S]
  surrogate, outside = _clipped_surrogate(ratio, adv[:, None], clip_low, clip_high)  # [N, S]
  per_seq = masked_sequence_mean(surrogate, mask)  # [N]
  valid = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
  loss = -jnp.sum(w * per_seq * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  metrics = {
      "clip_fraction": _masked_mean(outside, mask),
      "ratio_mean": _masked_mean(_sg(ratio), mask),
  }
  return loss, metrics


def misc_mask(logp_train: jax.Array, logp_infer: jax.Array, mask: jax.Array, *, alpha: float,
              beta: float) -> jax.Array:
  """MISC token mask [N, S] float: mask * [alpha <= exp(logp_train - logp_infer) <= beta].

  pi_train / pi_infer compares the training engine's probability of a rollout token with
  the rollout (inference) engine's; tokens where the two engines disagree beyond the
  two-sided band are dropped (ERNIE 5.0's token-granularity IS clipping). The caller reports
  the dropped share with `masked_fraction(mask, keep)`.
  """
  numeric = isinstance(alpha, (int, float)) and isinstance(beta, (int, float))
  if numeric and not 0 <= alpha <= beta:
    raise ValueError(f"alpha={alpha!r}, beta={beta!r} are not accepted: "
                     "expected 0 <= alpha <= beta")
  ratio = jnp.exp(_sg(logp_train) - _sg(logp_infer))  # [N, S]
  inside = jnp.logical_and(ratio >= alpha, ratio <= beta)
  return _sg(mask).astype(jnp.float32) * inside.astype(jnp.float32)


def masked_fraction(mask: jax.Array, keep: jax.Array) -> jax.Array:
  """Share of the tokens in mask [N, S] that keep [N, S] removes (0 for an empty mask)."""
  total = jnp.sum(mask.astype(jnp.float32))
  return (total - jnp.sum(keep.astype(jnp.float32))) / jnp.maximum(total, 1.0)


def wpsm_weights(rewards: jax.Array, group_size: int, entropy: jax.Array, *,
                 solved_threshold: float, entropy_threshold: float, down_weight: float,
                 success: float = 1.0) -> jax.Array:
  """WPSM per-rollout weights [N]: (1 - a) on positive rollouts of well-learned groups, else 1.

  Exact rule, for each group g (rows g*G .. g*G + G - 1):
    pass_rate_g = mean_i [reward_i >= success]
    entropy_g   = mean_i entropy_i          (entropy [N]: each rollout's mean token entropy)
    well_learned_g = pass_rate_g > solved_threshold (tau) and entropy_g < entropy_threshold (eta)
    positive_i  = reward_i > mean_g(reward)  (the rollout's group advantage is positive)
    weight_i    = 1 - down_weight (a) if well_learned_g and positive_i else 1.
  A group whose rollouts all succeed has no positive rollout (its advantages are 0 anyway).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  _check_group_size(rewards.shape[0], group_size)
  r = rewards.reshape(-1, group_size)  # [P, G]
  h = _sg(jnp.asarray(entropy, jnp.float32)).reshape(-1, group_size)  # [P, G]
  pass_rate = jnp.mean((r >= success).astype(jnp.float32), axis=-1, keepdims=True)  # [P, 1]
  well_learned = jnp.logical_and(pass_rate > solved_threshold,
                                 jnp.mean(h, axis=-1, keepdims=True) < entropy_threshold)
  positive = r > jnp.mean(r, axis=-1, keepdims=True)  # [P, G]
  down = jnp.logical_and(well_learned, positive)
  return jnp.where(down, 1.0 - down_weight, 1.0).reshape(-1)


def pass_rates(rewards: jax.Array, group_size: int, *, success: float = 1.0) -> jax.Array:
  """Per-group share of rollouts with reward >= success: [N] -> [P]."""
  rewards = jnp.asarray(rewards, jnp.float32)
  _check_group_size(rewards.shape[0], group_size)
  return jnp.mean((rewards.reshape(-1, group_size) >= success).astype(jnp.float32), axis=-1)


def hint_fraction(step, pass_rate, *, p0: float, gamma: float) -> jax.Array:
  """Adaptive hint share clip(p0 * exp(-gamma * step * pass_rate), 0, 1); pass_rate may be [P]."""
  step = jnp.asarray(step, jnp.float32)
  pass_rate = jnp.asarray(pass_rate, jnp.float32)
  return jnp.clip(p0 * jnp.exp(-gamma * step * pass_rate), 0.0, 1.0)


def mismatch_kl(logp_train: jax.Array, logp_infer: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over masked tokens of the k3 estimate of KL(pi_infer || pi_train), a scalar >= 0.

  Tokens were sampled from pi_infer (the rollout engine), so with r = pi_train / pi_infer =
  exp(logp_train - logp_infer) on each rollout token, k3 = r - 1 - log r is an unbiased,
  non-negative per-token estimate of KL(pi_infer || pi_train) (Schulman 2020); 0 iff the
  two engines agree on the token. No gradient flows (a diagnostic).
  """
  log_r = _sg(logp_train) - _sg(logp_infer)  # [N, S]
  return _masked_mean(jnp.expm1(log_r) - log_r, _sg(mask))


def mismatch_metrics(logp_train: jax.Array, logp_infer: jax.Array, mask: jax.Array
                     ) -> dict[str, jax.Array]:
  """Training-inference mismatch metrics over masked tokens: kl_k3, kl_k1, abs_log_ratio.

  kl_k3 = mismatch_kl; kl_k1 = mean(logp_infer - logp_train) (the plain, unbiased but
  noisy and possibly negative estimate); abs_log_ratio = mean |logp_train - logp_infer|.
  """
  log_r = _sg(logp_train) - _sg(logp_infer)
  mask = _sg(mask)
  return {
      "kl_k3": _masked_mean(jnp.expm1(log_r) - log_r, mask),
      "kl_k1": _masked_mean(-log_r, mask),
      "abs_log_ratio": _masked_mean(jnp.abs(log_r), mask),
  }


def token_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) per position, [N, S, V] -> [N, S] float32 (nats)."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.einsum("nsv,nsv->ns", jnp.exp(logp), logp)
