"""What the Hugging Face adapter refuses rather than computes wrongly, checked before anything runs (or at
the attention call, for what a module asks of it): config keys whose effect the kernels or the adapter
would skip, attention arguments beyond plain causal softmax attention, decoders that rescale their input
embeddings (under pipeline stages), RoPE that follows each call's positions (under context parallelism),
and checkpoint directories without config or weights."""

from __future__ import annotations

import inspect
import math
import os
import re

from torch import nn

from .._optional import require

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# the adapter computes logits and the loss from lm_head(hidden) itself, so a CausalLM forward's own logit
# transforms never run: it applies the ones transformers' families use, read from the config (output_scale;
# final_logit_softcapping in HFCausalLM.output_softcap), and attention soft-capping reaches the kernels as the
# call's `softcap`

# the layer types whose attention longctx computes: causal softmax attention over every earlier key, over a
# window of them (the window is passed per call), or inside chunks (Llama 4: hf_layers.attention_chunk).
# Another type means a mask or a mixer of its own (linear attention, sparse or compressed attention) that
# would silently become full causal attention, since the adapter takes no mask from transformers.
_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")

# what an attention module can ask of the interface beyond softmax(q k^T * scale) v under a causal/window mask
_UNSUPPORTED = {"position_bias": "an additive position bias", "head_mask": "a head mask"}


def _check_semantics(module, kwargs) -> None:
    for key, what in _UNSUPPORTED.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"{type(module).__name__} asks for {what} ({key}=...), which the longctx kernels do not "
                             "compute; train this architecture with another attn_implementation, or disable it "
                             "in the model config")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError(f"{type(module).__name__} attends bidirectionally (is_causal=False); longctx trains causal "
                         "language models")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that dispatch through transformers' attention interface (their forward looks it up)."""
    found = []
    for m in model.modules():
        fwd = getattr(type(m), "forward", None)
        if hasattr(m, "layer_idx") and fwd is not None and "ALL_ATTENTION_FUNCTIONS" in _source(fwd):
            found.append(m)
    return found


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


# a decoder forward that rescales its input embeddings itself (Granite's embedding_multiplier, HyperCLOVAX):
# a pipeline stage after the first gets the previous stage's hidden states as inputs_embeds and would
# rescale them again
_RESCALES_INPUT = re.compile(r"\binputs_embeds\s*[*/]|\bhidden_states\s*=\s*hidden_states\s*[*/]")


def check_pipeline_split(decoder_cls: type) -> None:
    """Refuse pipeline stages for a decoder whose forward changes the input embeddings before its layers, or
    whose final norm is not `self.norm` (a stage before the last replaces it by an identity by that name;
    Phi's final_layernorm would normalise every stage's output)."""
    source = _source(decoder_cls.forward)
    before_layers = source.split("self.layers", 1)[0]
    if _RESCALES_INPUT.search(before_layers):
        raise ValueError(f"{decoder_cls.__name__} rescales its input embeddings inside its forward, so every pipeline "
                         "stage would rescale the hidden states it is handed again; set parallel.pp=1 for this model")
    if "self.norm(" not in source:
        raise ValueError(f"{decoder_cls.__name__} applies no final norm named `norm`, which pipeline stages before the "
                         "last leave out by that name (each would normalise the hidden states it hands on); set "
                         "parallel.pp=1 for this model")


