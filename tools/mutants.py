"""`make mutants`: apply small deliberate bugs one at a time to a scratch copy and run the tests that must
catch each. A surviving mutant means a test that cannot fail. Not part of `make test` (about 25 minutes).

    python tools/mutants.py [--only NAME ...] [--list] [--keep]

Each mutant replaces one exact snippet (it must occur exactly once, so a refactor that moves the code makes
the mutant stale and the run fails loudly rather than testing nothing) and names the pytest selection that
must go red. The copy is imported through PYTHONPATH ahead of the editable install, and its own rank
processes inherit that path.
"""

from __future__ import annotations

import argparse
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = "tests/parallel/sequence/"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTANTS = [
    # ------------------------------------------------------------------ the three the review found
    Mutant("sdpa-cpu-falls-back-always", "longctx/kernels/sdpa.py",
           "    if pieces(mask, sq, sk) is None and q.shape[0] * sq * sk > DENSE_MASK_LIMIT:",
           "    if True:",
           ("tests/kernels/test_sdpa.py", "tests/kernels/test_conformance.py::test_backward_with_global_out_lse"),
           "every CPU call served by reference: the kernel under test would be the oracle"),
    Mutant("ulysses-replicates-kv-needlessly", "longctx/parallel/sequence/ulysses.py",
           "    if kv_heads % world == 0:\n        return 1",
           "    if kv_heads % world == 0:\n        return heads // kv_heads",
           (SEQ + "test_hand_bytes.py",), "K/V heads replicated when they already divide: bytes 3072 -> 4096"),
    Mutant("dilated-sends-every-wanted-head", "longctx/parallel/sequence/dilated.py",
           "        kv = sorted(set(want))", "        kv = list(want)",
           (SEQ + "test_hand_bytes.py",), "GQA sparse K/V not de-duplicated: bytes 2048 -> 3072"),
    # ------------------------------------------------------------------ kernels
    Mutant("narrow-values-cut-from-the-wrong-end", "longctx/kernels/registry.py",
           "        return out[..., :dv].contiguous(), lse", "        return out[..., d - dv:].contiguous(), lse",
           ("tests/kernels/test_conformance.py",), "padded v's zero columns returned instead of its values"),
    Mutant("kv-buffer-packed-v-first", "longctx/parallel/sequence/schedule.py",
           "else torch.cat([k, v], -1)", "else torch.cat([v, k], -1)",
           (SEQ + "test_value_width.py",), "K and V of two widths read back from the wrong columns"),
    Mutant("sdpa-silently-serves-reference", "longctx/kernels/sdpa.py",
           "    if why:\n        fallbacks[why] += 1\n        return reference.forward(",
           "    if True:\n        return reference.forward(",
           ("tests/kernels/test_sdpa.py",), "sdpa returns reference's result without counting a fallback"),
    Mutant("reference-wrong-gqa-head-map", "longctx/kernels/reference.py",
           "    kf, vf = k.to(acc), v.to(acc)\n    qf = q.to(acc).view(b, sq, hkv, g, d)\n    out = torch.empty",
           "    kf, vf = k.to(acc), v.to(acc)\n    qf = q.to(acc).view(b, sq, g, hkv, d).transpose(2, 3)\n"
           "    out = torch.empty",
           ("tests/kernels/test_conformance.py::test_every_backend_matches_the_oracle",),
           "query head j reads kv head j % hkv instead of j // group"),
    Mutant("mask-dense-drops-the-diagonal", "longctx/kernels/mask.py",
           "            ok &= d <= self.right", "            ok &= d < self.right",
           ("tests/kernels/test_conformance.py::test_mask_dense_and_pair_counts_match_the_elementwise_definition",),
           "the dense mask (sdpa's additive mask, reference's scores) loses the band's right edge"),
    Mutant("causal-offset-off-by-one", "longctx/kernels/mask.py",
           "        return sk - sq if self.offset is None else self.offset",
           "        return sk - sq + 1 if self.offset is None else self.offset",
           ("tests/kernels/test_conformance.py::test_every_backend_matches_the_oracle",),
           "bottom-right causal alignment shifted by one key"),
    Mutant("band-pairs-unclamped", "longctx/kernels/mask.py",
           "        return int((hi - lo).clamp(min=0).sum())", "        return int((hi - lo).sum())",
           ("tests/kernels/test_conformance.py::test_mask_dense_and_pair_counts_match_the_elementwise_definition",),
           "rows with no key counted as negative work"),
    Mutant("triton-band-offset-off-by-one", "longctx/kernels/triton_backend.py",
           "    return off, clamp(mask.left), clamp(mask.right)",
           "    return off + 1, clamp(mask.left), clamp(mask.right)",
           ("tests/kernels/test_triton.py::test_fp32_matches_float64_reference",),
           "the Triton kernels' diagonal one key to the right"),
    Mutant("merge-swaps-weights", "longctx/kernels/merge.py",
           "    return e / s_safe, lse", "    return e.flip(0) / s_safe, lse",
           ("tests/kernels/test_merge.py",), "each partial weighted by the other's softmax mass"),
    # ------------------------------------------------------------------ planner, schedules, accounting
    Mutant("schedule-drops-a-block", "longctx/parallel/sequence/schedule.py",
           "        for b in blocks:\n            o, l = kernels.forward(",
           "        for b in blocks[1:] if len(blocks) > 1 else blocks:\n            o, l = kernels.forward(",
           (SEQ + "test_ring.py::test_ring_family_exact[4]",), "the forward skips one block of a multi-block step"),
    Mutant("planner-counts-the-rectangle", "longctx/parallel/sequence/plan.py",
           "        return self.mask.band_pairs(self.q1 - self.q0, self.k1 - self.k0)",
           "        return (self.q1 - self.q0) * (self.k1 - self.k0)",
           (SEQ + "test_work_counted.py::test_recorded_and_modelled_work_equal_the_counted_kernel_work[3]",),
           "recorded work and the work model agree with each other but not with the kernels"),
    Mutant("planner-window-one-key-wider", "longctx/parallel/sequence/plan.py",
           "        left = None if A is None else B - 1 - A", "        left = None if A is None else B - A",
           (SEQ + "test_plan.py", SEQ + "test_ring.py::test_ring_family_exact[3]"),
           "a windowed block's band reaches one key further back than the rows it was cut from"),
    Mutant("allgather-bytes-miscounted", "longctx/parallel/comm.py",
           'self.stats.record("all_gather", phase, nbytes(x) * (self.world - 1))',
           'self.stats.record("all_gather", phase, nbytes(x) * self.world)',
           (SEQ + "test_hand_bytes.py",), "the all-gather counts the chunk this rank keeps"),
    Mutant("ulysses-skips-inverse-permutation", "longctx/parallel/sequence/ulysses.py",
           "        qh, kh, vh = (t.index_select(1, inv) for t in (qh, kh, vh))", "        pass",
           (SEQ + "test_ulysses.py::test_ulysses_exact[4]",), "zigzag shards attended in layout order, not natural"),
    Mutant("zigzag-second-chunk-wrong", "longctx/parallel/sequence/layouts.py",
           "    second = torch.arange((2 * world - 1 - rank) * h, (2 * world - rank) * h)",
           "    second = torch.arange((world + rank) * h, (world + rank + 1) * h)",
           (SEQ + "test_layouts.py", SEQ + "test_plan.py"), "rank r's second chunk is not chunk 2W-1-r"),
    # ------------------------------------------------------------------ tree, dilated
    Mutant("tree-wrong-global-lse", "longctx/parallel/sequence/tree.py",
           "    glse = torch.where(ok_bhs, m_safe + torch.log(",
           "    glse = torch.where(ok_bhs, m_safe + 0.5 * torch.log(",
           (SEQ + "test_tree.py::test_tree_decode_exact",), "the combined log-sum-exp is wrong (out still right)"),
    Mutant("dilated-causal-gathers-one-rank-too-few", "longctx/parallel/sequence/dilated.py",
           "keep=p.m + 1 if spec.causal else p.g", "keep=max(p.m, 1) if spec.causal else p.g",
           (SEQ + "test_dilated.py::test_distributed_matches_reference[4]",),
           "a causal gathered pattern drops the keys of its own rank"),
    # ------------------------------------------------------------------ model, training
    Mutant("rope-ignores-true-positions", "longctx/model/rope.py",
           "    ang = position_ids.to(device=x.device, dtype=torch.float32)[..., None] * inv",
           "    ang = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)[..., None] * inv",
           ("tests/model/test_parallelize.py::test_context_parallel_model_matches_single_device[zigzag]",),
           "a zigzag shard rotated by its local, not global, positions"),
    Mutant("vocab-parallel-loss-forgets-the-target", "longctx/parallel/tensor.py",
           "                probs.scatter_add_(1, idx, -own.to(acc)[:, None])",
           "                pass",
           ("tests/train/test_parallel_axes.py::test_two_rank_tensor_and_pipeline_layouts",),
           "the tensor-parallel loss gradient without its minus one-hot"),
    Mutant("pipeline-scales-grads-twice", "longctx/parallel/pipeline.py",
           "        sched = cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)",
           "        sched = cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)",
           ("tests/train/test_parallel_axes.py::test_two_rank_tensor_and_pipeline_layouts",),
           "torch divides by the microbatch count on top of the trainer's normalisation"),
    Mutant("v-validation-keeps-forward-order", "longctx/parallel/pipeline.py",
           "            sched.pipeline_order_with_comms = train_order", "            pass",
           ("tests/train/test_parallel_axes.py::test_two_rank_tensor_and_pipeline_layouts",),
           "after a V schedule's held-out loss, training replays the forward-only action list (no backward)"),
    Mutant("v-validation-stages-reversed", "longctx/parallel/pipeline.py",
           "    for stage, rank in sorted(stage_rank.items()):",
           "    for stage, rank in sorted(stage_rank.items(), reverse=True):",
           ("tests/train/test_parallel_axes.py::test_two_rank_tensor_and_pipeline_layouts",),
           "a V schedule's forward-only list runs a rank's later stage before its earlier one"),
    Mutant("deepspeed-forward-bypasses-engine", "longctx/train/trainer.py",
           "        model = self.engine if self.engine is not None else self.model",
           "        model = self.model",
           ("tests/train/test_parallel_axes.py::test_deepspeed_zero_stages",),
           "ZeRO-3 accumulation micro-batches overwrite each other's gradients"),
    Mutant("loss-not-scaled-by-dp-cp", "longctx/train/trainer.py",
           "            scale = self.dims.dp_cp / max(count, 1.0)", "            scale = 1.0 / max(count, 1.0)",
           ("tests/train/test_equivalence.py::test_two_rank_layouts_match_one_process",),
           "gradients divided by the engine's dp x cp average once too often"),
    # ------------------------------------------------------------------ packed documents and generation
    Mutant("documents-last-one-dropped", "longctx/parallel/sequence/plan.py",
           "    for d in range(len(starts)):", "    for d in range(max(1, len(starts) - 1)):",
           (SEQ + "test_documents.py",), "the last document of a packed sequence is never attended"),
    Mutant("documents-rectangle-ends-late", "longctx/parallel/sequence/plan.py",
           "        r0, r1, k0, k1 = rows[d], rows[d + 1], keys[d], keys[d + 1]",
           "        r0, r1, k0, k1 = rows[d], rows[d + 1], keys[d], keys[min(d + 2, len(keys) - 1)]",
           (SEQ + "test_documents.py",), "a document's queries also see the next document's keys"),
    Mutant("rope-does-not-restart-per-document", "longctx/model/llama.py",
           "        angles = position_ids if rope_ids is None else rope_ids", "        angles = position_ids",
           ("tests/model/test_packed.py",), "packed documents rotated by their offset in the sequence"),
    Mutant("pipeline-documents-of-wrong-microbatch", "longctx/parallel/pipeline.py",
           "        self.submod._pp_chunk = fwd_chunk_id", "        self.submod._pp_chunk = 0",
           ("tests/train/test_packed_data.py::test_packed_training_layouts_match_one_process",),
           "every pipeline microbatch gets the first microbatch's documents"),
    Mutant("decode-sees-left-padding", "longctx/model/generate.py",
           "        out, lse = cache.decode(q, strategy=decode, key_start=key_start, kernel=kernel, scale=scale, "
           "return_lse=True,",
           "        out, lse = cache.decode(q, strategy=decode, kernel=kernel, scale=scale, return_lse=True,",
           ("tests/model/test_generate.py",), "decoded tokens attend the padding of shorter prompts"),
    Mutant("token-labels-cross-documents", "longctx/data/tokens.py",
           "        labels[doc[1:] != doc[:-1]] = IGNORE_INDEX", "        pass",
           ("tests/data/test_tokens_loader.py",), "a document's last token is trained to predict the next one"),
    # ------------------------------------------------------------------ Hugging Face models
    Mutant("hf-sliding-window-dropped", "longctx/model/hf.py",
           "    window = layer_window(module, sliding_window)", "    window = None",
           ("tests/model/test_hf.py::test_every_strategy_equals_the_eager_model",),
           "Mistral/Qwen2 sliding-window layers attend the full causal context"),
    Mutant("hf-rope-by-local-positions", "longctx/model/hf.py",
           "        rope = documents.rope_positions(pos) if documents is not None else pos.reshape(1, -1)",
           "        rope = torch.arange(s, device=tokens.device).reshape(1, -1)",
           ("tests/model/test_hf.py::test_every_strategy_equals_the_eager_model",),
           "HF RoPE rotates a shard by its local positions instead of the layout's"),
    Mutant("hf-window-only-when-passed", "longctx/model/hf_layers.py",
           "    if passed:\n        return int(passed)\n",
           "    if True:\n        return int(passed) if passed else None\n",
           ("tests/model/test_hf.py::test_every_strategy_equals_the_eager_model",),
           "a window the module leaves to transformers' mask (Qwen2-MoE, PhiMoE) is dropped"),
    Mutant("ddp-waits-for-unused-parameters", "longctx/model/hf.py",
           "                                find_unused=True)", "                                find_unused=False)",
           ("tests/model/test_hf.py::test_every_strategy_equals_the_eager_model",),
           "DDP leaves a bucket unreduced for a trainable parameter that got no gradient"),
    Mutant("hf-chunks-ignored", "longctx/model/hf.py",
           "                chunk=attention_chunk(module), softcap=", "                chunk=None, softcap=",
           ("tests/model/test_hf.py::test_every_strategy_equals_the_eager_model",),
           "Llama 4's chunked layers attend the whole causal context"),
    Mutant("hf-query-temperature-of-the-shard", "longctx/model/hf_layers.py",
           "    return (q.float() * (true / local)[..., None, None]).to(q.dtype)", "    return q",
           ("tests/model/test_hf.py::test_every_strategy_equals_the_eager_model",),
           "Llama 4's no-RoPE queries scaled by the positions of the shard, not the sequence"),
    Mutant("hf-chunks-across-documents", "longctx/model/hf_layers.py",
           "    return (documents or Documents(seq_len, ((0,),))).chunked(chunk)",
           "    return Documents(seq_len, ((0,),)).chunked(chunk)",
           ("tests/model/test_hf.py::test_packed_documents_equal_each_document_alone",),
           "chunks counted from the packed row's start, attending across documents"),
    Mutant("chunked-decode-sees-the-whole-cache", "longctx/model/generate.py",
           "    if chunk is not None:\n        return pad + (position - pad) // chunk * chunk",
           "    if False:\n        return pad + (position - pad) // chunk * chunk",
           ("tests/model/test_hf_generate.py::test_one_process",),
           "a Llama 4 decode step attends keys outside its chunk"),
    # ------------------------------------------------------------------ restarts
    Mutant("restart-takes-a-stale-epoch", "longctx/launch/env.py",
           'json.loads(store.get(go)).get(str(rank)) == start:',
           "True:",
           ("tests/launch/test_env.py",),
           "a restarted rank accepts the dead attempt's answer (and would read its addresses)"),
    Mutant("resume-keeps-the-lost-attempts-metrics", "longctx/train/metrics.py",
           "step <= resumed_step)]",
           "True)]",
           ("tests/train/test_metrics_optim.py::test_a_resumed_run_moves_the_lost_attempts_records_aside",),
           "metrics.jsonl repeats the steps a restarted job computes again"),
    Mutant("deepspeed-resumes-on-another-stage", "longctx/train/checkpoint.py",
           'if here["kind"] == "deepspeed" and written == (here["zero_stage"], here["dims"], here["precision"]):',
           'if here["kind"] == "deepspeed":',
           ("tests/train/test_checkpoint.py::test_deepspeed_checkpoints_resume_bit_for_bit",),
           "a ZeRO-3 checkpoint's own DeepSpeed files are handed to a ZeRO-1 engine instead of the full states"),
    # ------------------------------------------------------------------ stopping on a signal, FLOPs
    Mutant("stop-signal-kept-to-one-rank", "longctx/train/trainer.py",
           "float(self.stop.received)]", "0.0]",
           ("tests/train/test_stop.py::test_one_rank_signalled_stops_all_after_that_step_and_resume_is_exact",),
           "a SIGTERM is never acted on (or, kept local, would leave the other ranks in a collective)"),
    Mutant("launcher-death-goes-unnoticed", "longctx/launch/local.py",
           "    os.kill(os.getpid(), signal.SIGTERM)", "    pass",
           ("tests/train/test_stop.py::test_launch_local_passes_sigterm_on_and_outliving_ranks_stop",),
           "ranks of a killed launcher train on to the end"),
    Mutant("packed-flops-count-the-full-square", "longctx/train/metrics.py",
           "for n in documents.lengths(row))", "for n in [documents.seq_len])",
           ("tests/train/test_metrics_optim.py::test_packed_attention_pairs_stay_inside_documents",),
           "MFU of packed batches credits the masked pairs across documents"),
    Mutant("shared-kv-head-of-rank-zero", "longctx/parallel/tensor.py",
           "            head = tp_mesh.get_local_rank() // (tp // attention.n_kv)", "            head = 0",
           ("tests/train/test_parallel_axes.py::test_tensor_parallel_beyond_the_kv_heads_and_with_wide_heads",),
           "with tp > n_kv_heads every rank attends with the first K/V head"),
    Mutant("init-seeded-by-the-short-name", "longctx/model/llama.py",
           'f"{seed}/{name}"', 'f"{seed}/{param_name}"',
           ("tests/model/test_llama.py::test_init_weights_draws_each_parameter_from_its_own_seeded_stream",),
           "every layer starts from the same weights"),
    Mutant("meta-stages-drawn-apart", "longctx/model/parallelize.py",
           "            module.init_weights(seed, write=write_local_piece)",
           "            module.init_weights(seed + len(self.stage_ids), write=write_local_piece)",
           ("tests/train/test_equivalence.py::test_initial_weights_do_not_depend_on_the_layout_or_the_meta_device",),
           "a pipelined meta-init model starts from other weights than the unsplit one"),
    Mutant("saved-counter-lets-addresses-be-reused", "longctx/train/metrics.py",
           "            self._held.append(storage)\n", "",
           ("tests/train/test_loss.py::test_saved_tensor_counter_counts_a_freed_and_reused_address_again",),
           "a pipeline's saved activations undercounted, by a different amount every run"),
    Mutant("ray-stop-kept-in-the-driver", "longctx/launch/ray_launcher.py",
           "        self.flag.set.remote(signum)\n", "        pass\n",
           ("tests/launch/test_ray.py::test_ray_job_stop_checkpoints_the_step_in_flight",),
           "`ray job stop` kills the workers mid-step, losing the work since the last checkpoint"),
    Mutant("hf-tp-unties-the-head", "longctx/model/hf_tensor.py",
           "        model.lm_head.weight = model.model.embed_tokens.weight\n", "        pass\n",
           ("tests/train/test_hf_training.py::test_hf_model_layouts_train_like_one_process",),
           "a tied HF model under tp trains its embedding and output head apart"),
    Mutant("hf-tp-norms-left-plain", "longctx/model/hf_tensor.py",
           "            replicate(names[n], tp_mesh, shard_dim=1)\n", "            pass\n",
           ("tests/train/test_hf_training.py::test_hf_model_layouts_train_like_one_process",),
           "HF norms under tp stay plain tensors (mixed with DTensors in the optimizer and clipping)"),
    Mutant("hf-tp-norm-input-replicated", "longctx/model/hf_tensor.py",
           "[Shard(shard_dim % a.dim())]", "[Replicate()]",
           ("tests/model/test_hf.py::test_every_strategy_equals_the_eager_model",),
           "HF norms under tp take their shard (of the sequence, or of the heads) for the whole: their weight "
           "gradients stay this rank's share"),
    Mutant("hsdp-tp-mesh-from-the-world", "longctx/parallel/dims.py",
           '            self.tp = hsdp_root["tp"]', "            pass",
           ("tests/parallel/test_dims.py",),
           "replicas of a tp model put TP and HSDP on meshes of different roots (FSDP2 refuses them)"),
    Mutant("decode-ignores-the-window", "longctx/model/generate.py",
           "    return pad if window is None else torch.clamp(pad, min=position - window + 1)", "    return pad",
           ("tests/model/test_generate.py::test_sliding_window_layers_decode_inside_their_window",),
           "a sliding-window layer attends the whole cache while decoding"),
    Mutant("hf-decode-default-scale", "longctx/model/hf_generate.py",
           "                                scale=scale, decode=self.decode,",
           "                                scale=q.shape[-1] ** -0.5, decode=self.decode,",
           ("tests/model/test_hf_generate.py::test_one_process",),
           "HF decoding ignores the model's softmax scale (Gemma's query_pre_attn_scalar)"),
    Mutant("hf-meta-buffers-lost", "longctx/model/hf_load.py",
           "        model.get_submodule(owner)._buffers[leaf] = value.to(device)", "        pass",
           ("tests/train/test_hf_training.py::test_hf_model_layouts_train_like_one_process",),
           "an HF model loaded piece by piece keeps to_empty's garbage for its RoPE frequencies"),
    Mutant("flops-ignore-head-dim", "longctx/train/metrics.py",
           "    hd = head_dim_of(c)\n", "    hd = c.dim // c.n_heads\n",
           ("tests/train/test_metrics_optim.py",),
           "MFU counts dim / n_heads wide heads for a model whose heads are wider (Qwen3)"),
    Mutant("tp-decode-unreduced", "longctx/model/generate.py",
           '            return tp.all_reduce(out, phase="tp") if tp is not None else out',
           "            return out",
           ("tests/model/test_generate.py::test_tensor_parallel_model_generates_like_one_process",),
           "a tensor-parallel decode step keeps each rank's partial sum of wo and w2"),
    Mutant("tp-token-loss-first-rows", "longctx/parallel/tensor.py",
           "flat, labels.reshape(-1), comm.rank * rows, comm", "flat, labels.reshape(-1), 0, comm",
           ("tests/eval/test_eval.py::test_perplexity_by_position_agrees_across_ranks",),
           "per-token losses under tp take every rank's vocabulary slice for the first one"),
    Mutant("hf-inference-split-reduce-scatters", "longctx/model/hf_tensor.py",
           "    between = Shard(1) if sequence_parallel else Replicate()", "    between = Shard(1)",
           ("tests/model/test_hf_generate.py::test_tensor_parallel_split_generates_like_the_eager_model",),
           "the HF inference split keeps sequence shards between the blocks (one decode token cannot be split)"),
    Mutant("ds-full-state-names-tied-once", "longctx/parallel/deepspeed_engine.py",
           "                out[name] = out[seen[id(param)]]\n", "                pass\n",
           ("tests/train/test_hf_training.py::test_hf_model_under_deepspeed_zero3_trains_exports_and_evaluates",),
           "a DeepSpeed checkpoint of a tied HF model lacks its output head's name"),
    Mutant("zero3-pieces-keep-torch-init", "longctx/parallel/deepspeed_engine.py",
           "    piece = flat[n * dist.get_rank(param.ds_process_group):][:n]", "    piece = flat[:n]",
           ("tests/train/test_parallel_axes.py::test_deepspeed_zero_stages",),
           "ZeRO-3 built in pieces gives every rank the first partition's initial values"),
    Mutant("validation-loss-of-one-stage", "longctx/train/validate.py",
           "            (loss_sum,) = trainer._all_reduce([loss_sum], group=plan.pp_group)",
           "            pass",
           ("tests/train/test_parallel_axes.py::test_two_rank_tensor_and_pipeline_layouts",),
           "under a pipeline the validation loss is only the last stage's (0 on the others)"),
    Mutant("hf-stage-norms-twice", "longctx/model/hf.py",
           "decoder.norm = nn.Identity()", "decoder.norm = decoder.norm",
           ("tests/train/test_hf_training.py::test_hf_model_pipeline_stages_train_like_one_process",),
           "an HF pipeline stage before the last applies the final norm to the residual stream it hands on"),
    Mutant("hf-stage-renumbers-layers", "longctx/model/hf.py",
           "            if i not in layers:\n                decoder.layers[i] = SkippedLayer()",
           "            if i == 0:\n                decoder.layers = nn.ModuleList("
           "[decoder.layers[j] for j in layers])",
           ("tests/train/test_hf_training.py::test_hf_model_pipeline_stages_train_like_one_process",),
           "an HF stage keeps only its layers, renumbered: names collide and Gemma3 picks another layer's RoPE"),
    Mutant("checkpoint-nests-param-groups", "longctx/train/checkpoint.py",
           "StateDictOptions(flatten_optimizer_state_dict=True)", "StateDictOptions()",
           ("tests/train/test_checkpoint.py::test_pipeline_checkpoints_resume_on_any_pipeline_layout",),
           "one rank's param_groups list is saved for all pipeline ranks: a pp run cannot resume"),
    Mutant("checkpoint-keeps-stage-index", "longctx/train/checkpoint.py",
           '_STAGE_INDEX.sub(r"\\1", name) if trainer.plan.stages else name', "name",
           ("tests/train/test_checkpoint.py::test_pipeline_checkpoints_resume_on_any_pipeline_layout",),
           "saved names keep the rank's stage index: a pipeline checkpoint loads only into its own layout"),
    Mutant("checkpoint-digests-unchecked", "longctx/train/checkpoint_dirs.py",
           "bad = [n for n in names if found[n] != written[n]]", "bad = []",
           ("tests/train/test_checkpoint.py::test_interrupted_checkpoints_are_never_loaded",
            "tests/train/test_checkpoint.py::test_a_damaged_checkpoint_is_one_line_naming_the_file"),
           "a flipped bit in a weight (same size) resumes, exports and evaluates silently"),
    Mutant("nonfinite-step-applied", "longctx/train/trainer.py",
           "if math.isfinite(grad_norm):  # the same global value on every rank: all withhold alike",
           "if True:",
           ("tests/train/test_nonfinite.py::test_nonfinite_steps_are_withheld_then_stop_the_run",),
           "a NaN gradient reaches AdamW: every weight and later checkpoint turns NaN"),
    Mutant("init-from-reads-nothing", "longctx/train/init_from.py",
           'read_dcp({"model": {saved_name(trainer, key): value for key, value in mine.items()}}, path)', "pass",
           ("tests/train/test_init_from.py::test_a_stage_starts_from_the_weights_on_any_layout",),
           "train.init_from leaves the torch engines' model at its seeded initial weights"),
    Mutant("resume-data-position-is-the-step", "longctx/train/checkpoint.py",
           'batches.first_sequence = int(data.get("sequences_consumed", batches.first_step * t.batch_size))',
           "batches.first_sequence = batches.first_step * t.batch_size",
           ("tests/train/test_checkpoint.py::test_a_resume_with_another_batch_size_reads_on",),
           "a run resumed with another global batch size skips or repeats sequences"),
    Mutant("deepspeed-reshard-keeps-first-lr", "longctx/train/optim.py",
           "        group[\"lr\"] = lr  # the optimizer's own state", "        pass  #",
           ("tests/train/test_checkpoint.py::test_deepspeed_checkpoints_resume_bit_for_bit",),
           "a resharded DeepSpeed resume runs its first step at the first warmup LR"),
    Mutant("deepspeed-zero3-pieces-all-first", "longctx/parallel/deepspeed_engine.py",
           "start = param.ds_tensor.numel() * dist.get_rank(param.ds_process_group)", "start = 0",
           ("tests/train/test_checkpoint.py::test_deepspeed_checkpoints_resume_bit_for_bit",),
           "every ZeRO-3 rank's optimizer piece is taken as the parameter's first: states and masters scrambled"),
    Mutant("loader-workers-outlive-fit", "longctx/train/trainer.py",
           "            self.loader.close()  # worker processes end with the run", "            pass",
           ("tests/train/test_packed_data.py::test_packed_resume_continues_with_the_same_batches",),
           "DataLoader workers keep running after fit returns (and outlive the job)"),
    Mutant("full-resume-restarts-adam-step", "longctx/train/checkpoint.py",
           '{"step": torch.tensor(float(step)), **states[saved_name(trainer, fqn, optim=True)]}',
           '{"step": torch.tensor(0.0), **states[saved_name(trainer, fqn, optim=True)]}',
           ("tests/train/test_checkpoint.py::test_deepspeed_checkpoints_resume_bit_for_bit",),
           "a DeepSpeed checkpoint resumed under FSDP2 restarts Adam's step count (its bias correction)"),
    # ------------------------------------------------------------------ a tied head in pipeline stages
    Mutant("tied-copies-not-summed-across-ranks", "longctx/parallel/tied.py",
           "            dist.all_reduce(pieces[0], group=self.group)", "            pass",
           ("tests/train/test_hf_training.py::test_a_tied_head_trains_in_pipeline_stages_like_one_process",),
           "the embedding and its head copy on two pipeline ranks each step with half the gradient and drift apart"),
    Mutant("tied-copies-not-summed-on-one-rank", "longctx/parallel/tied.py",
           "            pieces[0].add_(pieces[1])\n", "",
           ("tests/train/test_hf_training.py::test_a_tied_head_trains_in_pipeline_stages_like_one_process",),
           "a V schedule's rank holds both copies and gives the embedding only its own gradient"),
    Mutant("tied-head-counted-twice-in-norm", "longctx/train/optim.py",
           "    counted = [p.grad for p in params if p is not uncounted]", "    counted = [p.grad for p in params]",
           ("tests/train/test_hf_training.py::test_a_tied_head_trains_in_pipeline_stages_like_one_process",),
           "the tied weight's gradient enters the clipping norm twice"),
    Mutant("tied-head-optimizer-state-saved-apart", "longctx/train/checkpoint.py",
           "                return lead + tied.embedding_name + name[len(head):]", "                return name",
           ("tests/train/test_hf_training.py::test_a_tied_head_trains_in_pipeline_stages_like_one_process",),
           "the head copy's Adam state is saved under its own name: a pp=1 checkpoint cannot resume as stages"),
    Mutant("tied-head-copy-not-read-from-embedding", "longctx/model/hf_load.py",
           "        source[tied_pair[1]] = tied_pair[0]", "        pass",
           ("tests/train/test_hf_training.py::test_a_tied_head_trains_in_pipeline_stages_like_one_process",),
           "meta init: the last stage's head copy finds no weights in safetensors that store the tied weight once"),
    Mutant("hf-autocast-mixed-qkv", "longctx/model/hf.py",
           "        q, k, v = (t.to(dtype) for t in (q, k, v))", "        pass",
           ("tests/train/test_hf_training.py::test_a_tied_head_trains_in_pipeline_stages_like_one_process",),
           "bf16 autocast without FSDP: q, k float32 after RoPE, v bf16, and the kernels refuse the mix"),
    Mutant("hf-rope-length-unpinned", "longctx/model/hf.py",
           "            pin_rope_length(module.hf, rope_length)", "            pass",
           ("tests/model/test_hf.py::test_every_strategy_equals_the_eager_model",),
           "a dynamic/longrope RoPE rescales by each context shard's own largest position"),
    Mutant("hf-rope-pin-slot-kept", "longctx/model/hf.py",
           "    return cos[..., :-1, :], sin[..., :-1, :]", "    return cos[..., 1:, :], sin[..., 1:, :]",
           ("tests/model/test_hf.py::test_a_self_rescaling_rope_is_pinned_to_one_length",),
           "the pinned RoPE drops the wrong column: every token rotated by its neighbour's angle"),
    Mutant("trainer-rope-length-not-passed", "longctx/train/trainer.py",
           "param_dtype=torch.bfloat16 if bf16 else None, rope_length=t.seq_len)",
           "param_dtype=torch.bfloat16 if bf16 else None)",
           ("tests/train/test_hf_training.py::test_an_hf_checkpoint_evaluates_through_its_own_layers",),
           "training an HF model with a dynamic RoPE under cp > 1 is refused instead of pinned"),
    Mutant("ppl-rope-length-not-passed", "longctx/eval/ppl.py",
           "apply_context_parallel(model, strategy, group, rope_length=seq_len)",
           "apply_context_parallel(model, strategy, group)",
           ("tests/train/test_hf_training.py::test_an_hf_checkpoint_evaluates_through_its_own_layers",),
           "perplexity of an HF model with a dynamic RoPE over context ranks is refused instead of pinned"),
    Mutant("sinks-gradient-sign", "longctx/kernels/merge.py",
           "    return -(share * delta).sum((0, 2)).to(sinks.dtype)",
           "    return (share * delta).sum((0, 2)).to(sinks.dtype)",
           ("tests/parallel/sequence/test_sinks.py",), "raising a sink would add to each row's output"),
    Mutant("sinks-backward-on-unmerged-lse", "longctx/parallel/sequence/schedule.py",
           "            out, lse = kernels.merge_sinks(out, lse, sinks)",
           "            out, _ = kernels.merge_sinks(out, lse, sinks)",
           ("tests/parallel/sequence/test_sinks.py",),
           "the backward recomputes probabilities without the sink in their normaliser"),
    Mutant("ulysses-sinks-of-first-heads", "longctx/parallel/sequence/ulysses.py",
           "    return None if sinks is None else sinks.view(comm.world, -1)[comm.rank]",
           "    return None if sinks is None else sinks.view(comm.world, -1)[0]",
           ("tests/parallel/sequence/test_sinks.py",), "every Ulysses rank takes the first heads' sinks"),
    Mutant("decode-drops-sinks", "longctx/model/generate.py",
           "        out, _ = kernels.merge_sinks(out, lse, sinks)", "        pass",
           ("tests/model/test_hf_generate.py::test_context_parallel_prefill_and_decoding",),
           "decode steps of a model with attention sinks attend without them"),
    Mutant("softcap-backward-without-slope", "longctx/kernels/reference.py",
           "            ds = ds * slope", "            pass",
           ("tests/parallel/sequence/test_softcap.py",),
           "the reference backward forgets the cap's derivative (gradients of uncapped scores)"),
    Mutant("softcap-dropped-by-the-schedules", "longctx/parallel/sequence/schedule.py",
           "out_dtype=out.dtype, softcap=spec.softcap)", "out_dtype=out.dtype)",
           ("tests/parallel/sequence/test_softcap.py",), "ring-family and all-gather blocks compute uncapped scores"),
    Mutant("softcap-triton-dq-without-slope", "longctx/kernels/triton_kernels.py",
           "        ds = ds * slope", "        ds = ds",
           ("tests/kernels/test_conformance.py",), "the Triton dQ kernel forgets the cap's derivative"),
    Mutant("softcap-loss-without-slope", "longctx/train/loss.py",
           "        probs.mul_(slope)", "        pass",
           ("tests/train/test_loss.py",), "the chunked loss's gradient forgets the output cap's derivative"),
    Mutant("softcap-vocab-parallel-uncapped", "longctx/parallel/tensor.py",
           "                logits, slope = soft_cap(logits, softcap)", "                slope = None",
           ("tests/train/test_hf_training.py::test_hf_model_pipeline_stages_train_like_one_process",),
           "the vocabulary-parallel loss ignores the output cap"),
    Mutant("softcap-hf-attention-uncapped", "longctx/model/hf.py",
           'softcap=kwargs.get("softcap"))', "softcap=None)",
           ("tests/model/test_hf_checks.py::test_output_logit_transforms_reach_logits_and_loss",),
           "Gemma 2's attention scores reach the kernels uncapped"),
    Mutant("softcap-decode-uncapped", "longctx/model/hf_generate.py",
           "                                softcap=softcap)", "                                softcap=None)",
           ("tests/model/test_hf_generate.py::test_context_parallel_prefill_and_decoding",),
           "decode steps of Gemma 2 attend with uncapped scores"),
    Mutant("hf-output-scale-dropped-from-the-loss", "longctx/model/hf.py",
           "        return loss_fn(h if scale is None else h * scale,", "        return loss_fn(h,",
           ("tests/model/test_hf_checks.py::test_output_logit_transforms_reach_logits_and_loss",),
           "Cohere's and Granite's losses are of unscaled logits"),
    Mutant("hf-output-scale-inverted", "longctx/model/hf_checks.py",
           "        scale = scale / value if invert else scale * value",
           "        scale = scale * value if invert else scale / value",
           ("tests/model/test_hf.py::test_every_strategy_equals_the_eager_model",),
           "Granite's logits multiplied by logits_scaling, Cohere's divided by logit_scale"),
    Mutant("hf-logits-scaling-one-way", "longctx/model/hf_checks.py",
           '"hyperclovax": "multiply"}', '"hyperclovax": "divide"}',
           ("tests/model/test_hf_checks.py::test_output_logit_transforms_reach_logits_and_loss",),
           "HyperCLOVAX's logits divided by logits_scaling, as Granite's are"),
    Mutant("triton-values-masked-at-the-qk-width", "longctx/kernels/triton_kernels.py",
           "    v_ok = (offs_n[:, None] < SK) & (offs_dv[None, :] < D_V)\n"
           "    v = tl.load(_tile(v_base, offs_n, s_vs, offs_dv)",
           "    v_ok = (offs_n[:, None] < SK) & (offs_dv[None, :] < D)\n"
           "    v = tl.load(_tile(v_base, offs_n, s_vs, offs_dv)",
           ("tests/kernels/test_triton.py::test_values_of_another_width_run_in_tiles_of_their_own",),
           "the forward reads value columns past v's width (the next head's) when q/k are wider"),
    Mutant("checkpoint-root-shared-by-two-runs", "longctx/train/checkpoint_dirs.py",
           "    if not others:\n        return\n", "    if others or not others:\n        return\n",
           ("tests/train/test_checkpoint.py::test_a_run_never_shares_its_checkpoint_dir_with_another",),
           "a fresh run writes into (and keep_last prunes) another run's checkpoint root"),
    Mutant("metrics-superseded-records-deleted", "longctx/train/metrics.py",
           "    if moved:\n        with open(superseded", "    if False:\n        with open(superseded",
           ("tests/train/test_metrics_optim.py",),
           "the records a resumed or fresh run replaces are deleted rather than kept aside"),
    Mutant("resume-accepts-another-model", "longctx/train/same_run.py",
           "    if changes:\n        raise ConfigError", "    if False:\n        raise ConfigError",
           ("tests/train/test_checkpoint.py::test_bad_resume_and_shape_mismatch",),
           "a resume with other heads or RoPE base in the same shapes loads silently"),
    Mutant("marker-without-files-complete", "longctx/train/checkpoint_dirs.py",
           "if not isinstance(files, dict) or not files or not all(", "if not isinstance(files, dict) or not all(",
           ("tests/train/test_checkpoint.py::test_a_marker_of_another_shape_is_a_damaged_one",),
           "a completion marker listing no file vouches for a checkpoint"),
    Mutant("hf-head-bias-accepted", "longctx/model/hf_checks.py",
           "type(head).forward is not nn.Linear.forward or extra:", "type(head).forward is not nn.Linear.forward:",
           ("tests/model/test_hf_checks.py::test_what_longctx_would_skip_is_refused",),
           "Phi's lm_head bias (and Dory's logit scale) left out of the loss"),
    Mutant("unread-data-path-accepted", "longctx/train/inapplicable.py",
           '_CHECKED_DATA_KEYS = ("path", "digits",', '_CHECKED_DATA_KEYS = ("digits",',
           ("tests/test_config.py::test_bad_configs",),
           "a data.path the synthetic source never opens trains on synthetic data without a word"),
    Mutant("init-from-other-heads-accepted", "longctx/train/init_from.py",
           "    _check_heads(trainer, path, what)\n", "",
           ("tests/train/test_init_from.py::test_an_interrupted_stage_resumes_itself_and_shapes_must_match",),
           "a stage reads 4 heads of 8 as 2 heads of 16"),
    Mutant("init-from-drops-extra-weights", "longctx/train/init_from.py",
           "    if left:\n        raise unfit_error", "    if False:\n        raise unfit_error",
           ("tests/train/test_init_from.py::test_an_interrupted_stage_resumes_itself_and_shapes_must_match",),
           "a stage of one layer starts from a two-layer checkpoint, its second layer dropped"),
    Mutant("validation-reads-training-sequences", "longctx/data/sources.py",
           "seed=seed + VALIDATION_SEED_OFFSET,", "seed=seed,",
           ("tests/train/test_validation.py",),
           "the generated sources validate on the sequences training reads"),
    Mutant("resume-keeps-saved-optimizer-settings", "longctx/train/checkpoint.py",
           "    apply_settings(trainer.optimizer, trainer.scheduler, trainer.cfg.train)",
           "    for group, lr in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr()):\n"
           "        group['lr'] = lr",
           ("tests/train/test_checkpoint.py::test_a_resume_takes_this_runs_optimizer_settings_and_schedule",),
           "a resume with a lower train.lr trains on at the checkpoint's"),
    Mutant("last-step-after-warmup-at-peak", "longctx/train/optim.py",
           "return min_ratio if warmup else 1.0", "return 1.0",
           ("tests/train/test_metrics_optim.py::test_lr_schedule_warmup_then_cosine",),
           "one step after warmup runs at the peak, not the floor"),
    Mutant("holdout-first-token-trained-on", "longctx/data/tokens.py",
           "out.end_token = min(stop * self.seq_len, self.n_tokens)", "out.end_token = self.n_tokens",
           ("tests/data/test_tokens_loader.py::test_a_training_split_never_reads_the_first_held_out_token",),
           "the last training window's last label is the first held-out token"),
    Mutant("subgroups-wait-torchs-30-minutes", "longctx/parallel/dims.py",
           "        match_world_timeout()  # the sub-groups", "        pass  # the sub-groups",
           ("tests/parallel/test_dims.py",),
           "a peer stuck in a cp or tp group holds the others 30 minutes, whatever parallel.timeout_s says"),
    Mutant("forkserver-dies-with-the-job", "longctx/launch/local.py",
           "            _start_forkserver()\n", "            pass\n",
           ("tests/train/test_stop.py::test_a_signal_to_every_process_of_the_job_still_ends_in_a_checkpoint",),
           "scancel kills the forkserver: every rank reads as dead and the launcher leaves mid-checkpoint"),
    Mutant("start-up-signal-kills-the-rank", "longctx/launch/entry.py",
           "    with StopSignals(cfg.checkpoint.on_signal), process_group(", "    with process_group(",
           ("tests/train/test_stop.py::test_a_signal_while_the_job_starts_stops_it_after_one_step_with_a_checkpoint",),
           "a SIGTERM during model build kills the rank with nothing saved"),
    Mutant("ray-failure-is-a-traceback", "longctx/launch/ray_launcher.py",
           "    if not failures:\n        return error", "    if True:\n        return error",
           ("tests/launch/test_ray.py::test_a_failed_ray_run_reads_as_the_simulated_clusters_rank_error",),
           "a ConfigError in a Ray worker prints Ray's 100-line traceback, exit 1"),
    Mutant("tied-head-counted-twice", "longctx/train/weights.py",
           "        count -= sum(state[n].numel() for n in names[1:] if n in state)", "        pass",
           ("tests/train/test_hf_training.py::test_a_tied_head_trains_in_pipeline_stages_like_one_process",),
           "export reports a tied model's parameters with its head counted twice"),
    Mutant("unlabelled-step-loss-zero", "longctx/train/trainer.py",
           '"loss": total / count if count else float("nan")', '"loss": total / count if count else 0.0',
           ("tests/train/test_loss.py::test_a_step_without_real_labels_records_no_loss",),
           "a fully masked batch logs a perfect loss of 0.0"),
    Mutant("fp32-mfu-against-tf32", "longctx/train/metrics.py",
           'return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"', 'return "tf32"',
           ("tests/train/test_metrics_optim.py::test_fp32_mfu_is_against_the_peak_its_matmuls_run_at",),
           "fp32 MFU divided by the TF32 peak though TF32 is off: ~7x low"),
]


