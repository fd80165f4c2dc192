"""Hugging Face transformers causal LMs (Llama, Qwen2/3, Mistral, Gemma3, ...) under longctx's sequence parallelism.

The model stays unmodified: longctx registers an attention implementation, "longctx", through transformers'
AttentionInterface, and `parallelize_hf` points every attention module at this rank's context-parallel
core (the plan's strategy, layout and group), then applies activation checkpointing and data parallelism
as `parallelize` does for our Llama. What would break silently is handled here:

  tensors      HF hands (B, H, S, D); longctx works on (B, S, H, D): transposed in and out
  positions    RoPE must rotate by the layout's true positions (inside documents when packed): the adapter
               passes them as HF's position_ids
  masks        HF builds no mask for a registered implementation (masking_utils skips unknown ones), so a
               causal mask of the local shard can never be taken for the global one; the core applies the
               global causal rule itself
  windows      sliding-window layers (Mistral, Qwen2's `layer_types`) pass `sliding_window` per call: the
               core for that window is used, under every strategy; chunked layers (Llama 4) attend inside
               each chunk as inside packed documents, and queries scaled by position get the true ones
               (hf_layers.py)
  sinks        gpt-oss's per-head attention sinks (s_aux) go to the strategy, which merges them into its
               global softmax (kernels.merge_sinks)
  soft-capping Gemma 2's attention logit soft-capping (`softcap`) goes to the kernels, which cap every
               block's scores; its final logit soft-capping is applied where the adapter makes logits
               (`output_softcap`: the chunked and vocabulary-parallel losses, generation)
  semantics    what the kernels do not compute is refused, never dropped: additive position biases,
               bidirectional attention, dropout
  labels       HF's own loss would shift labels inside a shard: the adapter calls the decoder and computes
               the loss from labels shifted before sharding (the trainer's chunked loss)
  tp           model/hf_tensor.py: Megatron's split with sequence parallelism, by module names
  rope length  a RoPE that rescales itself by each call's largest position (dynamic NTK, longrope) would
               differ by shard, micro-batch and packing: `pin_rope_length` makes it see one length
"""

from __future__ import annotations

import contextvars
import json
import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .._optional import require
from ..config import ConfigError, ParallelConfig
from ..parallel.data_parallel import apply_data_parallel, resolve_engine
from ..parallel.dims import ParallelDims, ParallelMesh
from ..parallel.sequence.api import ContextParallelAttention
from ..parallel.sequence.schedule import local_attention
from ..parallel.tensor import local_tensor
from .hf_checks import (
    _check_semantics,
    attention_modules,
    check_hf_dir,
    check_hf_model,
    check_hf_rope,
    check_pipeline_split,
    output_scale,
    position_dependent_rope,
    rope_base,
)
from .hf_layers import attention_chunk, chunk_documents, layer_window, retemper_queries
from .hf_tensor import apply_hf_tensor_parallel, check_hf_tp

ATTN_IMPLEMENTATION = "longctx"
# whether the decoder call in progress (HFCausalLM.hidden) hands its attention calls packed documents: a layer
# that drops the attention kwargs (Nemotron's, StableLM's) is then found, not run across the documents
_SENDS_DOCUMENTS = contextvars.ContextVar("longctx_sends_documents", default=False)


class AttentionCores:
    """The cores one attention module uses, one per sliding window it is called with."""

    def __init__(self, strategy: str, group, layout: str, kernel: str, cp: int):
        self.strategy, self.group, self.layout, self.kernel, self.cp = strategy, group, layout, kernel, cp
        self._by_window: dict = {}

    def __call__(self, q, k, v, *, scale, window, documents, sinks=None, chunk=None, softcap=None):
        if chunk is not None:  # chunked attention: each chunk (inside each packed document) alone
            documents = chunk_documents(documents, q.shape[1] * self.cp, chunk)
        if self.cp == 1:
            if documents is not None or sinks is not None:
                return local_attention(q, k, v, causal=True, window=window, kernel=self.kernel, documents=documents,
                                       scale=scale, sinks=sinks, softcap=softcap)
            return kernels.attention(q, k, v, scale=scale, mask=kernels.Mask.from_flags(True, window),
                                     backend=self.kernel, softcap=softcap)
        if window not in self._by_window:
            self._by_window[window] = ContextParallelAttention(self.strategy, self.group, causal=True,
                                                               kernel=self.kernel, window=window, layout=self.layout,
                                                               check_positions=False)
        return self._by_window[window](q, k, v, scale=scale, documents=documents, sinks=sinks, softcap=softcap)


