"""Vision Transformer, with parameter names that follow big_vision's ViT.

The names (`embedding`, `pos_embedding`, `Transformer/encoderblock_N/...`,
`MAPHead_0/probe`, `head`) match big_vision so released SigLIP `.npz` weights map
onto this module one to one. The encoder pieces here are shared with the text tower;
the layers every model shares are in `mmjax.models.layers`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models.layers import ACT_AXES, MlpBlock, MultiHeadDotProductAttention, dense, layer_norm
from mmjax.ops.attention import warn_once

# big_vision's ViT family: width, depth, MLP width and heads per variant name.
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def decode_variant(variant: str | None) -> dict[str, int]:
  """`"B/16"` -> width, depth, mlp_dim, num_heads and patch_size; `"B"` omits the patch."""
  if variant is None:
    return {}
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ConfigError(f"model variant {variant!r}: unknown size {name!r}; known: {sorted(VARIANTS)}")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    out["patch_size"] = int(patch)
  return out


# Output projection of a tower: "dense" (with bias, big_vision), "linear" (no bias, CLIP's
# `proj`) or "none" (the pooled features are the embedding, SigLIP's image tower).
HEADS = ("dense", "linear", "none")


def tower_head(module: nn.Module, x):
  """Applies `module.head` projecting to `module.num_classes` (None: no projection)."""
  if module.head not in HEADS:
    raise ConfigError(f"head={module.head!r}; known: {HEADS}")
  if module.head == "none" or not module.num_classes:
    return x
  return dense(module.num_classes, ("embed", "proj"), "head", module.dtype, use_bias=module.head == "dense")(x)


class PatchEmbed(nn.Module):
  """A stride-`patch_size` VALID convolution with `nn.Conv`'s parameters (`kernel`
  [p, p, channels, width], `bias`), computed as one matmul over the flattened patches, which
  XLA:CPU runs faster than the convolution (benchmarks/RESULTS.md)."""
  width: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image):
    """NHWC images -> [batch, h, w, width]; or patches already cut ([batch, n, p * p * channels],
    each flattened row by row, channels last: NaFlex) -> [batch, n, width]."""
    p = self.patch_size
    channels = image.shape[-1] // (p * p) if image.ndim == 3 else image.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               (None, None, None, "embed")),
                        (p, p, channels, self.width))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (self.width,))
    if image.ndim == 3:
      if image.shape[-1] != p * p * channels:
        raise ConfigError(f"NaFlex patches have {image.shape[-1]} values each; patch_size={p} needs a multiple "
                          f"of {p * p}")
      return image @ kernel.reshape(-1, self.width).astype(self.dtype) + bias.astype(self.dtype)
    batch, height, width, _ = image.shape
    h, w = height // p, width // p  # VALID: a remainder narrower than a patch is dropped.
    patches = image[:, :h * p, :w * p].reshape(batch, h, p, w, p, channels)
    x = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(self.dtype))
    return x + bias.astype(self.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)).

  With `keep` (token indices [batch], or [batch, k]) only the tokens `keep[b]` of each example
  are computed: their queries attend to every key (causal: the keys up to them), and the output
  is [batch, 1 or k, width]. With `segments` ([batch, seq] ids: packed sequences) a token
  attends only to tokens of its own segment. Returns `(x, None)`, the (carry, output) pair
  `nn.scan` expects.
  """
  mlp_dim: int
  num_heads: int
  causal: bool = False
  act: str = "gelu_tanh"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, deterministic=True, keep=None, segments=None):
    x = nn.with_logical_constraint(x, ACT_AXES)
    y = layer_norm("LayerNorm_0", self.dtype, self.norm_eps)(x)
    impl = self.attention_impl
    if keep is not None and self.causal and impl != "xla":
      # The kept queries sit at per-example positions; the kernels' causal mask knows only the
      # end-aligned one. So few queries cost little on XLA's path.
      warn_once(f"attention_impl={impl!r}: the last block of a causal tower pooled at one token per "
                 "caption attends with the xla path (its causal mask follows the pooled token's position)")
      impl = "xla"
    attention = MultiHeadDotProductAttention(self.num_heads, self.dtype, impl, name="MultiHeadDotProductAttention_0")
    if keep is None:
      y = attention(y, causal=self.causal, q_segment_ids=segments, kv_segment_ids=segments)
    else:
      keep = keep.reshape(keep.shape[0], -1)
      x = take_tokens(x, keep)
      mask = jnp.arange(y.shape[1]) <= keep[:, None, :, None] if self.causal else None
      kept_segments = None if segments is None else jnp.take_along_axis(segments, keep, axis=1)
      y = attention(take_tokens(y, keep), y, mask=mask, q_segment_ids=kept_segments,
                    kv_segment_ids=segments)
    x = x + nn.Dropout(self.dropout)(y, deterministic)
    y = layer_norm("LayerNorm_1", self.dtype, self.norm_eps)(x)
    y = MlpBlock(self.mlp_dim, self.act, self.dropout, self.dtype, name="MlpBlock_0")(y, deterministic)
    x = x + nn.Dropout(self.dropout)(y, deterministic)
    return nn.with_logical_constraint(x, ACT_AXES), None


