"""Text transformer: token + learned position embedding and the ViT's encoder blocks.

CLIP style: causal mask, pooled at the end-of-text token (`pool="eos"`, or `"argmax"`: the
highest token id, open_clip's rule for OpenAI's vocabulary).
SigLIP style: no mask, pooled at the last position (`pool="last"`) or by `map`.
Names follow big_vision's text tower (`Embed_0`, `pos_embedding`, `Encoder_0`, `head`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.packing import check_packable
from mmjax.errors import ConfigError, DataError
from mmjax.models.vit import SINGLE_TOKEN_POOLS, Encoder, pool_tokens, tower_head


class TokenEmbed(nn.Embed):
  """`nn.Embed` that looks token ids up in a table whose `embed` dimension is whole.

  The table's `vocab` rows stay split (over `tensor`): each shard looks up the ids in its own
  rows and the shards' partial lookups are summed, so the embeddings come out split like the
  ids, over the batch. Gathered from a table whose `embed` dimension is split too (over
  `fsdp`), they would come out split over their features, and on a data x fsdp x tensor mesh
  XLA reaches the batch-split activations from there only by replicating them ("Involuntary
  full rematerialization", forward and backward).

  Concrete ids (an eager `model.apply`) are checked: a non-integer dtype or an id outside
  [0, vocab) raises DataError naming the module, the id, its position and the vocabulary size.
  Under jit the ids are tracers and go unchecked: `jnp.take` returns NaN rows for ids >= vocab
  or < -vocab (a NaN loss, at which the trainer stops) and silently reads ids in [-vocab, 0)
  from the end of the table; the tokenizers only make ids in range.
  """

  def __call__(self, inputs):
    if not isinstance(inputs, jax.core.Tracer) and getattr(inputs, "is_fully_addressable", True):
      self._check_ids(np.asarray(inputs))
    table = nn.with_logical_constraint(jnp.asarray(self.embedding, self.dtype), ("vocab", None))
    return jnp.take(table, inputs, axis=0)

  def _check_ids(self, ids: np.ndarray) -> None:
    where = "/".join(self.path) or type(self).__name__
    if not np.issubdtype(ids.dtype, np.integer):
      raise DataError(f"{where}: token ids must be integers, got dtype {ids.dtype}")
    bad = np.argwhere((ids < 0) | (ids >= self.num_embeddings))
    if len(bad):
      first = tuple(bad[0].tolist())
      raise DataError(f"{where}: token id {ids[first]} at {first} is outside the vocabulary [0, "
                      f"{self.num_embeddings}) ({len(bad)} of {ids.size} ids are)")


class TextTransformer(nn.Module):
  """`(token ids [batch, seq] int32) -> (head output or pooled features, aux)`."""
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_len: int = 64
  pool: str = "last"
  causal: bool = False
  eos_id: int = 2
  num_classes: int | None = None
  head: str = "dense"
  act: str = "gelu_tanh"
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, text, train=False, pooled_only=False, packing=None):
    """`pooled_only`: the caller reads only the pooled output and `aux["pre_logits"]`, so a
    tower pooled at one token computes its last block for that token alone.

    `packing`: `text` holds captions packed k per row (`mmjax.data.packing`), and this dict
    their `positions`, `segments` and `pool` columns (other keys are ignored); the output is
    then [rows, k, ...], one entry per segment."""
    if text.shape[1] > self.max_len:
      raise ConfigError(f"text length {text.shape[1]} exceeds model.text.max_len={self.max_len}")
    embed = TokenEmbed(self.vocab_size, self.width, dtype=self.dtype, name="Embed_0",
                       embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                                   ("vocab", "embed")))
    x = embed(text)
    pos = self.param("pos_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(stddev=self.width ** -0.5),
                                                  (None, None, "embed")), (1, self.max_len, self.width))
    if packing is None:
      x = x + pos[:, :text.shape[1]].astype(x.dtype)
      pooled_token, segments = self._pooled_token(text), None
    else:
      check_packable(self.causal, self.pool, "/".join(self.path) or "TextTransformer")
      x = x + pos[0, packing["positions"]].astype(x.dtype)
      pooled_token, segments = packing["pool"], packing["segments"]
    x = nn.Dropout(self.dropout)(x, not train)
    keep = None
    if pooled_only and self.pool in SINGLE_TOKEN_POOLS:  # The encoder returns that token alone.
      keep = jnp.broadcast_to(jnp.asarray(pooled_token, jnp.int32) % text.shape[1],
                              text.shape[:1] + jnp.shape(pooled_token)[1:])
    x, aux = Encoder(self.depth, self.mlp_dim, self.num_heads, causal=self.causal, act=self.act,
                     dropout=self.dropout, scan=self.scan, remat_policy=self.remat_policy,
                     dtype=self.dtype, attention_impl=self.attention_impl, norm_eps=self.norm_eps,
                     name="Encoder_0")(x, not train, keep, segments)
    if keep is None:
      aux["encoded"] = x
      x = pool_tokens(self, x, self.pool, pooled_token)
    elif keep.ndim == 1:  # The encoder returned each example's pooled token alone; packed rows keep one per segment.
      x = x[:, 0]
    aux["pre_logits"] = x
    return tower_head(self, x), aux

  def _pooled_token(self, text):
    """The index of the token a single-token pool reads: an int, or one per example."""
    if self.pool == "eos":
      # The first end-of-text token; a sequence truncated without one pools its last position.
      is_eos = text == self.eos_id
      return jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), text.shape[1] - 1)
    if self.pool == "argmax":  # open_clip's default: OpenAI's end-of-text has the highest id.
      return jnp.argmax(text, axis=1)
    return {"first": 0, "last": -1}.get(self.pool, 0)
