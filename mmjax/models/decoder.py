"""Decoder-only language model (GPT-2, Llama and Gemma families) with a functional KV cache.

The forward pass, top to bottom: token embedding (`embed`, or embeddings given by the caller)
-> learned absolute positions (`positions="learn"`) -> `depth` pre-norm `DecoderBlock`s named
`layers_0`, `layers_1`, ... (self-attention with optional RoPE and grouped-query heads, then an
MLP) -> final norm -> output projection (tied to the embedding or a separate `lm_head`).
A model that interleaves its own blocks (Flamingo's cross-attention) reuses `DecoderBlock` and
`block_inputs`. Key/value projection heads carry the logical axis name `kv_heads`.

KV cache (`Decoder.init_cache`): a plain pytree passed to `__call__` and returned in
`aux["cache"]`, nothing mutable::

  {"index": int32 [],                 # cache slots filled so far (the same for every row)
   "pos": int32 [batch],              # position of each row's next token
   "mask": bool [batch, max_len],     # which filled slots hold real tokens (not padding)
   "layers": ({"key": [batch, max_len, kv_heads, head_dim], "value": ...}, ...)}  # per block

Every row writes its tokens to the same slots, so batched prompts are left-padded (padding
masked out, positions counted over real tokens only). Writing past `max_len` is not checked
under jit; size the cache for the prompt plus every token to decode.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.config import as_dict
from mmjax.errors import ConfigError
from mmjax.models.layers import ACT_AXES, ACTIVATIONS, dense
from mmjax.models.text import TokenEmbed
from mmjax.models.vit import REMAT_POLICIES
from mmjax.ops.attention import IMPLS, dot_product_attention

LM_ACTIVATIONS = {**ACTIVATIONS, "silu": nn.silu, "relu": nn.relu}
POSITIONS = ("rope", "learn")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("mlp", "gated")
_INIT = nn.initializers.normal(stddev=0.02)


def _dense(features, axes, name, dtype, use_bias):
  return dense(features, axes, name, dtype, kernel_init=_INIT, use_bias=use_bias)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, statistics in float32; `plus_one` applies `1 + scale` (Gemma)."""
  eps: float = 1e-6
  plus_one: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],))
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