def take_tokens(x, index):
  """`x[b, index[b]]` for each example, as [batch, 1, width] (index [batch]) or [batch, k, width]
  (index [batch, k])."""
  return jnp.take_along_axis(x, index.reshape(index.shape[0], -1)[..., None], axis=1)


class Encoder(nn.Module):
  """A stack of blocks and a final LayerNorm; optionally `nn.scan`ned and rematerialised.

  `keep` (token indices [batch] or [batch, k]): only those tokens are read from the output, so
  the last block computes just them (output [batch, 1 or k, width], and so are the last
  `blockNN` and `pre_norm` aux entries). A CLIP tower pooled at one token saves most of a
  block's work. A scanned stack without remat then scans the first depth - 1 layers and runs
  the last on its slice of the stacked parameters (the same module, so parameter and module
  paths do not change). The slices cost up to a copy of the stacked parameters, which for
  SigLIP B/16's rematerialised towers was more than the activations saved
  (`benchmarks/RESULTS.md`), so with remat the scanned stack computes every token.

  `segments` ([batch, seq] ids of packed sequences): every block masks attention to each
  token's own segment (`Encoder1DBlock`).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  causal: bool = False
  act: str = "gelu_tanh"
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, deterministic=True, keep=None, segments=None):
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"remat_policy={self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
    block_kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, causal=self.causal, act=self.act,
                    dropout=self.dropout, dtype=self.dtype, attention_impl=self.attention_impl,
                    norm_eps=self.norm_eps)
    block = Encoder1DBlock
    if self.remat_policy != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan,
                       static_argnums=(2,))
    aux = {}
    if self.scan:
      x = self._scanned(block(name="encoderblock", **block_kw), x, deterministic, keep, segments)
    else:
      for i in range(self.depth):
        last = keep if i == self.depth - 1 else None
        x, _ = block(name=f"encoderblock_{i}", **block_kw)(x, deterministic, last, segments)
        aux[f"block{i:02d}"] = x
      if keep is not None and not self.depth:
        x = take_tokens(x, keep)
    aux["pre_norm"] = x
    return layer_norm("encoder_norm", self.dtype, self.norm_eps)(x), aux

  def _scanned(self, block, x, deterministic, keep, segments):
    """`block` (one module, parameters stacked over layers) scanned over the stack; with `keep`
    and no remat, over all but the last layer, which then computes the kept tokens alone.
    Initialisation always scans the whole stack, so both paths read the same parameters."""
    def stack(length):
      return nn.scan(lambda module, carry, _: module(carry, deterministic, None, segments),
                     variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True}, length=length,
                     metadata_params={nn.PARTITION_NAME: "layers"})

    if keep is None:
      return stack(self.depth)(block, x, None)[0]
    if not self.depth or self.is_initializing() or self.remat_policy != "none":
      return take_tokens(stack(self.depth)(block, x, None)[0], keep)
    # Slicing would run any stack; the whole scan would have refused a wrong one.
    layers = {p.shape[0] for p in jax.tree.leaves(self.variables["params"][block.name])}
    if layers != {self.depth}:
      raise ConfigError(f"{'/'.join(self.path + (block.name,))}: parameters stacked over {sorted(layers)} "
                        f"layers; the model has depth={self.depth}")
    if self.depth > 1:
      x, _ = nn.map_variables(stack(self.depth - 1), "params", trans_in_fn=_layers_but_last)(block, x, None)
    run_last = nn.map_variables(lambda module, x: module(x, deterministic, keep, segments), "params",
                                trans_in_fn=_last_layer)
    return run_last(block, x)[0]


def _layers_but_last(params):
  return jax.tree.map(lambda p: p[:-1], params)


def _last_layer(params):
  # Unboxed first: the sliced parameter loses the `layers` axis its partitioning names.
  return jax.tree.map(lambda p: p[-1], nn.meta.unbox(params))


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  mlp_dim: int
  num_heads: int
  act: str = "gelu_tanh"
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, segments=None, slots: int = 1):
    """[batch, width]; with `segments` ([batch, seq]: 1..`slots`, 0 for padding), [batch, slots, width]:
    one probe per segment, attending to its tokens only (NaFlex padding, packed images)."""
    batch, _, width = x.shape
    probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                             (None, None, "embed")), (1, 1, width))
    probe = jnp.tile(probe, (batch, 1 if segments is None else slots, 1)).astype(x.dtype)
    kw = {} if segments is None else dict(
        q_segment_ids=jnp.tile(jnp.arange(1, slots + 1, dtype=jnp.int32), (batch, 1)),
        kv_segment_ids=segments.astype(jnp.int32))
    x = MultiHeadDotProductAttention(self.num_heads, self.dtype, self.attention_impl,
                                     name="MultiHeadDotProductAttention_0")(probe, x, **kw)
    y = layer_norm("LayerNorm_0", self.dtype, self.norm_eps)(x)
    x = x + MlpBlock(self.mlp_dim, self.act, dtype=self.dtype, name="MlpBlock_0")(y)
    return x[:, 0] if segments is None else x


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
  """Fixed 2-D sine-cosine position embedding, [1, h*w, width]."""
  if width % 4:
    raise ConfigError(f"sincos2d position embedding needs width divisible by 4, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  emb = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(emb[None], jnp.float32)


def resize_posemb(grid_embedding, sizes, index):
  """[batch, n, width]: a learned [G, G, width] position grid resized to each token's image (`sizes`
  [batch, n, 2]: its h, w patches; traced, so images of any shape share one program), read at the
  token's place in its image (`index` [batch, n], row by row; padding tokens give 0, position (0, 0)).

  Bilinear with antialiasing, as PIL and torch's `interpolate(antialias=True)` resize: along each
  axis, output i reads the inputs under a triangle filter centred on (i + 0.5) * G / n - 0.5 and
  widened by the downscaling factor G / n when it exceeds 1, the weights normalised to sum to 1."""
  g = grid_embedding.shape[0]
  position, sizes = _row_col(index, sizes)
  scale = g / sizes
  support = jnp.maximum(scale, 1.0)
  centre = (position + 0.5) * scale - 0.5
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(jnp.arange(g, dtype=jnp.float32) - centre[..., None]) / support[..., None])
  weights = weights / weights.sum(axis=-1, keepdims=True)  # [batch, n, 2, G]
  return jnp.einsum("bni,bnj,ijd->bnd", weights[..., 0, :], weights[..., 1, :],
                    grid_embedding.astype(jnp.float32))


def _row_col(index, sizes):
  """`(position, sizes)`, float32 [batch, n, 2] each: the (row, column) of the patch at `index` (row by
  row) of an image of `sizes` patches, and those sizes at least 1 (an empty slot's padding must not
  divide by 0)."""
  sizes = jnp.maximum(sizes.astype(jnp.float32), 1.0)
  index = index.astype(jnp.float32)
  row = jnp.floor(index / sizes[..., 1])
  return jnp.stack([row, index - row * sizes[..., 1]], axis=-1), sizes


def patch_centres(index, sizes):
  """[batch, n, 2]: the centre (y, x) of the patch at `index` (row by row) of an image of `sizes` [batch,
  n, 2] patches, in fractions of the image's height and width."""
  position, sizes = _row_col(index, sizes)
  return (position + 0.5) / sizes