def longctx_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      **kwargs):
    """transformers' attention-function signature: (B, H, S, D) in, ((B, S, H, D) out, no weights)."""
    cores = getattr(module, "_longctx_cores", None)
    if cores is None:
        raise RuntimeError(f"{type(module).__name__} runs attn_implementation='longctx' but was not prepared for it; "
                           "call longctx.model.hf.parallelize_hf(model, dims, cfg) first")
    if dropout:
        raise ValueError("attention dropout is not supported by the longctx attention; set the model config's "
                         "attention_dropout to 0")
    _check_semantics(module, kwargs)
    if "longctx_positions" not in kwargs and _SENDS_DOCUMENTS.get():
        raise ConfigError(f"{type(module).__name__}'s decoder layer does not hand its attention the keyword arguments "
                          "it is called with, so the boundaries of the documents packed in a sequence (or of a "
                          "left-padded prompt's padding) cannot reach longctx's attention, which would attend across "
                          "them; train this architecture on unpacked data (data.source=synthetic, or a retrieval "
                          "source with data.pack_min=0), and generate one prompt at a time")
    if attention_mask is not None:  # transformers builds none for this implementation: the module made its own
        raise ValueError(f"{type(module).__name__} hands its attention a mask of its own (as Doge's dynamic mask), "
                         "which longctx's kernels do not compute (they apply the causal, window and document rules "
                         "themselves); train this architecture with another attn_implementation")
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
    device = q.device.type
    if torch.is_autocast_enabled(device):
        # under autocast with float32 weights RoPE's float32 tables make q and k float32 while v stays bf16;
        # torch's SDPA (what HF would run) casts all three to the autocast dtype, and so does this
        dtype = torch.get_autocast_dtype(device)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    window = layer_window(module, sliding_window)
    q = retemper_queries(module, q, kwargs.get("longctx_positions"))
    # attention sinks (gpt-oss passes its per-head `sinks` parameter as s_aux): under tensor parallelism
    # this rank's heads' part
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    out = cores(q, k, v, scale=scaling if scaling is not None else q.shape[-1] ** -0.5, window=window,
                documents=kwargs.get("longctx_documents"), sinks=None if sinks is None else local_tensor(sinks),
                chunk=attention_chunk(module), softcap=kwargs.get("softcap"))
    return out, None


def register_attention() -> None:
    """Make attn_implementation="longctx" known to transformers (idempotent)."""
    transformers = require("transformers", "Hugging Face models")
    transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, longctx_attention)


