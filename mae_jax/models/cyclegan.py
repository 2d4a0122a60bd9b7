"""CycleGAN networks (Zhu et al. 2017, appendix 7.2; the official `networks.py`), in Flax NNX, NHWC.

ResNet generator: c7s1-ngf, d2ngf, d4ngf, R4ngf × n_blocks, u2ngf, ungf, c7s1-C with tanh — 7×7
convolutions after reflection padding, 3×3 stride-2 down-sampling, residual blocks of two 3×3
reflection-padded convolutions, 3×3 stride-2 transposed convolutions (output twice the input, as
torch's padding=1, output_padding=1), instance normalisation without affine parameters (the
official `norm='instance'`), ReLU. 9 blocks at 256 px, 6 at 128 px (the official defaults).

Feature branch (USFM §4.1.2, Fig. 5b): with `feat_dim` > 0 the generator takes features of a frozen
pretrained encoder (N, h, w, feat_dim); they are resized bilinearly to the generator encoder's grid
(S/4), concatenated with its 4·ngf channels, and a 1×1 convolution + instance norm + ReLU fuses
them back to 4·ngf channels before the residual blocks (USFM only says the features are "combined
... at the channel level"; the fusing convolution keeps the residual blocks at their published width
whatever the encoder's width).

PatchGAN discriminator: C64 (no norm) - C128 - C256 - C512 (stride 1) - 1 channel, 4×4 kernels,
LeakyReLU 0.2, instance norm: with `n_layers` = 3 every output sees a 70×70 patch; 1 → 16×16,
2 → 34×34 (for small images). Weights ~ N(0, 0.02), biases 0 (the official `init_type='normal'`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_INIT = nnx.initializers.normal(0.02)


def _norm(ch: int, rngs):
  """torch InstanceNorm2d(affine=False): per image and channel over H, W, biased variance."""
  return nnx.InstanceNorm(ch, epsilon=1e-5, use_scale=False, use_bias=False, rngs=rngs)


def _conv(cin, cout, k, *, stride=1, padding="REFLECT", rngs):
  """REFLECT: the official reflection padding before each stride-1 convolution ('same' size)."""
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=padding, kernel_init=_INIT,
                  bias_init=nnx.initializers.zeros, rngs=rngs)


class ResBlock(nnx.Module):
  def __init__(self, ch: int, *, rngs: nnx.Rngs):
    self.c1, self.n1 = _conv(ch, ch, 3, rngs=rngs), _norm(ch, rngs)
    self.c2, self.n2 = _conv(ch, ch, 3, rngs=rngs), _norm(ch, rngs)

  def __call__(self, x):
    y = jax.nn.relu(self.n1(self.c1(x)))
    return x + self.n2(self.c2(y))


def resize_features(feats, size: tuple[int, int]):
  """(N, h, w, D) → (N, H, W, D), bilinear (half-pixel centres; antialiased when shrinking)."""
  if feats.shape[1:3] == tuple(size):
    return feats
  return jax.image.resize(feats, (feats.shape[0], *size, feats.shape[-1]), "linear")


class ResnetGenerator(nnx.Module):
  def __init__(self, in_ch: int = 1, out_ch: int = 1, ngf: int = 64, n_blocks: int = 9,
               feat_dim: int = 0, *, rngs: nnx.Rngs):
    self.feat_dim = feat_dim
    self.c_in = _conv(in_ch, ngf, 7, rngs=rngs)
    self.down1 = _conv(ngf, 2 * ngf, 3, stride=2, padding=((1, 1), (1, 1)), rngs=rngs)
    self.down2 = _conv(2 * ngf, 4 * ngf, 3, stride=2, padding=((1, 1), (1, 1)), rngs=rngs)
    self.norms = nnx.List([_norm(c, rngs) for c in (ngf, 2 * ngf, 4 * ngf, 2 * ngf, ngf)])
    if feat_dim:
      self.fuse = _conv(4 * ngf + feat_dim, 4 * ngf, 1, rngs=rngs)
      self.fuse_norm = _norm(4 * ngf, rngs)
    self.blocks = nnx.List([ResBlock(4 * ngf, rngs=rngs) for _ in range(n_blocks)])
    # torch ConvTranspose2d(k=3, s=2, padding=1, output_padding=1) = a stride-2 dilated input
    # padded (1, 2) then a 3×3 convolution with the flipped kernel: padding ((1, 2), (1, 2)) here.
    self.up1 = nnx.ConvTranspose(4 * ngf, 2 * ngf, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)),
                                 kernel_init=_INIT, bias_init=nnx.initializers.zeros, rngs=rngs)
    self.up2 = nnx.ConvTranspose(2 * ngf, ngf, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)),
                                 kernel_init=_INIT, bias_init=nnx.initializers.zeros, rngs=rngs)
    self.c_out = _conv(ngf, out_ch, 7, rngs=rngs)

  def __call__(self, x, feats=None):
    """x: (N, S, S, C) in [-1, 1]; feats: (N, h, w, feat_dim) when the generator has a feature
    branch. Returns (N, S, S, C) in [-1, 1]."""
    n_in, n_d1, n_d2, n_u1, n_u2 = self.norms
    h = jax.nn.relu(n_in(self.c_in(x)))
    h = jax.nn.relu(n_d1(self.down1(h)))
    h = jax.nn.relu(n_d2(self.down2(h)))
    if self.feat_dim:
      if feats is None:
        raise ValueError("this generator has a feature branch: pass the encoder features")
      f = resize_features(feats.astype(h.dtype), h.shape[1:3])
      h = jax.nn.relu(self.fuse_norm(self.fuse(jnp.concatenate([h, f], axis=-1))))
    for blk in self.blocks:
      h = blk(h)
    h = jax.nn.relu(n_u1(self.up1(h)))
    h = jax.nn.relu(n_u2(self.up2(h)))
    return jnp.tanh(self.c_out(h))


class PatchDiscriminator(nnx.Module):
  def __init__(self, in_ch: int = 1, ndf: int = 64, n_layers: int = 3, *, rngs: nnx.Rngs):
    pad = ((1, 1), (1, 1))
    chans = [in_ch] + [ndf * min(2**i, 8) for i in range(n_layers + 1)]
    self.convs = nnx.List(
        [_conv(chans[i], chans[i + 1], 4, stride=2 if i < n_layers else 1, padding=pad, rngs=rngs)
         for i in range(n_layers + 1)])
    # No norm on the first layer.
    self.norms = nnx.List([_norm(c, rngs) for c in chans[2:]])
    self.c_out = _conv(chans[-1], 1, 4, padding=pad, rngs=rngs)

  def __call__(self, x):
    h = x
    for i, conv in enumerate(self.convs):
      h = conv(h)
      if i > 0:
        h = self.norms[i - 1](h)
      h = jax.nn.leaky_relu(h, 0.2)
    return self.c_out(h)


def receptive_field(n_layers: int) -> int:
  """Side of the input patch one PatchGAN output sees (70 for n_layers = 3)."""
  rf = 1
  for stride in [1, 1] + [2] * n_layers:  # output conv and the stride-1 layer, then the stride-2 ones
    rf = (rf - 1) * stride + 4
  return rf


class CycleGAN(nnx.Module):
  """G_A: low → high, G_B: high → low, D_A judges high-quality images, D_B low-quality ones (the
  official naming: D_A discriminates G_A's outputs)."""

  def __init__(self, *, in_ch: int = 1, ngf: int = 64, n_blocks: int = 9, ndf: int = 64,
               n_layers: int = 3, feat_dim: int = 0, rngs: nnx.Rngs):
    self.G_A = ResnetGenerator(in_ch, in_ch, ngf, n_blocks, feat_dim, rngs=rngs)
    self.G_B = ResnetGenerator(in_ch, in_ch, ngf, n_blocks, feat_dim, rngs=rngs)
    self.D_A = PatchDiscriminator(in_ch, ndf, n_layers, rngs=rngs)
    self.D_B = PatchDiscriminator(in_ch, ndf, n_layers, rngs=rngs)


def init(seed: int, **kwargs):
  """(graphdef, params, rest) of a `CycleGAN(**kwargs)` as pure dicts (`core.split_model`'s form),
  with the official initialisation (weights ~ N(0, 0.02), biases 0) drawn on the host from
  `np.random.default_rng(seed)`. Eager NNX initialisers would compile one random kernel per distinct
  shape: about a minute on a loaded 2-core CPU for the smoke networks, against milliseconds here."""
  abstract = nnx.eval_shape(lambda: CycleGAN(rngs=nnx.Rngs(0), **kwargs))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if getattr(path[-1], "key", None) == "kernel":
      return jnp.asarray(rng.normal(0.0, 0.02, x.shape).astype(np.float32))
    return jnp.zeros(x.shape, x.dtype)

  params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params))
  return graphdef, params, nnx.to_pure_dict(rest)
