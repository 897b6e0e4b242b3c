"""Mutation check: do the default tests catch a wrong formula in the code that matters most?

    python tests/mutation_check.py                 # every mutation (about half an hour on 2 cores)
    python tests/mutation_check.py --only ppo-kl-sign gae-lambda   # some of them
    python tests/mutation_check.py --list          # names, files and the tests meant to catch each

Each mutation is one realistic slip (a sign, an off-by-one, a swapped argument, a mean of means) written as
text: an exact snippet of a source file and its replacement. It is applied to a temporary copy of the tree,
and the tests meant to catch it run there with the default markers (slow tests stay out: the point is that
the default run catches it). A row per mutation says which test failed -- or that the mutation survived, or
that its snippet no longer matches the code (reported, never skipped: a pattern that went stale after a code
move is a test gap until it is rewritten). The last line is `mutations: N, caught: C`.

A mutation whose tests fail to import or collect counts as broken, not caught: a mutant must be valid code
that computes the wrong thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROPE = "tests/test_rope_scaling.py::"
AGG = "tests/test_aggregates.py::"
G3 = "tests/test_convert.py::"
ENGINE = "tests/test_engine.py::"
BEAM = "tests/test_beam_curate.py::test_beam_runner_keeps_exactly_what_the_local_runner_keeps"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: list[str]  # pytest node ids (files or tests) expected to catch it


MUTATIONS = [
    # ---- long-context selection and code data (maxlm/curation/long.py, code.py) ----
    Mutation("language-votes-by-characters", "maxlm/curation/language.py",
             'size = len(segment.encode("utf-8"))', "size = len(segment)",
             ["tests/test_language.py::test_paragraph_votes_on_mixed_documents"]),
    Mutation("mattr-divides-by-the-window-count-only", "maxlm/curation/long.py",
             "return total / ((len(units) - window + 1) * window)", "return total / (len(units) * window)",
             ["tests/test_long_data.py::test_mattr_against_a_brute_force_loop"]),
    Mutation("code-order-importers-first", "maxlm/curation/code.py",
             "    return order + sorted(p for p in files if p not in deps)",
             "    return order[::-1] + sorted(p for p in files if p not in deps)",
             ["tests/test_code_data.py::test_dependencies_and_order_worked_out_by_hand"]),
    Mutation("code-relative-import-one-level-too-high", "maxlm/curation/code.py",
             "up = len(package) - (node.level - 1)", "up = len(package) - node.level",
             ["tests/test_code_data.py::test_module_names_and_imports"]),
    # ---- the Beam runner (maxlm/curation/beam_runner.py): each global step against the local runner ----
    Mutation("beam-exact-keeps-the-last-copy", "maxlm/curation/beam_runner.py",
             "    first, *rest = sorted(group[1])", "    *rest, first = sorted(group[1])", [BEAM]),
    Mutation("beam-bucket-pairs-first-only", "maxlm/curation/beam_runner.py",
             "        if i > 1:\n            yield members[i - 1], members[i]", "        if i > 1:\n            pass",
             [BEAM]),
    Mutation("beam-components-root-and-member-swapped", "maxlm/curation/beam_runner.py",
             "zip(nodes[label[moved]].tolist(), nodes[moved].tolist())",
             "zip(nodes[moved].tolist(), nodes[label[moved]].tolist())",
             ["tests/test_beam_curate.py::test_components_inside_the_pipeline_and_the_fallback"]),  # the fallback
    Mutation("beam-paragraph-owner-is-the-last", "maxlm/curation/beam_runner.py",
             "owner = min(docs)", "owner = max(docs)", [BEAM]),
    Mutation("beam-components-converged-regardless", "maxlm/curation/beam_runner.py",
             "    if changed == 0 and label != node:", "    if label != node:",
             ["tests/test_beam_curate.py::test_components_inside_the_pipeline_and_the_fallback"]),
    Mutation("quality-wide-punctuation-counted-as-words", "maxlm/curation/quality.py",
             " and not _WIDE_PUNCTUATION.match(u)]", "]",
             ["tests/test_quality.py::test_chinese_punctuation_is_not_a_word"]),
    # ---- sweeps and tracking (maxlm/launch/, maxlm/training/tracking.py) ----
    Mutation("sweep-product-outer-loop-swapped", "maxlm/launch/sweep.py",
             "out = [{**a, **b} for a in out for b in _as_trials(part)]",
             "out = [{**a, **b} for b in _as_trials(part) for a in out]",
             ["tests/test_sweep.py::test_helpers_against_itertools"]),
    Mutation("sweep-trial-finished-once-it-logged-a-step", "maxlm/launch/sweep.py",
             'if not run_status(workdir, trial).get("complete"):', 'if not run_status(workdir, trial).get("step"):',
             ["tests/test_sweep.py::test_two_by_two_sweep_two_at_a_time_rerun_resume_and_slurm"]),
    Mutation("wandb-step-off-by-one", "maxlm/training/tracking.py",
             "self.run.log(dict(metrics), step=int(step))", "self.run.log(dict(metrics), step=int(step) + 1)",
             ["tests/test_tracking.py::test_profile_trace_and_offline_wandb_run"]),
    # ---- quantisation and QLoRA (maxlm/model/quant.py, lora.py) ----
    Mutation("quant-int8-one-scale-per-tensor", "maxlm/model/quant.py",
             "        return channels, {}", "        return (), {}",
             ["tests/test_quant.py::test_quantize_matches_numpy"]),
    Mutation("quant-int4-groups-along-the-first-input-dim", "maxlm/model/quant.py",
             "    axis = contracting[-1]  # groups", "    axis = contracting[0]  # groups",
             ["tests/test_quant.py::test_quantize_matches_numpy"]),
    Mutation("quant-int4-counted-a-byte", "maxlm/model/quant.py",
             "bits = 4 if jnp.dtype(x.dtype)", "bits = 8 if jnp.dtype(x.dtype)",
             ["tests/test_quant.py::test_logits_and_bytes"]),
    Mutation("qlora-without-the-lora-scale", "maxlm/model/lora.py",
             'a, b = ad["a"], ad["b"] * jnp.asarray(s, ad["b"].dtype)', 'a, b = ad["a"], ad["b"]',
             ["tests/test_quant.py::test_qlora_merge_is_lora_on_the_dequantised_base"]),
    # ---- DPO and critic-free RL (maxlm/posttrain/dpo.py, critic_free.py, grpo.py) ----
    Mutation("ipo-not-length-averaged", "maxlm/posttrain/dpo.py",
             "h = (x.chosen - x.ref_chosen) / x.chosen_len - (x.rejected - x.ref_rejected) / x.rejected_len",
             "h = (x.chosen - x.ref_chosen) - (x.rejected - x.ref_rejected)",
             ["tests/test_dpo.py::test_each_loss_matches_its_formula"]),
    Mutation("dpo-empty-pair-slots-counted", "maxlm/posttrain/dpo.py",
             "real = counts[:, 0::2] > 0", "real = counts[:, 0::2] >= 0",
             ["tests/test_dpo.py::test_packed_step_matches_unpadded_conversations_and_the_cache"]),
    Mutation("grpo-clip-bounds-swapped", "maxlm/posttrain/grpo.py",
             'batch["advantages"], g.clip_low,\n                                         g.clip_high)',
             'batch["advantages"], g.clip_high,\n                                         g.clip_low)',
             ["tests/test_grpo.py::test_loss_matches_numpy_on_ragged_replies"]),
    Mutation("rloo-without-leave-one-out-scale", "maxlm/posttrain/critic_free.py",
             "return (centered * (group_size / (group_size - 1))).reshape(-1)", "return centered.reshape(-1)",
             ["tests/test_critic_free.py"]),
    Mutation("seq-mean-counts-empty-rows", "maxlm/posttrain/critic_free.py",
             "return jnp.sum(row_means), jnp.sum(nonempty).astype(jnp.float32)",
             "return jnp.sum(row_means), jnp.float32(nonempty.shape[0])",
             ["tests/test_critic_free.py", "tests/test_grpo.py::test_loss_matches_numpy_on_ragged_replies"]),
    # ---- RLHF / PPO (maxlm/posttrain/rl.py, maxlm/posttrain/ppo.py) ----
    Mutation("ppo-kl-sign", "maxlm/posttrain/ppo.py",
             'rl.kl_penalized_rewards(scores, stats["logprobs"], stats["ref_logprobs"], mask, kl_coef)',
             'rl.kl_penalized_rewards(scores, stats["ref_logprobs"], stats["logprobs"], mask, kl_coef)',
             ["tests/test_ppo.py::test_advantages_penalise_the_policys_excess_log_probability"]),
    Mutation("score-not-at-last-token", "maxlm/posttrain/rl.py",
             "last = jnp.arange(m.shape[-1])[None, :] == (length - 1)[:, None]",
             "last = jnp.arange(m.shape[-1])[None, :] == length[:, None]",
             ["tests/test_rl.py", "tests/test_ppo.py::test_advantages_penalise_the_policys_excess_log_probability"]),
    Mutation("gae-lambda-dropped", "maxlm/posttrain/rl.py",
             "gamma * lam * next_m * next_a", "gamma * next_m * next_a",
             ["tests/test_rl.py"]),
    Mutation("gae-undiscounted-bootstrap", "maxlm/posttrain/rl.py",
             "a_t = r_t + gamma * next_v * next_m - v_t", "a_t = r_t + next_v * next_m - v_t",
             ["tests/test_rl.py"]),
    Mutation("returns-from-whitened-advantages", "maxlm/posttrain/ppo.py",
             "advantages = rl.whiten(advantages, mask)",
             'advantages = rl.whiten(advantages, mask); '
             'returns = jnp.where(mask > 0, advantages + stats["values"], 0.0)',
             ["tests/test_ppo.py::test_advantages_penalise_the_policys_excess_log_probability"]),
    Mutation("whiten-biased-variance", "maxlm/posttrain/rl.py",
             "* jax.lax.rsqrt(masked_var(x, mask, unbiased=True) + eps)",
             "* jax.lax.rsqrt(masked_var(x, mask, unbiased=False) + eps)",
             ["tests/test_rl.py"]),
    Mutation("ppo-ratio-inverted", "maxlm/posttrain/rl.py",
             "ratio = jnp.exp(_f32(logprobs) - _f32(old_logprobs))",
             "ratio = jnp.exp(_f32(old_logprobs) - _f32(logprobs))",
             ["tests/test_rl.py", "tests/test_ppo.py::test_layout_and_loss_match_unpadded_numpy"]),
    Mutation("ppo-clip-min-not-max", "maxlm/posttrain/rl.py",
             "return jnp.maximum(unclipped, clipped_term), (clipped_term > unclipped)",
             "return jnp.minimum(unclipped, clipped_term), (clipped_term > unclipped)",
             ["tests/test_rl.py", "tests/test_ppo.py::test_layout_and_loss_match_unpadded_numpy"]),
    Mutation("value-clip-around-returns", "maxlm/posttrain/rl.py",
             "v_clip = old_values + jnp.clip(values - old_values, -clip_range, clip_range)",
             "v_clip = returns + jnp.clip(values - returns, -clip_range, clip_range)",
             ["tests/test_rl.py", "tests/test_ppo.py::test_layout_and_loss_match_unpadded_numpy"]),
    Mutation("entropy-bonus-sign", "maxlm/posttrain/ppo.py",
             "loss = total(pg + p.vf_coef * vf - p.entropy_coef * entropy)",
             "loss = total(pg + p.vf_coef * vf + p.entropy_coef * entropy)",
             ["tests/test_ppo.py::test_layout_and_loss_match_unpadded_numpy"]),
    Mutation("kl-controller-sign", "maxlm/posttrain/rl.py",
             "err = min(max(kl / target - 1.0, -0.2), 0.2)", "err = min(max(1.0 - kl / target, -0.2), 0.2)",
             ["tests/test_rl.py", "tests/test_ppo.py::test_layout_and_loss_match_unpadded_numpy"]),
    # ---- language-model loss and training loop (maxlm/training/pretrain.py) ----
    Mutation("loss-mean-of-micro-batch-means", "maxlm/training/trainer.py",
             "grads = jax.tree.map(lambda g: g / denom, grads)",
             "grads = jax.tree.map(lambda g: g / denom * accum, grads)",
             ["tests/test_train.py::test_gradient_accumulation_matches_one_big_batch"]),
    Mutation("loss-weights-ignored", "maxlm/training/pretrain.py",
             "return jnp.sum(ce * weights), jnp.sum(weights)", "return jnp.sum(ce), jnp.sum(weights)",
             ["tests/test_train.py::test_loss_fn_is_the_weighted_sum_of_token_cross_entropies"]),
    Mutation("eval-loss-mean-of-batch-means", "maxlm/training/trainer.py",
             'return {"loss": loss_sum / denom, **{k: v / denom for k, v in sums.items()}}',
             'return {"loss": float(np.mean([float(s) / max(float(o["weight"]), 1.0) for s, o in outs])), '
             '**{k: v / denom for k, v in sums.items()}}',
             [AGG + "test_eval_loss_is_total_loss_over_total_tokens_on_ragged_batches"]),
    Mutation("lm-loss-weight-counts-padding", "maxlm/training/pretrain.py",
             "return jnp.sum(ce * weights), jnp.sum(weights)",
             "return jnp.sum(ce * weights), jnp.sum(jnp.ones_like(weights))",
             [AGG + "test_eval_loss_is_total_loss_over_total_tokens_on_ragged_batches"]),
    # ---- attention (kernels/reference.py, kernels/flash_*.py) ----
    Mutation("attention-key-padding-dropped", "kernels/reference.py",
             "mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)",
             "mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])",
             ["tests/test_model.py::test_attention_mask_hand_built"]),
    Mutation("attention-segments-ignored", "kernels/reference.py",
             "(q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])", "(q_segment_ids[:, :, None] != 0)",
             ["tests/test_model.py::test_attention_mask_hand_built"]),
    Mutation("attention-causal-strict", "kernels/reference.py",
             "(kv_slot <= q_slot)", "(kv_slot < q_slot)",
             ["tests/test_model.py::test_attention_mask_hand_built"]),
    Mutation("gqa-mapping-reference", "kernels/reference.py",
             "qg = q.reshape(b, t, kv_heads, g, h)", "qg = q.reshape(b, t, g, kv_heads, h).swapaxes(2, 3)",
             ["tests/test_model.py", "tests/test_convert.py"]),
    Mutation("gqa-mapping-gpu-kernel", "kernels/flash_gpu.py",
             "(bi, 0, blocks.div(ni, g), 0))]", "(bi, 0, ni % kv_heads, 0))]",
             ["tests/test_flash_attention.py"]),
    Mutation("gqa-mapping-tpu-kernel", "kernels/flash_tpu.py",
             "q_tile, kv_tile, kv_tile]\n    args = [_heads_major(q)",
             "q_tile, kv_tile, pl.BlockSpec((None, None, block_k, h), lambda bi, ni, i, j, off: (bi, ni % kv_heads, "
             "kvi(i, j, off), 0))]\n    args = [_heads_major(q)",
             ["tests/test_flash_attention.py"]),
    # ---- packing, masks and exact resume ----
    Mutation("sft-answer-mask-shifted", "maxlm/data/sft.py",
             'out["loss_weights"][row, span] = weights[1:]', 'out["loss_weights"][row, span] = weights[:-1]',
             ["tests/test_chat.py::test_answer_mask_against_hand_laid_out_targets"]),
    Mutation("packing-positions-not-reset", "maxlm/data/packing.py",
             "positions[filled:filled + take] = np.arange(take)",
             "positions[filled:filled + take] = np.arange(filled, filled + take)",
             ["tests/test_data.py::test_packing_matches_reference"]),
    Mutation("data-position-saved-after-next-fetch", "maxlm/training/trainer.py",
             'ckpt.save(step, state["params"], state["opt_state"], feed.get_state())',
             'ckpt.save(step, state["params"], state["opt_state"], (feed.next(state), feed.get_state())[1])',
             ["tests/test_train.py::test_resume_is_exact_and_outputs_written"]),
    Mutation("ppo-resume-restarts-iterations", "maxlm/posttrain/ppo.py",
             'self.iteration, self.kl_coef = int(state["iteration"]), float(state["kl_coef"])',
             'self.iteration, self.kl_coef = 0, float(state["kl_coef"])',
             ["tests/test_ppo_workdir.py::test_sigterm_part_way_then_rerun_logs_the_uninterrupted_iterations"]),
    Mutation("restore-oldest-checkpoint", "maxlm/training/checkpoint.py",
             "sorted(self.manager.all_steps(), reverse=True)", "sorted(self.manager.all_steps())",
             ["tests/test_train.py::test_resume_is_exact_and_outputs_written"]),
    Mutation("restore-fresh-optimizer-state", "maxlm/training/trainer.py",
             'state = {"step": step, "params": params, "opt_state": opt_state}',
             'state = {"step": step, "params": params, "opt_state": trainer.optimizer.init(params)}',
             ["tests/test_train.py::test_resume_is_exact_and_outputs_written"]),
    # ---- RoPE scaling (maxlm/model/attention.py) ----
    Mutation("yarn-low-ceil", "maxlm/model/attention.py",
             "low = max(math.floor(correction_dim(beta_fast)), 0)",
             "low = max(math.ceil(correction_dim(beta_fast)), 0)",
             [ROPE + "test_yarn_frequencies_and_scale_match_transformers[128]"]),
    Mutation("yarn-high-floor", "maxlm/model/attention.py",
             "high = min(math.ceil(correction_dim(beta_slow)), h - 1)",
             "high = min(math.floor(correction_dim(beta_slow)), h - 1)",
             [ROPE + "test_yarn_frequencies_and_scale_match_transformers[128]"]),
    Mutation("yarn-ramp-flipped", "maxlm/model/attention.py",
             "extrapolate = 1.0 - ramp", "extrapolate = ramp",
             [ROPE + "test_yarn_frequencies_and_scale_match_transformers[128]"]),
    Mutation("yarn-attention-scale", "maxlm/model/attention.py",
             "0.1 * math.log(factor) + 1.0", "0.2 * math.log(factor) + 1.0",
             [ROPE + "test_yarn_frequencies_and_scale_match_transformers[128]"]),
    Mutation("dynamic-ntk-factor-not-shifted", "maxlm/model/attention.py",
             " - (factor - 1), 1.0)", ", 1.0)",
             [ROPE + "test_dynamic_ntk_frequencies_match_transformers[128]"]),
    Mutation("ntk-base-exponent", "maxlm/model/attention.py",
             "theta = theta * factor ** (h / (h - 2))", "theta = theta * factor ** (h / (h - 1))",
             [ROPE + "test_static_ntk_is_transformers_dynamic_ntk_at_its_full_factor[128]"]),
    Mutation("linear-rope-multiplies-positions", "maxlm/model/attention.py",
             "return pos / factor", "return pos * factor",
             [ROPE + "test_rope_rotation_matches_transformers"]),
    Mutation("rope-rotation-sign", "maxlm/model/attention.py",
             "x2 * cos + x1 * sin", "x2 * cos - x1 * sin",
             [ROPE + "test_rope_rotation_matches_transformers"]),
    # ---- curation (maxlm/curation/dedup.py) ----
    Mutation("lsh-verification-always-true", "maxlm/curation/dedup.py",
             "pairs[estimated_jaccard(signatures, pairs) >= threshold]",
             "pairs[estimated_jaccard(signatures, pairs) >= 0.0]",
             ["tests/test_dedup.py::test_band_collision_alone_does_not_merge",
              "tests/test_dedup.py::test_planted_clusters_match_a_brute_force_oracle"]),
    Mutation("lsh-verification-strict", "maxlm/curation/dedup.py",
             "estimated_jaccard(signatures, pairs) >= threshold]", "estimated_jaccard(signatures, pairs) > threshold]",
             ["tests/test_dedup.py::test_band_collision_alone_does_not_merge"]),
    Mutation("lsh-band-reshape-order", "maxlm/curation/dedup.py",
             ".reshape(-1, bands, rows)", ".reshape(-1, rows, bands).transpose(0, 2, 1)",
             ["tests/test_dedup.py::test_band_keys_are_equal_exactly_when_band_values_are"]),
    Mutation("lsh-last-band-unused", "maxlm/curation/dedup.py",
             "for b in range(params.bands)]", "for b in range(params.bands - 1)]",
             ["tests/test_dedup.py::test_planted_clusters_match_a_brute_force_oracle"]),
    Mutation("lsh-candidate-probability-exponents", "maxlm/curation/dedup.py",
             "** rows) ** bands", "** bands) ** rows",
             ["tests/test_dedup.py::test_candidate_probability_matches_enumeration"]),
    Mutation("minhash-jaccard-same-side", "maxlm/curation/dedup.py",
             "== np.asarray(signatures[p[:, 1]])", "== np.asarray(signatures[p[:, 0]])",
             ["tests/test_dedup.py::test_estimated_jaccard_is_the_fraction_of_equal_entries"]),
    # ---- online RLHF's judge (maxlm/posttrain/online.py) ----
    Mutation("online-gap-counts-right-ranked-replies", "maxlm/posttrain/online.py",
             "elif margin_of.get((item.prompt, reply), 1.0) <= 0:", "elif margin_of.get((item.prompt, reply), 1.0) > 0:",
             ["tests/test_online.py::test_judge_measures_match_a_count_by_hand"]),
    Mutation("online-repeats-the-right-ranked-pairs", "maxlm/posttrain/online.py",
             'copies = o.hack_repeat if record["margin"] <= 0 else 1',
             'copies = o.hack_repeat if record["margin"] > 0 else 1',
             ["tests/test_online.py::test_judge_cli_writes_each_hack_repeat_times"]),
    Mutation("online-rounds-overlap", "maxlm/posttrain/online.py",
             "start = o.item_offset + (o.round - 1) * o.train_items", "start = o.item_offset + o.round - 1",
             ["tests/test_online.py::test_rounds_draw_fresh_train_prompts"]),
    # ---- pipeline and ring parallelism ----
    Mutation("pipeline-stage0-reads-the-next-micro-batch", "maxlm/model/pipeline.py",
             "first = jnp.where(t < m, xs[t % m], out[t % m])", "first = jnp.where(t < m, xs[(t + 1) % m], out[t % m])",
             ["tests/test_pipeline.py::test_pipelined_forward_and_gradient_equal_the_layer_scan"]),
    Mutation("pipeline-bubble-stats-counted", "maxlm/model/pipeline.py",
             "keep = lambda a: jnp.where(valid.reshape(p, *(1,) * (a.ndim - 1)), a, 0)", "keep = lambda a: a",
             ["tests/test_pipeline.py::test_pipelined_forward_and_gradient_equal_the_layer_scan"]),
    Mutation("ring-causal-mask-excludes-the-diagonal", "maxlm/model/ring_attention.py",
             "mask = mask & (kv_slot <= q_slot)[None]", "mask = mask & (kv_slot < q_slot)[None]",
             ["tests/test_ring.py::test_ring_equals_the_reference_with_gradients"]),
    Mutation("ring-skips-diagonal-tiles", "maxlm/model/ring_attention.py",
             "return q_chunk >= kv_chunk if causal else True", "return q_chunk > kv_chunk if causal else True",
             ["tests/test_ring.py::test_ring_equals_the_reference_with_gradients",
              "tests/test_ring.py::test_tiles_per_device_match_the_full_causal_mask"]),
    Mutation("ring-backward-without-delta", "maxlm/model/ring_attention.py",
             "ds = p * (dp - delta[a][..., None]) * scale", "ds = p * dp * scale",
             ["tests/test_ring.py::test_ring_equals_the_reference_with_gradients"]),
    Mutation("zigzag-mirror-off-by-one", "maxlm/model/ring_attention.py",
             "return device, 2 * devices - 1 - device", "return device, 2 * devices - 2 - device",
             ["tests/test_ring.py::test_zigzag_permutation_gives_device_i_chunks_i_and_mirror"]),
    # ---- reward model and evaluation ----
    Mutation("rm-accuracy-counts-ties", "maxlm/posttrain/reward.py",
             '"accuracy": jnp.sum((margin > 0) * weight)', '"accuracy": jnp.sum((margin >= 0) * weight)',
             ["tests/test_reward.py::test_pair_loss_matches_numpy_on_unpadded_sequences"]),
    Mutation("acc-norm-from-correct", "maxlm/evaluation/multiple_choice.py",
             '"acc_norm": sum(r["correct_norm"] for r in items)', '"acc_norm": sum(r["correct"] for r in items)',
             ["tests/test_multiple_choice.py::test_predictions_match_transformers_item_for_item[text]"]),
    Mutation("acc-norm-by-bytes", "maxlm/evaluation/multiple_choice.py",
             "norm = [v / max(len(t), 1)", 'norm = [v / max(len(t.encode("utf-8")), 1)',
             ["tests/test_multiple_choice.py::test_predictions_match_transformers_item_for_item[text]"]),
    Mutation("ppl-mean-of-per-text", "maxlm/model/scoring.py",
             '"ppl": float(np.exp(nll / max(tokens, 1)))',
             '"ppl": float(np.mean([np.exp(r["nll"] / max(r["tokens"], 1)) for r in rows]))',
             ["tests/test_loglikelihood.py::test_perplexity_and_bits_per_byte_match_transformers"]),
    Mutation("passkey-grid-mirrored", "maxlm/evaluation/passkey.py",
             "acc[i, j] = float(np.mean(hits))", "acc[i, len(depths) - 1 - j] = float(np.mean(hits))",
             ["tests/test_passkey.py::test_grid_cells_against_a_scripted_reader"]),
    Mutation("gen-empty-answers-match", "maxlm/evaluation/generation.py",
             '"correct": pred == gold if gold else None', '"correct": pred == gold',
             ["tests/test_generation_eval.py::test_exact_match_over_scripted_continuations"]),
    Mutation("mixture-weights-unnormalised", "maxlm/data/mixture.py",
             "self.weights = weights / weights.sum()", "self.weights = weights",
             ["tests/test_mixture.py::test_byte_shares_follow_the_weights"]),
    Mutation("resume-data-keys-free", "maxlm/training/workdir.py",
             'FREE_SECTIONS = ("optim", "mesh", "checkpoint")', 'FREE_SECTIONS = ("optim", "mesh", "checkpoint", "data")',
             ["tests/test_workdir.py::test_changed_keys_ignore_run_knobs_and_name_identity",
              "tests/test_workdir.py::test_a_rerun_with_another_model_refuses_and_loses_nothing"]),
    Mutation("stale-lock-pid-reuse-ignored", "maxlm/training/workdir.py",
             "return start is None or _process_start(int(holder[\"pid\"])) in (None, start)", "return True",
             ["tests/test_workdir.py::test_a_stale_lock_is_taken_over_with_a_warning"]),
    # Issue 21: imports check shapes, nothing is scored from nothing.
    Mutation("hf-import-shape-unchecked", "maxlm/interop/hf.py",
             "if tuple(x.shape) != expected:", "if x.size != math.prod(expected):",
             ["tests/test_bad_inputs.py::test_bad_input[evaluate:hf_transposed_tensor]"]),
    Mutation("ppl-of-nothing-is-one", "maxlm/evaluation/harness.py",
             "    if not texts:  # a perplexity of nothing is not 1", "    if False:",
             ["tests/test_bad_inputs.py::test_bad_input[evaluate:ppl_only_bad_lines]"]),
    Mutation("unscoreable-gen-row-scored-wrong", "maxlm/evaluation/generation.py",
             '"correct": pred == gold if gold else None})', '"correct": pred != "" and pred == gold})',
             ["tests/test_generation_eval.py::test_exact_match_over_scripted_continuations"]),
    # Issue 22: today's families.
    Mutation("window-skips-a-visible-key-tile", "kernels/blocks.py",
             "return div(jnp.maximum(first_row - window + 1, 0), block_k)",
             "return div(jnp.maximum(first_row - window + 2, 0), block_k)",
             ["tests/test_flash_attention.py::test_window_tile_skipping_is_exact",
              "tests/test_flash_attention.py::test_sliding_window"]),
    Mutation("llama3-rope-blend-reversed", "maxlm/model/attention.py",
             "return inv_freq / factor * (1.0 - smooth) + inv_freq * smooth, 1.0",
             "return inv_freq * (1.0 - smooth) + inv_freq / factor * smooth, 1.0",
             ["tests/test_rope_scaling.py::test_llama3_frequencies_match_transformers"]),
    Mutation("window-off-by-one-in-reference", "kernels/reference.py",
             "mask = mask & (q_slot - kv_slot < window)[None]", "mask = mask & (q_slot - kv_slot <= window)[None]",
             ["tests/test_convert.py::test_parity_and_round_trip"]),
    # Gemma 3 (text): each switch against transformers.
    Mutation("gemma-norm-without-one", "maxlm/model/decoder.py",
             "return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)",
             "return (x32 * scale.astype(jnp.float32)).astype(x.dtype)",
             [G3 + "test_parity_and_round_trip[gemma3]"]),
    Mutation("gemma-rope-bases-swapped", "maxlm/model/attention.py",
             "    if local and m.local_rope_theta:", "    if not local and m.local_rope_theta:",
             [G3 + "test_parity_and_round_trip[gemma3]"]),
    Mutation("gemma-global-layer-off-by-one", "maxlm/model/decoder.py",
             "not (every and (i + 1) % every == 0)", "not (every and i % every == 0)",
             [G3 + "test_parity_and_round_trip[gemma3]",
              "tests/test_sample.py::test_gemma3_decoding_matches_hugging_face"]),
    Mutation("local-cond-branches-swapped", "maxlm/model/attention.py",
             "return jax.lax.cond(local, lambda: run(window), lambda: run(0))",
             "return jax.lax.cond(local, lambda: run(0), lambda: run(window))",
             [G3 + "test_gemma3_local_and_global_layers_through_the_pallas_kernel"]),
    Mutation("gemma-attention-post-norm-dropped", "maxlm/model/decoder.py",
             'attn_out = _norm(cfg, "attn_post_norm")(attn_out)',
             'attn_out = attn_out + 0 * _norm(cfg, "attn_post_norm")(attn_out)',
             [G3 + "test_parity_and_round_trip[gemma3]"]),
    Mutation("gemma-embedding-scaled-by-head-dim", "maxlm/model/decoder.py",
             "x = x * jnp.asarray(cfg.d_model ** 0.5, dt)", "x = x * jnp.asarray(head_dim(cfg) ** 0.5, dt)",
             [G3 + "test_parity_and_round_trip[gemma3]"]),
    Mutation("gemma-query-scale-ignored", "maxlm/model/decoder.py",
             "scale=cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None,", "scale=None,",
             [G3 + "test_parity_and_round_trip[gemma3]"]),
    Mutation("gemma-exact-gelu", "maxlm/model/decoder.py",
             "functools.partial(jax.nn.gelu, approximate=True)", "functools.partial(jax.nn.gelu, approximate=False)",
             [G3 + "test_parity_and_round_trip[gemma3]"]),
    Mutation("gemma-local-layers-scaled", "maxlm/model/attention.py",
             'kwargs.update(theta=m.local_rope_theta, scaling="none")', "kwargs.update(theta=m.local_rope_theta)",
             [G3 + "test_parity_and_round_trip[gemma3]"]),
    Mutation("final-logit-softcap-dropped", "maxlm/model/decoder.py",
             "logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)", "logits = logits",
             [G3 + "test_parity_and_round_trip[gemma3_softcap]"]),
    Mutation("attention-softcap-dropped", "kernels/reference.py",
             "logits = softcap * jnp.tanh(logits / softcap)", "logits = logits",
             [G3 + "test_attention_softcap_matches_transformers_gemma2"]),
    # ---- a model's own chat template, exports, lazy import (issue 22) ----
    Mutation("chat-hf-span-starts-in-the-prompt", "maxlm/data/chat_hf.py",
             "start = len(prompt) if full.startswith(prompt)", "start = len(prompt) - 1 if full.startswith(prompt)",
             ["tests/test_chat_hf.py::test_ids_and_mask_equal_apply_chat_template"]),
    Mutation("chat-hf-end-marker-untrained", "maxlm/data/chat_hf.py",
             "out.append((start, end + len(self.stop)))", "out.append((start, end))",
             ["tests/test_chat_hf.py::test_ids_and_mask_equal_apply_chat_template"]),
    Mutation("to-jinja-separator-dropped", "maxlm/data/chat.py",
             "literal(template.end + template.separator)", "literal(template.end)",
             ["tests/test_chat.py::test_to_jinja_renders_what_maxlm_trains_on"]),
    Mutation("export-shard-over-its-limit", "maxlm/interop/hf.py",
             "if current and size + x.nbytes > max_shard_bytes:", "if current and size > max_shard_bytes:",
             [G3 + "test_sharded_bf16_export_loads_everywhere"]),
    Mutation("lazy-import-dtype-ignored", "maxlm/interop/hf.py",
             "out = np.empty(like.shape, dtype)", "out = np.empty(like.shape, np.float32)",
             [G3 + "test_lazy_import_onto_shardings"]),
    # ---- ahead-of-time compilation for TPU (maxlm/training/aot.py, kernels/flash_tpu.py) ----
    Mutation("all-reduce-ring-bytes-halved", "maxlm/training/aot.py",
             '(n - 1) / n * (2 if op == "all-reduce" else 1)', "(n - 1) / n",
             ["tests/test_aot.py::test_collectives_from_hlo"]),
    Mutation("layer-extrapolation-off-by-one", "maxlm/training/aot.py",
             "accum * (a + (layers - 1) * (b - a))", "accum * (a + layers * (b - a))",
             ["tests/test_tpu_compile.py::test_layer_extrapolation_matches_the_unrolled_program"]),
    Mutation("accumulation-not-counted", "maxlm/training/aot.py",
             "accum * (a + (layers - 1) * (b - a))", "(a + (layers - 1) * (b - a))",
             ["tests/test_tpu_compile.py::test_layer_extrapolation_matches_the_unrolled_program"]),
    Mutation("flash-cost-forward-undercounted", "kernels/flash_tpu.py",
             "h, 2, q, k, v, q)", "h, 1, q, k, v, q)",
             ["tests/test_tpu_compile.py::test_flash_forward_backward_compile"]),
    # ---- the generation engine and the server (maxlm/inference/) ----
    Mutation("engine-decode-position-off-by-one", "maxlm/inference/engine.py",
             "positions=index[:, None], segment_ids", "positions=index[:, None] + 1, segment_ids",
             [ENGINE + "test_greedy_with_refills_and_chunks_equals_the_static_sampler"]),
    Mutation("engine-logprobs-after-sampling-processors", "maxlm/inference/engine.py",
             "logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)",
             "logprobs = jax.nn.log_softmax(processed.astype(jnp.float32), axis=-1)",
             [ENGINE + "test_logprobs_are_the_full_forward_pass_log_softmax"]),
    Mutation("engine-stop-token-kept-in-reply", "maxlm/inference/engine.py",
             """            if token in stop_ids:
                reason, stop_reason = "stop", token
                break
            req.tokens.append(token)""",
             """            req.tokens.append(token)
            if token in stop_ids:
                reason, stop_reason = "stop", token
                break""",
             [ENGINE + "test_stop_ids_eos_and_stop_strings"]),
    Mutation("server-echo-logprobs-shifted", "maxlm/inference/server.py",
             "[None] + lps, [None] + (tops", "lps + [None], [None] + (tops",
             ["tests/test_serve.py::test_echoed_prompt_logprobs_are_the_scorers_as_lm_eval_reads_them"]),
]


def _apply(root: str, m: Mutation) -> str | None:
    """Write the mutant into the copy at `root`; returns the original text, or None when the snippet is not
    found exactly once (then nothing is written)."""
    path = os.path.join(root, m.path)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    if text.count(m.old) != 1:
        return None
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))
    return text


def _failed_tests(output: str) -> list[str]:
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)


def run_one(root: str, m: Mutation, timeout: int) -> tuple[str, str]:
    """(verdict, detail): verdict is caught / survived / broken / stale / timeout."""
    original = _apply(root, m)
    if original is None:
        return "stale", f"snippet not found exactly once in {m.path}"
    try:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", *m.tests]
        env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
        try:
            done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", f"tests ran past {timeout} s"
        out = done.stdout + done.stderr
        failed = _failed_tests(out)
        # an exception raised, not a word in a log line (Beam's workers log "... not raising an ImportError.")
        if done.returncode == 1 and failed and not re.search(r"\b(?:ImportError|SyntaxError): ", out):
            return "caught", failed[0]
        if done.returncode == 0:
            return "survived", "all tests passed"
        tail = out.strip().splitlines()[-1] if out.strip() else ""
        return "broken", f"pytest exit {done.returncode}: {tail[:160]}"
    finally:
        with open(os.path.join(root, m.path), "w") as f:
            f.write(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="names of the mutations to run")
    parser.add_argument("--list", action="store_true", help="list the mutations (and any stale snippet) and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutation")
    args = parser.parse_args()
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        raise SystemExit("mutation names must be unique")
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"unknown mutation(s): {', '.join(unknown)}")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        stale = 0
        for m in chosen:
            with open(os.path.join(ROOT, m.path)) as f:
                count = f.read().count(m.old)
            stale += count != 1
            note = "" if count == 1 else f"  STALE: snippet found {count} times"
            print(f"{m.name:36s} {m.path:28s} {' '.join(m.tests)}{note}")
        print(f"mutations: {len(chosen)}, stale: {stale}")
        return 1 if stale else 0
    work = tempfile.mkdtemp(prefix="maxlm_mutants_")
    root = os.path.join(work, "tree")
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info"))
    caught = 0
    try:
        print(f"{'mutation':36s} {'verdict':9s} {'seconds':>7s}  detail", flush=True)
        for m in chosen:
            t0 = time.perf_counter()
            verdict, detail = run_one(root, m, args.timeout)
            caught += verdict == "caught"
            print(f"{m.name:36s} {verdict:9s} {time.perf_counter() - t0:7.0f}  {detail}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"mutations: {len(chosen)}, caught: {caught}", flush=True)
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