def _copy_tree(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for rel in files:
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def _run_one(m: Mutant, work: str, timeout: float) -> tuple[str, float, str]:
    path = os.path.join(work, m.path)
    with open(path) as f:
        original = f.read()
    if original.count(m.old) != 1:
        return "STALE", 0.0, f"snippet occurs {original.count(m.old)} times in {m.path}; update the mutant"
    try:
        with open(path, "w") as f:
            f.write(original.replace(m.old, m.new))
        py_compile.compile(path, doraise=True)
        env = dict(os.environ, PYTHONPATH=work + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONDONTWRITEBYTECODE="1")
        t0 = time.monotonic()
        try:
            p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                               cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)", time.monotonic() - t0, ""
        took = time.monotonic() - t0
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")]
        if p.returncode == 0:
            return "SURVIVED", took, ""
        if p.returncode in (4, 5):  # usage error / nothing collected: the selection is wrong, not the code
            return "BAD SELECTION", took, p.stdout[-500:]
        return "killed", took, lines[0][:110] if lines else f"pytest exit {p.returncode}"
    finally:
        with open(path, "w") as f:
            f.write(original)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these mutants (by name)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        known = {m.name for m in MUTANTS}
        ap.error(f"unknown mutant(s) {sorted(set(args.only) - known)}; --list shows them")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:42s} {m.path}: {m.why}")
        return 0
    bad = 0
    with tempfile.TemporaryDirectory(prefix="longctx-mutants-") as work:
        _copy_tree(work)
        env = dict(os.environ, PYTHONPATH=work)
        where = subprocess.run([sys.executable, "-c", "import longctx; print(longctx.__file__)"], cwd=work, env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        if not where.startswith(work):  # the mutants would be applied to code no test imports
            print(f"the scratch copy is not what gets imported ({where}); aborting", file=sys.stderr)
            return 2
        print(f"{len(chosen)} mutants, scratch copy in {work}", flush=True)
        for m in chosen:
            status, took, detail = _run_one(m, work, args.timeout)
            bad += not status.startswith("killed")
            print(f"  {status:16s} {took:6.1f}s  {m.name:42s} {detail}", flush=True)
    print(f"{len(chosen) - bad}/{len(chosen)} mutants killed" + ("" if not bad else f"; {bad} NOT killed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
