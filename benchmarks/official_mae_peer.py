"""A PyTorch MAE built the way facebookresearch/mae `models_mae.py` builds it: timm's `PatchEmbed`
and `Block` (fused qkv with bias, LayerNorm eps 1e-6, timm's fused scaled-dot-product attention),
MAE's per-sample random masking by argsort of uniform noise, a transformer decoder over all tokens
with mask tokens unshuffled by `ids_restore`, and the per-patch MSE averaged over removed patches
(optionally on norm-pix targets).

Written from that description for the benchmark (it is the code a researcher would otherwise run,
so it is the peer that counts); its parameter names are the official ones, so it loads a
`python -m mae_jax.export --format=mae-full` file strictly, and `tests/test_benchmarks.py` checks
that on shared weights and noise it gives the project's loss.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn


def sincos_table(width: int, grid: int, cls_row: bool = True) -> np.ndarray:
  """MAE's fixed 2-D table: the first half of the channels encodes the column index, the second
  half the row, each as [sin, cos] of position·ω_k with ω_k = 1/10000^(k/(width/4)); a zero row
  for CLS in front."""
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                           indexing="ij")

  def enc(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([enc(cols), enc(rows)], axis=1)
  if cls_row:
    table = np.concatenate([np.zeros((1, width)), table], axis=0)
  return table.astype(np.float32)


class OfficialStyleMAE(nn.Module):
  """`MaskedAutoencoderViT` of facebookresearch/mae with the same module and parameter names."""

  def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
               num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
               mlp_ratio=4.0, norm_pix_loss=False):
    super().__init__()
    norm = partial(nn.LayerNorm, eps=1e-6)
    self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
    num_patches = self.patch_embed.num_patches
    grid = int(num_patches ** 0.5)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.from_numpy(sincos_table(embed_dim, grid))[None],
                                  requires_grad=False)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                 for _ in range(depth)])
    self.norm = norm(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(
        torch.from_numpy(sincos_table(decoder_embed_dim, grid))[None], requires_grad=False)
    self.decoder_blocks = nn.ModuleList([
        Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
        for _ in range(decoder_depth)])
    self.decoder_norm = norm(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
    self.norm_pix_loss = norm_pix_loss
    self.patch_size, self.in_chans = patch_size, in_chans
    self._init_weights()

  def _init_weights(self):
    # As the official initialisation: xavier-uniform Linear weights (the patch projection on its
    # flattened view), zero biases, LayerNorm (1, 0), CLS and mask tokens N(0, 0.02).
    w = self.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(self.cls_token, std=0.02)
    nn.init.normal_(self.mask_token, std=0.02)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
      elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def patchify(self, imgs):
    p, c = self.patch_size, self.in_chans
    n, _, hh, ww = imgs.shape
    h, w = hh // p, ww // p
    x = imgs.reshape(n, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # n h w p q c
    return x.reshape(n, h * w, p * p * c)

  @staticmethod
  def random_masking(x, mask_ratio, noise=None):
    n, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    if noise is None:
      noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore

  def forward_encoder(self, x, mask_ratio, noise=None):
    x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
    cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    n, length = ids_restore.shape
    mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

  def forward_loss(self, imgs, pred, mask):
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
      target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def forward(self, imgs, mask_ratio=0.75, noise=None):
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(imgs, pred, mask), pred, mask