def packed_segments(grid, length: int):
  """Where each of `length` tokens belongs when a row holds the patches of up to k images one after
  another (`grid` [batch, k, 2]: each slot's h, w patches; an empty slot's is (0, 0)): `(segments
  [batch, n]` (slot + 1; 0 for the padding after the last image), `index` [batch, n] (place in its
  image), `sizes` [batch, n, 2] (its image's grid))."""
  areas = grid[..., 0] * grid[..., 1]
  ends = jnp.cumsum(areas, axis=-1)
  token = jnp.arange(length)[None, :]
  slot = (token[..., None] >= ends[:, None, :]).sum(axis=-1)  # Empty slots are skipped over.
  segments = jnp.where(slot < grid.shape[1], slot + 1, 0)
  slot = jnp.minimum(slot, grid.shape[1] - 1)
  start = jnp.take_along_axis(ends - areas, slot, axis=1)
  index = jnp.where(segments > 0, token - start, 0)
  return segments, index, jnp.take_along_axis(grid, slot[..., None], axis=1)


# Pools that read one token; a tower asked for its pooled output only computes that token last.
SINGLE_TOKEN_POOLS = ("tok", "first", "last", "eos", "argmax")


class ViT(nn.Module):
  """ViT image encoder: `(images NHWC) -> (head output or pooled features, aux)`."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  posemb: str = "learn"
  pool: str = "map"
  pre_norm: bool = False  # CLIP's `ln_pre`: a LayerNorm on the tokens before the encoder.
  num_classes: int | None = None
  head: str = "dense"
  act: str = "gelu_tanh"
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  norm_eps: float = 1e-6
  # NaFlex (SigLIP 2): images at their own aspect ratio, as padded sequences of patches (`__call__`),
  # with learned positions on a `posemb_grid` x `posemb_grid` grid resized to each image's patches.
  naflex: bool = False
  posemb_grid: int = 16

  @property
  def features_width(self) -> int:
    return self.width

  @nn.compact
  def __call__(self, image, train=False, pooled_only=False, token_mask=None):
    """`image`: NHWC images; with `naflex`, dict(patches=[batch, n, p * p * 3] (each image's patches
    row by row, then padding), grid=int [batch, 2] (its h, w patches; h * w <= n)). A packed batch
    (`mmjax.data.packing.pack_images`) has grid [batch, k, 2]: up to k images per row, their patches one
    after another, and comes out as [batch, k, ...] (an empty slot's grid is (0, 0)).
    `pooled_only`: the caller reads only the pooled output and `aux["pre_logits"]`, so a tower
    pooled at one token computes its last block for that token alone.
    `token_mask` (bool [batch, patches]: masked prediction): those patches' embeddings are replaced by a
    learned `mask_token` before positions are added."""
    if self.naflex:
      x, segments, slots, centres = self._naflex_tokens(image, token_mask)
      if self.pool not in ("map", "gap"):
        raise ConfigError(f"model.image.naflex pools with 'map' or 'gap'; got pool={self.pool!r}")
    else:
      x, centres = self._grid_tokens(jnp.asarray(image, self.dtype), token_mask)
      segments = slots = None
    batch = x.shape[0]

    if self.pool == "tok":
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, self.width))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
      centres = jnp.concatenate([jnp.full((batch, 1, 2), 0.5), centres], axis=1)
    if self.pre_norm:
      x = layer_norm("pre_norm", self.dtype, self.norm_eps)(x)

    x = nn.Dropout(self.dropout)(x, not train)
    # An index per example, as nn.remat traces every argument it is not told is static.
    keep = jnp.zeros(batch, jnp.int32) if pooled_only and self.pool in SINGLE_TOKEN_POOLS else None
    # NaFlex: each image is a segment (1, 2, ...); padding is one of its own (0), which no image token attends to.
    x, aux = Encoder(self.depth, self.mlp_dim, self.num_heads, act=self.act, dropout=self.dropout,
                     scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
                     attention_impl=self.attention_impl, norm_eps=self.norm_eps,
                     name="Transformer")(x, not train, keep, segments)
    if keep is None:
      aux["encoded"], aux["centres"] = x, centres
    if segments is not None:
      aux["segments"] = segments
    x = pool_tokens(self, x, self.pool, token_index=0, segments=segments, slots=slots or 1)
    if slots is None and segments is not None:
      x = x[:, 0]
    aux["pre_logits"] = x
    x = tower_head(self, x)
    return x, aux

  def _mask_tokens(self, x, token_mask):
    if token_mask is None:
      return x
    token = self.param("mask_token", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed",)),
                       (self.width,))
    return jnp.where(token_mask[..., None], token.astype(x.dtype), x)

  def _grid_tokens(self, image, token_mask=None):
    """`(tokens [batch, h * w, width], centres [batch, h * w, 2])`: the patches of fixed-size images with
    their position embeddings, and each patch's centre (y, x) in fractions of the image."""
    x = PatchEmbed(self.width, self.patch_size, self.dtype, name="embedding")(image)
    batch, h, w, _ = x.shape
    x = self._mask_tokens(x.reshape(batch, h * w, self.width), token_mask)
    if self.posemb == "learn":
      pos = self.param("pos_embedding",
                       nn.with_logical_partitioning(nn.initializers.normal(stddev=self.width ** -0.5),
                                                    (None, None, "embed")), (1, h * w, self.width))
    elif self.posemb == "sincos2d":
      pos = posemb_sincos_2d(h, w, self.width)
    else:
      raise ConfigError(f"model.image.posemb={self.posemb!r}; use 'learn' or 'sincos2d'")
    index = jnp.broadcast_to(jnp.arange(h * w), (batch, h * w))
    return x + pos.astype(x.dtype), patch_centres(index, jnp.broadcast_to(jnp.array([h, w]), (batch, h * w, 2)))

  def _naflex_tokens(self, image, token_mask=None):
    """`(tokens [batch, n, width], segments [batch, n], slots, centres [batch, n, 2])` of NaFlex patch
    sequences: each token's image slot + 1 (0: padding), the slots per row of a packed batch (None: one
    image per row), and each token's centre (y, x) in fractions of its image."""
    if not isinstance(image, dict) or set(image) != {"patches", "grid"}:
      raise ConfigError("model.image.naflex takes dict(patches=[batch, n, p * p * 3], grid=[batch, 2]) "
                        "(mmjax.data.transforms.NaFlexPatches makes them)")
    if self.posemb != "learn":
      raise ConfigError(f"model.image.naflex resizes learned position embeddings; got posemb={self.posemb!r}")
    patches, grid = jnp.asarray(image["patches"], self.dtype), jnp.asarray(image["grid"], jnp.int32)
    x = self._mask_tokens(PatchEmbed(self.width, self.patch_size, self.dtype, name="embedding")(patches), token_mask)
    g = self.posemb_grid
    pos = self.param("pos_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(stddev=self.width ** -0.5),
                                                  (None, None, "embed")), (1, g * g, self.width))
    slots = grid.shape[1] if grid.ndim == 3 else None
    segments, index, sizes = packed_segments(grid if slots else grid[:, None], x.shape[1])
    x = x + resize_posemb(pos.reshape(g, g, self.width), sizes, index).astype(x.dtype)
    return x, segments, slots, patch_centres(index, sizes)