def make_norm(kind: str, eps: float, plus_one: bool, dtype, name: str) -> nn.Module:
  if kind == "rmsnorm":
    return RMSNorm(eps, plus_one, dtype, name=name)
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name, use_fast_variance=False,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def apply_rope(x, positions, theta: float):
  """Rotary position embedding of `x` [batch, seq, heads, head_dim] at `positions` [batch, seq].

  HF Llama's rotate-half convention: dimension i is rotated with i + head_dim/2 by the angle
  position / theta^(2i/head_dim). Computed in float32.
  """
  dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class SelfAttention(nn.Module):
  """Causal multi-head self-attention with `num_kv_heads` key/value heads (grouped-query when fewer).

  `query/key/value/out` are `nn.Einsum`s in flax's layout (`[embed, heads, head_dim]`,
  `[heads, head_dim, embed]`); key/value heads carry the logical name `kv_heads`.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float | None = None
  use_bias: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, positions, mask, *, causal, cache=None, index=None):
    width = x.shape[-1]

    def proj(name, heads, axes):
      return nn.Einsum((width, heads, self.head_dim), "bld,dhk->blhk", use_bias=self.use_bias, dtype=self.dtype,
                       name=name, kernel_init=nn.with_logical_partitioning(_INIT, axes),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))(x)

    q = proj("query", self.num_heads, ("embed", "heads", "kv"))
    k = proj("key", self.num_kv_heads, ("embed", "kv_heads", "kv"))
    v = proj("value", self.num_kv_heads, ("embed", "kv_heads", "kv"))
    if self.rope_theta is not None:
      q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), (0, index, 0, 0))
      cache = {"key": k, "value": v}
    group = self.num_heads // self.num_kv_heads
    if group > 1:  # query head j reads key/value head j // group, as HF's repeat_kv.
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    y = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, causal=causal,
                              impl=self.attention_impl)
    out = nn.Einsum((self.num_heads, self.head_dim, width), "blhk,hkd->bld", use_bias=self.use_bias,
                    dtype=self.dtype, name="out",
                    kernel_init=nn.with_logical_partitioning(_INIT, ("heads", "kv", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(y)
    return out, cache


class FeedForward(nn.Module):
  """`kind="mlp"`: fc2(act(fc1(x))) (GPT-2); `"gated"`: down(act(gate(x)) * up(x)) (Llama, Gemma)."""
  mlp_dim: int
  kind: str = "gated"
  act: str = "silu"
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width, act = x.shape[-1], LM_ACTIVATIONS[self.act]
    if self.kind == "gated":
      h = act(_dense(self.mlp_dim, ("embed", "mlp"), "gate", self.dtype, self.use_bias)(x))
      h = h * _dense(self.mlp_dim, ("embed", "mlp"), "up", self.dtype, self.use_bias)(x)
      return _dense(width, ("mlp", "embed"), "down", self.dtype, self.use_bias)(h)
    h = act(_dense(self.mlp_dim, ("embed", "mlp"), "fc1", self.dtype, self.use_bias)(x))
    return _dense(width, ("mlp", "embed"), "fc2", self.dtype, self.use_bias)(h)


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)).

  `__call__(x, positions, mask, *, causal, cache, index, train)` -> `(x, layer cache or None)`;
  `mask` is the boolean attention mask broadcastable to [batch, heads, q_len, kv_len].
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float | None = None
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  norm_plus_one: bool = False
  mlp: str = "gated"
  act: str = "silu"
  attention_bias: bool = False
  mlp_bias: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, positions, mask, *, causal=True, cache=None, index=None, train=False):
    x = nn.with_logical_constraint(x, ACT_AXES)
    y = make_norm(self.norm, self.norm_eps, self.norm_plus_one, self.dtype, "attention_norm")(x)
    y, cache = SelfAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta, self.attention_bias,
                             self.dtype, self.attention_impl, name="attention")(
                                 y, positions, mask, causal=causal, cache=cache, index=index)
    x = x + nn.Dropout(self.dropout)(y, not train)
    y = make_norm(self.norm, self.norm_eps, self.norm_plus_one, self.dtype, "mlp_norm")(x)
    y = FeedForward(self.mlp_dim, self.mlp, self.act, self.mlp_bias, self.dtype, name="feed_forward")(y)
    x = x + nn.Dropout(self.dropout)(y, not train)
    return nn.with_logical_constraint(x, ACT_AXES), cache


def block_inputs(mask, cache=None, positions=None):
  """`(positions, attention mask, causal, cache key mask)` for the blocks, given the padding `mask` [batch, seq].

  Positions default to the number of real tokens before each one (after the cache's `pos`).
  Without a cache: a key-padding mask and `causal=True`. With one: the tokens go to slots
  `index...`, query i (slot index + i) sees the real tokens in slots up to its own, and the
  cache's updated `mask` [batch, max_len] is returned too (else None). Shared with models that
  run `DecoderBlock`s in their own loop.
  """
  if positions is None:
    start = 0 if cache is None else cache["pos"][:, None]
    positions = start + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  if cache is None:
    return positions, mask[:, None, None, :], True, None
  index = cache["index"]
  key_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
  visible = jnp.arange(key_mask.shape[1])[None, :] <= index + jnp.arange(mask.shape[1])[:, None]
  return positions, key_mask[:, None, None, :] & visible[None, None], False, key_mask


class Decoder(nn.Module):
  """`(tokens [batch, seq] int32) -> (logits [batch, seq, vocab] float32, aux)`; see the module docstring."""
  vocab_size: int = 256
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: num_heads (plain multi-head attention).
  head_dim: int | None = None  # None: width // num_heads.
  mlp_dim: int = 256
  max_len: int = 128  # Size of the learned position table; RoPE models are not limited by it.
  positions: str = "rope"
  rope_theta: float = 10000.0
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  norm_plus_one: bool = False  # RMSNorm scales by 1 + scale (Gemma).
  mlp: str = "gated"
  act: str = "silu"
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_embeddings: bool = False
  scale_embeddings: bool = False  # Token embeddings times sqrt(width) (Gemma).
  dropout: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat_policy: str = "none"  # Rematerialises each block in training (vit.REMAT_POLICIES).

  def __post_init__(self):
    _validate(self)
    super().__post_init__()

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.width // self.num_heads

  def setup(self):
    self.embedder = TokenEmbed(self.vocab_size, self.width, dtype=self.dtype,
                               embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")))
    if self.positions == "learn":
      self.pos_embedding = self.param("pos_embedding", nn.with_logical_partitioning(_INIT, (None, "embed")),
                                      (self.max_len, self.width))
    self.layers = [DecoderBlock(self.num_heads, self.kv_heads, self.dims_per_head, self.mlp_dim,
                                self.rope_theta if self.positions == "rope" else None, self.norm, self.norm_eps,
                                self.norm_plus_one, self.mlp, self.act, self.attention_bias, self.mlp_bias,
                                self.dropout, self.dtype, self.attention_impl) for _ in range(self.depth)]
    self.embed_dropout = nn.Dropout(self.dropout)
    self.final_norm = make_norm(self.norm, self.norm_eps, self.norm_plus_one, self.dtype, None)
    if not self.tie_embeddings:
      self.lm_head = _dense(self.vocab_size, ("embed", "vocab"), None, self.dtype, use_bias=False)

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt and generated)."""
    if self.positions == "learn" and max_len > self.max_len:
      raise ConfigError(f"cache length {max_len} exceeds the learned position table (max_len={self.max_len})")
    kv = jnp.zeros((batch, max_len, self.kv_heads, self.dims_per_head), self.dtype)
    return {"index": jnp.zeros((), jnp.int32), "pos": jnp.zeros((batch,), jnp.int32),
            "mask": jnp.zeros((batch, max_len), bool),
            "layers": tuple({"key": kv, "value": kv} for _ in range(self.depth))}

  def embed(self, tokens):
    """Token embeddings [batch, seq, width] in the compute dtype, as `__call__` uses them."""
    x = self.embedder(tokens)
    return x * jnp.asarray(self.width ** 0.5, x.dtype) if self.scale_embeddings else x

  def __call__(self, tokens, *, positions=None, mask=None, cache=None, inputs_embeds=None, train=False):
    """Logits for every position; `inputs_embeds` [batch, seq, width] replaces `embed(tokens)`.

    `mask` [batch, seq] marks real tokens (False: padding, never attended to). `positions`
    default to the count of real tokens before each one (plus the cache's `pos`). With a
    `cache` the tokens are written at slot `cache["index"]` and attend to every real token
    before them; `aux["cache"]` is the updated cache. `aux["hidden"]`: final normed states.
    """
    x, block_kw, state = self.prepare(tokens, mask=mask, positions=positions, cache=cache,
                                      inputs_embeds=inputs_embeds, train=train)
    layer_caches = state["layer_caches"]
    for i in range(self.depth):
      x, layer_caches[i] = self.run_block(i, x, block_kw, layer_caches[i], train)
    return self.finish(x, block_kw, state, cache)

  def run_block(self, i: int, x, block_kw: dict, cache=None, train: bool = False):
    """`(x, layer cache)` of block `i`, rematerialised by `remat_policy` when there is no cache.
    Shared with models that run the blocks in their own loop (Flamingo)."""
    block = self.layers[i]
    if self.remat_policy == "none" or cache is not None:
      return block(x, **block_kw, cache=cache, train=train)
    causal, index = block_kw["causal"], block_kw["index"]  # Python values: static inside the remat.
    run = nn.remat(lambda module, x, positions, mask: module(x, positions, mask, causal=causal, index=index,
                                                              train=train),
                   policy=REMAT_POLICIES[self.remat_policy])
    return run(block, x, block_kw["positions"], block_kw["mask"])

  def prepare(self, tokens, *, mask=None, positions=None, cache=None, inputs_embeds=None, train=False):
    """`(x, block_kw, state)`: embedded inputs, the keyword arguments of every `DecoderBlock`
    call, and what `finish` needs (state["layer_caches"]: one entry per block, to fill in).
    Shared with models that run the blocks in their own loop (Flamingo)."""
    x = self.embed(tokens) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    mask = jnp.ones(x.shape[:2], bool) if mask is None else jnp.asarray(mask, bool)
    positions, attn_mask, causal, key_mask = block_inputs(mask, cache, positions)
    if self.positions == "learn":
      if cache is None and x.shape[1] > self.max_len:
        raise ConfigError(f"sequence length {x.shape[1]} exceeds the learned position table (max_len={self.max_len})")
      x = x + self.pos_embedding.astype(x.dtype)[positions]
    x = self.embed_dropout(x, not train)
    block_kw = {"positions": positions, "mask": attn_mask, "causal": causal,
                "index": None if cache is None else cache["index"]}
    state = {"token_mask": mask, "key_mask": key_mask,
             "layer_caches": [None] * self.depth if cache is None else list(cache["layers"])}
    return x, block_kw, state

  def finish(self, x, block_kw: dict, state: dict, cache):
    """`(logits float32, aux)` from the last block's output; see `__call__`."""
    x = self.final_norm(x)
    logits = self.embedder.attend(x) if self.tie_embeddings else self.lm_head(x)
    aux = {"hidden": x}
    if cache is not None:
      next_pos = jnp.max(jnp.where(state["token_mask"], block_kw["positions"] + 1, 0), axis=1)
      aux["cache"] = {"index": cache["index"] + x.shape[1], "pos": jnp.maximum(cache["pos"], next_pos),
                      "mask": state["key_mask"], "layers": tuple(state["layer_caches"])}
    return logits.astype(jnp.float32), aux


def _validate(m: Decoder):
  choices = {"positions": POSITIONS, "norm": NORMS, "mlp": MLPS, "act": tuple(LM_ACTIVATIONS),
             "attention_impl": IMPLS, "remat_policy": tuple(REMAT_POLICIES)}
  for key, allowed in choices.items():
    if getattr(m, key) not in allowed:
      raise ConfigError(f"decoder {key}={getattr(m, key)!r}; known: {list(allowed)}")
  if m.head_dim is None and m.width % m.num_heads:
    raise ConfigError(f"decoder width {m.width} is not divisible by num_heads {m.num_heads} (or set head_dim)")
  if m.num_heads % m.kv_heads:
    raise ConfigError(f"decoder num_heads {m.num_heads} is not a multiple of num_kv_heads {m.kv_heads}")
  if m.positions == "rope" and m.dims_per_head % 2:
    raise ConfigError(f"decoder positions='rope' needs an even head dimension, got {m.dims_per_head}")


_FIELDS = tuple(f.name for f in dataclasses.fields(Decoder) if f.name not in ("parent", "name"))
# The keys of a decoder config: the Decoder's fields, and `variant`, a name in DECODER_VARIANTS.
DECODER_KEYS = _FIELDS + ("variant",)

_LLAMA_BLOCK = dict(positions="rope", norm="rmsnorm", mlp="gated", act="silu")
# Named decoder shapes (`model.lm.variant`, or `model.variant` of kind "lm"); the config's own keys override them.
DECODER_VARIANTS = {
    # The small decoder of the shapes generative recipes; its vocabulary is the tokenizer's.
    "shapes": dict(width=128, depth=2, num_heads=4, mlp_dim=256, max_len=64, **_LLAMA_BLOCK),
    "llama2-7b": dict(vocab_size=32000, width=4096, depth=32, num_heads=32, num_kv_heads=32, mlp_dim=11008,
                      max_len=4096, rope_theta=10000.0, norm_eps=1e-5, **_LLAMA_BLOCK),
    # Llama's block at MPT-1B's width, depth and heads (MPT-1B is the LM of OpenFlamingo-3B).
    "llama-1b": dict(vocab_size=32000, width=2048, depth=24, num_heads=16, num_kv_heads=16, mlp_dim=5632,
                     max_len=2048, rope_theta=10000.0, norm_eps=1e-5, **_LLAMA_BLOCK),
}


def decoder_config(**overrides) -> dict:
  """Every `Decoder` key with its default (dtype as a name), updated by `overrides`."""
  unknown = sorted(set(overrides) - set(_FIELDS))
  if unknown:
    raise ConfigError(f"unknown decoder config key(s) {unknown}; known: {sorted(_FIELDS)}")
  defaults = {f.name: f.default for f in dataclasses.fields(Decoder) if f.name in _FIELDS}
  defaults["dtype"] = jnp.dtype(defaults["dtype"]).name
  return {**defaults, **overrides}


def expand_variant(cfg: Mapping[str, Any]) -> dict:
  """A decoder config with its `variant` replaced by the keys DECODER_VARIANTS gives it, under the
  config's own; a key set to None is unset (the variant's value, else the Decoder's default)."""
  cfg = as_dict(cfg)
  variant = cfg.pop("variant", None)
  if variant is not None and variant not in DECODER_VARIANTS:
    raise ConfigError(f"decoder variant={variant!r}; known: {sorted(DECODER_VARIANTS)}")
  return {**DECODER_VARIANTS.get(variant, {}), **{k: v for k, v in cfg.items() if v is not None}}


def build_decoder(cfg: Mapping[str, Any]) -> Decoder:
  """A `Decoder` from a (possibly partial) config dict or ConfigDict (keys: DECODER_KEYS); unknown keys
  raise ConfigError."""
  cfg = decoder_config(**expand_variant(cfg))
  return Decoder(**{**cfg, "dtype": jnp.dtype(cfg["dtype"])})