class SkippedLayer(nn.Module):
    """Stands in for a decoder layer another pipeline stage owns: hands the hidden states on. The decoder
    keeps its full list, so every kept layer keeps its index (the per-layer types Qwen2 and Gemma3 look up
    by it) and its parameter names equal the unsplit model's."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class HFCausalLM(nn.Module):
    """The trainer's view of a transformers causal LM: forward(tokens, position_ids, labels=, loss_fn=,
    documents=) like longctx's Transformer. `cfg` is the longctx ModelConfig read from the HF config.
    A pipeline stage (`pipeline_stage`) is this adapter with parts removed, as for longctx's Llama."""

    def __init__(self, hf_model: nn.Module, cfg=None):
        super().__init__()
        self.hf = hf_model
        self.tied_names = None  # a pipeline stage of a tied model: (embedding, head) names in self.hf
        self.cfg = cfg if cfg is not None else model_config(hf_model.config)

    @property
    def layers(self):
        return self.hf.model.layers

    @property
    def blocks(self) -> list[nn.Module]:
        """The decoder layers this module computes (all but a pipeline stage's skipped ones)."""
        return [layer for layer in self.layers if not isinstance(layer, SkippedLayer)]

    @property
    def output(self):
        """The output projection; None on a pipeline stage before the last."""
        return self.hf.lm_head

    @property
    def output_softcap(self) -> float | None:
        """The output logits' soft-capping (Gemma 2's final_logit_softcapping), which the CausalLM's own forward
        would apply and the adapter's logits and losses therefore apply; None when the model has none."""
        return kernels.check_softcap(getattr(self.hf.config, "final_logit_softcapping", None))

    def logits(self, h):
        """The output logits of final hidden states h, scaled (Cohere, Granite) and soft-capped (Gemma 2) as the
        model's own forward does."""
        out = self.hf.lm_head(h)
        scale, cap = output_scale(self.hf.config), self.output_softcap
        if scale is not None:
            out = out * scale
        return out if cap is None else kernels.soft_cap(out, cap)[0]

    def loss(self, h, labels, loss_fn):
        """loss_fn of the final hidden states h with the model's logit transforms: a scale of the logits is
        one of h (logits = (s h) W^T), the cap is the loss function's `softcap`. The forward with labels and the
        pipeline schedule's loss on the last stage both come here."""
        scale = output_scale(self.hf.config)
        return loss_fn(h if scale is None else h * scale, self.hf.lm_head.weight, labels, softcap=self.output_softcap)

    def tied_head(self) -> tuple[str, str] | None:
        """(embedding name, output head name) in this module when the head is the embedding's parameter."""
        if self.hf.lm_head is None or self.hf.model.embed_tokens is None:
            return None
        if self.hf.lm_head.weight is not self.hf.model.embed_tokens.weight:
            return None
        return "hf.model.embed_tokens.weight", "hf.lm_head.weight"

    def pipeline_stage(self, layers: range, *, first: bool, last: bool) -> HFCausalLM:
        """A copy keeping only decoder `layers`, the embedding when `first`, the final norm and the output
        projection when `last`. A tied output head becomes a copy of its own in the last stage (equal at
        the start; longctx.parallel.tied keeps it equal); `stage.tied_names` then names the pair."""
        import copy

        stage = copy.deepcopy(self)
        tied = self.tied_head()
        stage.tied_names = tuple(n.removeprefix("hf.") for n in tied) if tied else None
        decoder = stage.hf.model
        for i in range(len(decoder.layers)):
            if i not in layers:
                decoder.layers[i] = SkippedLayer()
        if not first:
            decoder.embed_tokens = None
        if not last:
            decoder.norm = nn.Identity()  # a stage before the last hands on the un-normed residual stream
            stage.hf.lm_head = None
        return stage

    def hidden(self, tokens, rope_ids, documents=None):
        """The decoder's final hidden states; rope_ids (B, S): each token's RoPE position. Without an
        embedding (a pipeline stage after the first) `tokens` are the previous stage's hidden states."""
        # the true positions reach the attention calls (kwargs pass through the decoder layers) for what a module
        # derives from them itself (hf_layers.retemper_queries)
        extra = {"longctx_positions": rope_ids}
        if documents is not None:
            extra["longctx_documents"] = documents
        if self.hf.model.embed_tokens is None:
            extra["inputs_embeds"] = tokens
        else:
            extra["input_ids"] = tokens
        sending = _SENDS_DOCUMENTS.set(documents is not None)
        try:
            return self.hf.model(position_ids=rope_ids.to(tokens.device), use_cache=False, **extra).last_hidden_state
        finally:
            _SENDS_DOCUMENTS.reset(sending)

    def forward(self, tokens, position_ids=None, labels=None, loss_fn=None, documents=None,
                return_hidden: bool = False):
        b, s = tokens.shape[:2]
        pos = torch.arange(s, device=tokens.device) if position_ids is None else position_ids
        rope = documents.rope_positions(pos) if documents is not None else pos.reshape(1, -1)
        h = self.hidden(tokens, rope.expand(b, -1), documents)
        if return_hidden or self.hf.lm_head is None:
            return h
        if labels is None:
            return self.logits(h)
        if loss_fn is None:
            return F.cross_entropy(self.logits(h).flatten(0, 1).float(), labels.flatten(), reduction="sum")
        # under tp, h is this rank's sequence shard, which the vocabulary-parallel loss gathers once
        return self.loss(h, labels, loss_fn)

    def generate(self, prompts, **kwargs):
        """Continue prompts (list of 1-D token tensors): longctx.model.generate.generate with this model's
        layers (context-parallel prefill, tree-attention decoding over the same ranks)."""
        from .generate import generate

        return generate(self, prompts, **kwargs)


