"""Analytic FLOP count of a pretraining step, for model-FLOPs utilisation (MFU).

Convention (the one of the MAE/ViT scaling literature and of "MFU" in the PaLM paper): count only
the matrix multiplications, 2 FLOPs per multiply-add, and take backward = 2 × forward (one matmul
for the gradient of the input, one for the gradient of the weight), so a training step costs
3 × the forward FLOPs. Norms, GELU, softmax, the loss, the optimizer and the pixel corruptions are
left out (they are O(n·d), a fraction of a percent at ViT-B sizes).

One pre-LN transformer block on n tokens of width d with MLP ratio r, forward:

    qkv 2·n·d·3d  +  attention logits 2·n²·d  +  attention·V 2·n²·d  +  out-proj 2·n·d²
    + MLP 2·n·d·rd + 2·n·rd·d            =  2·n·d²·(4 + 2r) + 4·n²·d

MAE (He et al. 2022), L = (S/p)² patches of P = p²·C pixels, K = int(L·(1 − mask_ratio)) kept,
c prefix tokens (CLS; D²MAE's blurriness token makes c = 2):

    patch embedding on all L patches     2·L·P·D              (before masking, as the official code)
    encoder, depth blocks on K + c tokens
    decoder_embed on K + c tokens        2·(K + c)·D·D'
    decoder, depth' blocks on L + c tokens
    decoder_pred on L + c tokens         2·(L + c)·D'·P       (the prefix rows are dropped after)

SimMIM/USFM path: patch embedding on L patches, encoder on L + 1 tokens, linear decoder on L tokens
(2·L·D·P). Its FFT loss is not counted.

Check (tests/test_benchmarks.py): MAE ViT-B/16 at 224 px, RGB, decoder 512 × 8, mask 0.75 gives
3 × 19.56 = 58.7 GFLOP per image, so an H100 (989 TFLOP/s dense bf16) tops out near 16,900 images/s.
"""

from __future__ import annotations

# Dense peak matmul throughput per device, FLOP/s (vendor datasheets; no sparsity).
PEAK_FLOPS = {
    # NVIDIA, bf16 tensor cores
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "V100": 125e12,  # fp16
    "L4": 121e12,
    # Google TPU, bf16
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e
}


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
  """Forward matmul FLOPs of one transformer block: 2·n·d²·(4 + 2r) + 4·n²·d."""
  n, d = tokens, width
  hidden = int(d * mlp_ratio)
  return 2.0 * n * d * (3 * d + d + 2 * hidden) + 4.0 * n * n * d


def mae_forward_flops(*, image_size: int, patch_size: int, in_chans: int, width: int, depth: int,
                      decoder_width: int, decoder_depth: int, mask_ratio: float,
                      mlp_ratio: float = 4.0, num_prefix: int = 1) -> float:
  """Forward FLOPs of one image through MAE (encoder on the kept tokens, decoder on all)."""
  num_patches = (image_size // patch_size) ** 2
  patch_dim = patch_size * patch_size * in_chans
  kept = int(num_patches * (1 - mask_ratio))  # the official truncation
  enc_tokens, dec_tokens = kept + num_prefix, num_patches + num_prefix
  return (2.0 * num_patches * patch_dim * width
          + depth * block_flops(enc_tokens, width, mlp_ratio)
          + 2.0 * enc_tokens * width * decoder_width
          + decoder_depth * block_flops(dec_tokens, decoder_width, mlp_ratio)
          + 2.0 * dec_tokens * decoder_width * patch_dim)


def simmim_forward_flops(*, image_size: int, patch_size: int, in_chans: int, width: int, depth: int,
                         mlp_ratio: float = 4.0) -> float:
  """Forward FLOPs of one image through the SimMIM/USFM path (all tokens, linear decoder)."""
  num_patches = (image_size // patch_size) ** 2
  patch_dim = patch_size * patch_size * in_chans
  return (2.0 * num_patches * patch_dim * width
          + depth * block_flops(num_patches + 1, width, mlp_ratio)
          + 2.0 * num_patches * width * patch_dim)


def train_flops_per_image(mcfg) -> float:
  """3 × forward FLOPs per image for a `config.model` (fields of `mae_jax.config_base`)."""
  from mae_jax.models import vit
  width, depth, _, preset_patch = vit.PRESETS[mcfg.variant]
  common = dict(image_size=mcfg.image_size, patch_size=mcfg.patch_size or preset_patch,
                in_chans=mcfg.in_chans, width=width, depth=depth)
  if mcfg.path == "simmim":
    return 3.0 * simmim_forward_flops(**common)
  return 3.0 * mae_forward_flops(**common, decoder_width=mcfg.decoder_width,
                                 decoder_depth=mcfg.decoder_depth, mask_ratio=mcfg.mask_ratio,
                                 num_prefix=2 if mcfg.blur_embed == "token" else 1)


def peak_flops(device_kind: str) -> float | None:
  """Peak FLOP/s for a `jax.Device.device_kind` string, or None when unknown (e.g. CPUs)."""
  kind = device_kind.upper()
  for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.upper() in kind:
      return peak
  return None


def mfu(images_per_sec: float, flops_per_image: float, peak: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
  return images_per_sec * flops_per_image / peak