def decoder_class(hf_config) -> type:
    """The decoder (base model) class transformers builds for a config."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    return MODEL_MAPPING[type(hf_config)]


def check_hf_model(model: nn.Module) -> None:
    if not getattr(model, "_supports_attention_backend", False) or not attention_modules(model):
        raise ValueError(f"{type(model).__name__} does not route its attention through transformers' "
                         "AttentionInterface, so attn_implementation='longctx' cannot take it over; use an "
                         "architecture that does (Llama, Qwen2, Mistral, ...)")
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise ValueError(f"{type(model).__name__} is not a causal LM with .model (the decoder) and .lm_head")
    # the loss reads lm_head.weight alone (chunked or split by vocabulary, never all logits at once): a bias (Phi)
    # or a head of its own (Dory's learned per-token logit scale) would be dropped from the loss
    head = model.lm_head
    extra = [name for name, _ in head.named_parameters() if name != "weight"]
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward or extra:
        with_extra = f" with {', '.join(extra)}" if extra else ""
        raise ValueError(f"{type(model).__name__}'s output head is a {type(head).__name__}{with_extra}, not a "
                         "bias-free Linear: longctx computes the loss from lm_head.weight alone and would leave the "
                         "rest out; use an architecture whose lm_head is nn.Linear(bias=False)")
    # what the adapter drives: the decoder's embedding and its list of layers (OPT keeps them under .decoder,
    # ModernBERT's decoder names its embedding otherwise)
    missing = [name for name in ("embed_tokens", "layers") if not hasattr(model.model, name)]
    if missing:
        raise ValueError(f"{type(model).__name__}'s decoder ({type(model.model).__name__}) has no "
                         f"{', '.join(missing)}: longctx drives decoders laid out as Llama's (embed_tokens, layers); "
                         "use an architecture that is")
    check_hf_config(model.config)


def _arch(hf_config) -> str:
    """The architecture a config names (its class name when it names none), for messages."""
    return (getattr(hf_config, "architectures", None) or [type(hf_config).__name__])[0]


# the sizes longctx reads from a config (model_config), and an MLP width under one of its names
_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def check_hf_config(hf_config) -> None:
    """Refuse a config whose architecture asks for what longctx would silently skip, or lacks the sizes it
    reads."""
    arch = _arch(hf_config)
    missing = [key for key in _SIZES if getattr(hf_config, key, None) is None]
    if all(getattr(hf_config, key, None) is None for key in ("intermediate_size", "ffn_dim", "moe_intermediate_size")):
        missing.append("intermediate_size")  # an MLP width: dense, or its experts' (Solar Open has only that)
    if missing:
        raise ValueError(f"{arch}'s config has no {', '.join(missing)}: longctx reads a decoder's sizes under the "
                         "names Llama's config uses; use an architecture whose config has them")
    other = sorted(set(getattr(hf_config, "layer_types", None) or ()) - set(_LAYER_TYPES))
    if other:
        raise ValueError(f"{arch} has layers of type {', '.join(other)} (config.json layer_types): longctx computes "
                         f"{', '.join(_LAYER_TYPES)} layers only, and would run these as full causal attention "
                         "silently; train this architecture another way, or a variant of it without those layers")
    if getattr(hf_config, "attention_dropout", 0.0):  # longctx's attention drops nothing: it would train another way
        raise ValueError(f"{arch} has attention_dropout={hf_config.attention_dropout} (config.json): longctx's "
                         "attention applies no dropout; set attention_dropout to 0 in its config.json (in a copy of "
                         "the directory)")
    output_scale(hf_config)


# which way a family's CausalLM applies config.logits_scaling (by model_type prefix): Granite's families (and
# MiniCPM3, to the final hidden states) divide by it, HyperCLOVAX multiplies
_LOGITS_SCALING = {"granite": "divide", "minicpm": "divide", "hyperclovax": "multiply"}


def output_scale(hf_config) -> float | None:
    """The factor a CausalLM's forward multiplies its logits by: Cohere's `logit_scale` times Granite's
    `logits_scaling` inverted (or HyperCLOVAX's, not inverted); None when 1."""
    scale = 1.0
    for key in ("logit_scale", "logits_scaling"):
        value = getattr(hf_config, key, None)
        if value is None or (key == "logits_scaling" and value == 1):
            continue
        invert = key == "logits_scaling" and _logits_scaling_divides(hf_config, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                (invert and value == 0):
            raise ValueError(f"{_arch(hf_config)} has {key}={value!r}: the output logits would not be finite; set "
                             f"a {'nonzero ' if invert else ''}finite {key} in its config.json")
        scale = scale / value if invert else scale * value
    return None if scale == 1.0 else float(scale)


def _logits_scaling_divides(hf_config, value) -> bool:
    model_type = str(getattr(hf_config, "model_type", ""))
    for prefix, how in _LOGITS_SCALING.items():
        if model_type.startswith(prefix):
            return how == "divide"
    raise ValueError(f"{_arch(hf_config)} has logits_scaling={value!r}, and longctx does not know whether its forward "
                     f"multiplies or divides the logits by it (model_type {model_type!r}; Granite divides, HyperCLOVAX "
                     "multiplies): train it with logits_scaling=1, or add its model_type to "
                     "longctx.model.hf_checks._LOGITS_SCALING")


# RoPE types whose frequencies transformers recomputes from the largest position id of each forward call
# (dynamic_rope_update): "dynamic" NTK scaling grows them with it, "longrope" picks its long or short factors
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_types(hf_config) -> list[str]:
    """The config's RoPE type(s): one, or one per layer type (Gemma3's sliding and full layers)."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if "rope_type" in params or "type" in params:
        return [params.get("rope_type", params.get("type"))]
    return [p.get("rope_type", p.get("type", "default")) for p in params.values() if isinstance(p, dict)]


def rope_base(hf_config) -> float:
    """The RoPE base of an HF config: transformers 5 keeps it in rope_parameters (per layer type for models with
    several: the full-attention layers'), older configs as rope_theta; 10000 where neither says."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if "rope_theta" not in params:  # {layer type: parameters} (Gemma 3's sliding and full layers)
        params = params.get("full_attention") or next((v for v in params.values() if isinstance(v, dict)), {})
    return params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0


def position_dependent_rope(hf_config) -> str | None:
    """The config's RoPE type whose frequencies follow each call's largest position, or None."""
    return next((str(k) for k in rope_types(hf_config) if any(d in str(k) for d in _POSITION_DEPENDENT_ROPE)), None)


def check_hf_rope(hf_config, cp: int, what: str = "parallel.cp") -> None:
    """Under context parallelism each rank's forward sees its own positions, so a RoPE whose frequencies
    follow the largest position of the call would rotate each rank's tokens by other frequencies: refused
    where nothing pins its length (training pins it to train.seq_len, perplexity to --seq-len)."""
    kind = position_dependent_rope(hf_config) if cp > 1 else None
    if kind is not None:
        arch = _arch(hf_config)
        raise ValueError(f"{arch} has rope_type={kind!r}, whose frequencies follow the largest position each "
                         f"forward call sees; split over {what}={cp} context ranks, each rank sees other positions "
                         "and would rotate its tokens by other frequencies. Use a static RoPE scaling in its "
                         "config.json (rope_type linear, yarn or llama3, with the factor for the length you use), "
                         f"or {what}=1")


def check_generation_rope(hf_config) -> None:
    """Generation (any number of ranks) cannot pin a self-rescaling RoPE: each forward's frequencies would follow
    the batch's longest (padded) row and the cached length of earlier calls, so a prompt's continuation would
    depend on the other prompts and on what ran before."""
    kind = position_dependent_rope(hf_config)
    if kind is not None:
        raise ValueError(f"{_arch(hf_config)} has rope_type={kind!r}, whose frequencies follow the largest position "
                         "each forward call sees: a generated continuation would depend on the other prompts of the "
                         "batch and on earlier calls. Use a static RoPE scaling in its config.json (rope_type "
                         "linear, yarn or llama3) to generate with longctx, or transformers' own generate")


def model_eos_ids(path: str) -> list[int]:
    """The end-of-sequence ids a Hugging Face model directory declares (generation_config.json first, as
    transformers' generate reads them, else config.json), as a list (eos_token_id may be one id or several)."""
    import json

    for name in ("generation_config.json", "config.json"):
        try:
            with open(os.path.join(path, name)) as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def check_hf_dir(path: str) -> None:
    """A local checkpoint directory: config.json and weights (nothing is downloaded)."""
    if not os.path.isdir(path):
        raise ValueError(f"model.hf_path={path!r} is not a directory; give a local Hugging Face checkpoint directory "
                         "(config.json + safetensors); nothing is downloaded")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"model.hf_path={path!r} has no config.json; give the directory save_pretrained wrote")
    if not any(os.path.exists(os.path.join(path, w)) for w in _WEIGHTS):
        raise ValueError(f"model.hf_path={path!r} has config.json but no weights ({', '.join(_WEIGHTS[:2])}); "
                         "save the model with save_pretrained")


def read_hf_config(path: str):
    check_hf_dir(path)
    transformers = require("transformers", "Hugging Face models")
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # a config.json that is not JSON, or of an unknown model_type
        raise ValueError(f"model.hf_path={path!r}: its config.json cannot be read ({str(e).splitlines()[0][:200]}); "
                         "give the directory save_pretrained wrote") from None