def use_longctx_attention(model: nn.Module) -> None:
    """Make a transformers model dispatch its attention to longctx (what each module then runs is its
    `_longctx_cores`)."""
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


def prepare_attention(model: nn.Module, strategy: str, group, layout: str | None, kernel: str, cp: int) -> None:
    """Point every attention module of a transformers model at longctx attention: `strategy` over `group`
    (cp ranks; cp=1: this process alone)."""
    from ..parallel.sequence.registry import get_strategy

    use_longctx_attention(model)
    layout = get_strategy(strategy).layout(layout)
    for m in attention_modules(model):
        m._longctx_cores = AttentionCores(strategy, group, layout, kernel, cp)


def pin_rope_length(model: nn.Module, length: int) -> None:
    """Make a RoPE that follows each forward call's largest position (transformers' dynamic_rope_update:
    dynamic NTK scaling, longrope's long/short factors) see `length` in every call (or the call's own
    length when longer). Each call then rotates by the frequencies one unpacked `length`-token sequence gets,
    whatever part of it this rank holds, whichever micro-batch and whatever documents it was packed from, so
    every layout, accumulation and resume computes the same step; RoPEs that do not rescale are untouched."""
    kind = position_dependent_rope(model.config)
    if kind is None:
        return
    found = [m for m in model.modules() if hasattr(m, "rope_type") and hasattr(m, "original_max_seq_len")]
    if not found:
        raise ValueError(f"{type(model).__name__} has rope_type={kind!r} but no rotary-embedding module longctx "
                         "recognises (attributes rope_type and original_max_seq_len); use a static RoPE scaling in "
                         "its config.json")
    for rotary in found:
        rotary._longctx_rope_length = int(length)
        rotary.forward = types.MethodType(_rope_at_length, rotary)  # bound: deepcopy (pipeline stages) rebinds it


def _rope_at_length(rotary, x, position_ids, *args, **kwargs):
    # one extra position, length - 1, sets the length dynamic_rope_update reads; its cos/sin are dropped
    # (each position's angles are its own product with the frequencies, so the others do not change)
    last = torch.full_like(position_ids[..., :1], rotary._longctx_rope_length - 1)
    cos, sin = type(rotary).forward(rotary, x, torch.cat([position_ids, last], dim=-1), *args, **kwargs)
    return cos[..., :-1, :], sin[..., :-1, :]


def model_config(hf_config):
    """longctx's ModelConfig with the sizes of an HF config (heads, FLOPs and checks read these)."""
    from ..config import ModelConfig
    from .hf_flops import active_ffn_width, attention_layers

    heads = hf_config.num_attention_heads
    layers = attention_layers(hf_config)
    # one head width and K/V head count for the checks (RoPE, tp): latent attention's q/k width (its config's
    # head_dim is the RoPE part only), the largest of layers that differ (Gemma 4); FLOPs and memory floors
    # read every layer's
    widest = max(layer["qk_dim"] for layer in layers)
    return ModelConfig(vocab_size=hf_config.vocab_size, dim=hf_config.hidden_size,
                       n_layers=hf_config.num_hidden_layers, n_heads=heads,
                       n_kv_heads=max(layer["kv_heads"] for layer in layers),  # per layer in Gemma 4's
                       head_dim=None if widest * heads == hf_config.hidden_size else widest,
                       ffn_dim=active_ffn_width(hf_config),
                       rope_theta=float(rope_base(hf_config)),
                       norm_eps=float(getattr(hf_config, "rms_norm_eps", 1e-5)))