def pool_tokens(module: nn.Module, x, pool: str, token_index, segments=None, slots: int = 1):
  """Pools [batch, seq, width] tokens; `token_index` is an int, a per-example index [batch], or
  several per example [batch, k] (then [batch, k, width] comes back: packed sequences). `segments`
  ([batch, seq]: 1..`slots` for the images packed in a row, 0 for padding) pools `map` and `gap` per
  segment, as [batch, slots, width].

  Called from inside a compact module so `map` creates `MAPHead_0` under it.
  """
  if pool == "map":
    return MAPHead(module.mlp_dim, module.num_heads, module.act, module.dtype, module.attention_impl,
                   module.norm_eps, name="MAPHead_0")(x, segments, slots)
  if pool == "gap":
    if segments is None:
      return jnp.mean(x, axis=1)
    weights = (segments[..., None] == jnp.arange(1, slots + 1)).astype(x.dtype)  # [batch, seq, slots]
    return jnp.einsum("bns,bnd->bsd", weights, x) / jnp.maximum(weights.sum(axis=1), 1.0)[..., None]
  if pool == "none":
    return x
  if pool in SINGLE_TOKEN_POOLS:
    if isinstance(token_index, int):
      return x[:, token_index]
    tokens = take_tokens(x, token_index)
    return tokens if token_index.ndim == 2 else tokens[:, 0]
  raise ConfigError(f"pool={pool!r}; known: {', '.join(SINGLE_TOKEN_POOLS)}, gap, map, none")
