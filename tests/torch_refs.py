"""Independent PyTorch references shared by the tests (transformers' ViTMAE, timm)."""

import numpy as np
import torch


def official_to_hf(sd: dict, *, decoder: bool = True) -> dict:
  """Renames a facebookresearch/mae state dict to transformers-5 `ViTMAEForPreTraining` keys."""
  out = {
      "vit.embeddings.cls_token": sd["cls_token"],
      "vit.embeddings.position_embeddings": sd["pos_embed"],
      "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
      "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
      "vit.layernorm.weight": sd["norm.weight"],
      "vit.layernorm.bias": sd["norm.bias"],
  }

  def block(src, dst):
    d = sd[f"{src}.attn.qkv.weight"].shape[1]
    qkv_w, qkv_b = sd[f"{src}.attn.qkv.weight"], sd[f"{src}.attn.qkv.bias"]
    for j, name in enumerate("qkv"):  # the official fused qkv splits into q, k, v in that order
      out[f"{dst}.attention.{name}_proj.weight"] = qkv_w[j * d:(j + 1) * d]
      out[f"{dst}.attention.{name}_proj.bias"] = qkv_b[j * d:(j + 1) * d]
    out[f"{dst}.attention.o_proj.weight"] = sd[f"{src}.attn.proj.weight"]
    out[f"{dst}.attention.o_proj.bias"] = sd[f"{src}.attn.proj.bias"]
    for a, b in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"),
                 ("mlp.fc2", "mlp.fc2")):
      out[f"{dst}.{b}.weight"] = sd[f"{src}.{a}.weight"]
      out[f"{dst}.{b}.bias"] = sd[f"{src}.{a}.bias"]

  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    block(f"blocks.{i}", f"vit.layers.{i}")
    i += 1
  if decoder:
    out["decoder.mask_token"] = sd["mask_token"]
    out["decoder.decoder_pos_embed"] = sd["decoder_pos_embed"]
    for k in ("decoder_embed", "decoder_norm", "decoder_pred"):
      out[f"decoder.{k}.weight"] = sd[f"{k}.weight"]
      out[f"decoder.{k}.bias"] = sd[f"{k}.bias"]
    i = 0
    while f"decoder_blocks.{i}.norm1.weight" in sd:
      block(f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}")
      i += 1
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def hf_vitmae(spec, *, decoder_width, decoder_depth, decoder_heads, mask_ratio, norm_pix_loss):
  from transformers import ViTMAEConfig, ViTMAEForPreTraining
  cfg = ViTMAEConfig(
      hidden_size=spec.width, num_hidden_layers=spec.depth, num_attention_heads=spec.num_heads,
      intermediate_size=int(spec.width * spec.mlp_ratio), image_size=spec.image_size,
      patch_size=spec.patch_size, num_channels=spec.in_chans, qkv_bias=True, layer_norm_eps=1e-6,
      hidden_act="gelu", decoder_hidden_size=decoder_width, decoder_num_hidden_layers=decoder_depth,
      decoder_num_attention_heads=decoder_heads, decoder_intermediate_size=int(decoder_width * 4),
      mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  model = ViTMAEForPreTraining(cfg).eval()
  return model


def micro_mae_and_official_peer(*, decoder_depth: int, norm_pix: bool, seed: int):
  """Our MAE at a micro size (32 px, patch 8, one channel, encoder 32 × 2, decoder 16 × depth, two
  heads each) and the timm-built official-style peer (`benchmarks/official_mae_peer.py`) of the same
  size, with our weights exported under the official names as torch tensors (not loaded yet, so
  that the peer's own tables can be compared first). Returns (spec, model, state_dict, peer)."""
  from flax import nnx

  from benchmarks.official_mae_peer import OfficialStyleMAE
  from mae_jax import export
  from mae_jax.models import mae as mae_lib
  from mae_jax.models import vit

  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=32, depth=2, num_heads=2)
  model = mae_lib.MAE(spec, decoder_width=16, decoder_depth=decoder_depth, decoder_heads=2,
                      mask_ratio=0.75, norm_pix_loss=norm_pix, rngs=nnx.Rngs(seed))
  sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in export.mae_state_dict(model).items()}
  peer = OfficialStyleMAE(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                          decoder_embed_dim=16, decoder_depth=decoder_depth, decoder_num_heads=2,
                          norm_pix_loss=norm_pix)
  return spec, model, sd, peer