def load_hf_model(path: str, dtype=torch.float32):
    """The causal LM saved in a local directory, with attn_implementation='longctx'."""
    check_hf_dir(path)
    transformers = require("transformers", "Hugging Face models")
    register_attention()
    with open(os.path.join(path, "config.json")) as f:
        arch = json.load(f).get("architectures") or ["?"]
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, output_loading_info=True,
            ignore_mismatched_sizes=True)  # reported below by name and shape, not in a log and a traceback
    except ValueError as e:
        raise ValueError(f"model.hf_path={path!r} ({arch[0]}): {e}") from None
    except (RuntimeError, OSError) as e:  # a missing shard, say: the files, not longctx
        said = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.hf_path={path!r} ({arch[0]}): its weights cannot be loaded ({said}); give the "
                          "directory save_pretrained wrote") from None
    except Exception as e:  # noqa: BLE001 - safetensors' own SafetensorError (an empty or cut file)
        if "safetensor" not in type(e).__name__.lower():
            raise
        raise ConfigError(f"model.hf_path={path!r} ({arch[0]}): its safetensors cannot be read ({e}); save the "
                          "model again with save_pretrained") from None
    # transformers initialises what the files lack (or hold in another shape) at random, saying so in a log
    # line: that would train a model that is not theirs
    mismatched = sorted(info.get("mismatched_keys") or ())  # (name, shape stored, shape its config makes)
    if mismatched:
        name, stored, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ConfigError(f"model.hf_path={path!r} ({arch[0]}): its weight {name} has shape {tuple(stored)} where its "
                          f"config.json makes it {tuple(wanted)}{more}; give the directory save_pretrained wrote")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ConfigError(f"model.hf_path={path!r} ({arch[0]}) has no weights for {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}; its weight files do not match its config.json "
                          "(give the directory save_pretrained wrote)")
    return model


def parallelize_hf(model: nn.Module, dims: ParallelDims, cfg=None, *, mesh: ParallelMesh | None = None,
                   param_dtype=None, rope_length: int | None = None):
    """The pipeline split, tensor parallelism, context parallelism (any strategy), activation checkpointing
    and data parallelism (FSDP2/DDP; DeepSpeed ZeRO is applied by the trainer), in that order, for a
    transformers causal LM; returns a Plan whose model is an HFCausalLM adapter around it (under pp > 1, as
    for `parallelize`, a ModuleList of this rank's stages, each an adapter with parts removed). rope_length:
    the sequence length a self-rescaling RoPE is pinned to (`pin_rope_length`; the trainer passes
    train.seq_len); without it such a RoPE is refused under cp > 1."""
    from .parallelize import apply_activation_checkpointing, assemble_plan, pipeline_stages

    cfg = getattr(cfg, "parallel", cfg) or ParallelConfig()
    register_attention()
    check_hf_model(model)
    c = model.config
    if dims.pp > 1:
        check_pipeline_split(type(model.model))
    if rope_length is None:
        check_hf_rope(c, dims.cp)
    check_hf_tp(model_config(c), dims.tp)
    dims.check_heads(c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    mesh = mesh or dims.build_mesh()
    engine = resolve_engine(cfg.engine, dims)
    adapter = HFCausalLM(model)
    modules, ids, n_stages = pipeline_stages(adapter, len(adapter.layers), dims, cfg, mesh)
    for module in modules:
        if rope_length is not None:
            pin_rope_length(module.hf, rope_length)
        if dims.tp > 1:
            apply_hf_tensor_parallel(module.hf, mesh.tp)
        prepare_attention(module.hf, dims.strategy, mesh.cp_group() if dims.cp > 1 else None, dims.layout,
                          cfg.kernel, dims.cp)
        apply_activation_checkpointing(module, cfg.activation_checkpoint, cfg.ac_every, blocks=module.blocks)
        if engine != "deepspeed":  # DeepSpeed wraps the adapter itself (deepspeed_engine.initialize, by the trainer)
            apply_data_parallel(module, mesh, engine, reshard_after_forward=cfg.reshard_after_forward,
                                param_dtype=param_dtype,
                                keep_root_unsharded=dims.pp > 1 and module.output is not None,
                                find_unused=True)  # arbitrary modelling code: a trainable parameter may get none
    return assemble_plan(adapter, modules, ids, n_stages, dims, mesh, engine, cfg)
