"""Image enhancement (USFM §4.1.2, Table 4, Fig. 5b): CycleGAN from low- to high-quality images,
with the features of a frozen pretrained encoder concatenated in both generators when `init_from`
names a pretraining workdir (any recipe); `init_from` empty (or `nofeatures`) = plain CycleGAN.

Published setting. CycleGAN (Zhu et al. 2017, §4 and appendix 7.2; the official repository's
defaults): ResNet generators with 64 base filters and 9 residual blocks (256 px), 70×70 PatchGAN
discriminators with 64 base filters, instance norm, LSGAN loss, λ_cycle = 10, identity weight
0.5·λ, Adam lr 2e-4 β = (0.5, 0.999), batch 1, 100 epochs at the initial rate then 100 decaying
linearly to 0, image pool of 50, random flips. USFM adds only the feature branch and trains
"200 epochs" (§4.2), which CycleGAN's 100 + 100 already is; the input is 224 px (§4.2: "all US
images were input at the size of 224×224"), so 9 blocks as at 256 px. Model selection: the epoch of
the best validation SSIM (USFM §4.2: "the model demonstrating optimal validation performance").

Batch 1 runs on one device; on N devices set `--config.train.batch_size` (and `eval_batch_size`)
to a multiple of N (a larger batch than published: scale `train.lr` with care, GANs are sensitive).

ARGS: init_from=DIR, organ=NAME (us_phantom: one organ's scenes only), seed=N, epochs=N,
nofeatures (plain CycleGAN even when init_from is set: the sweep's first row), smoke.

  python -m mae_jax.main --config=configs/enhance.py --workdir=ENH                       # CycleGAN
  python -m mae_jax.main --config=configs/enhance.py:init_from=PRE --workdir=ENH_F       # + features
  python -m mae_jax.main --config=configs/enhance.py:smoke,init_from=PRE --workdir=ENH
  # a folder with low/ and high/ (matching file names pair; unpaired files only train):
  python -m mae_jax.main --config=configs/enhance.py:init_from=PRE --workdir=ENH \
      --config.data.name=folder --config.data.folder=/data/USEnhance2023/thyroid
"""

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, init_from="", organ="", seed=0, epochs=0, nofeatures=False)
  shared = config_base.parse_arg("smoke" if args.smoke else "", **{
      **config_base.DOWNSTREAM_ARGS, "init_from": args.init_from, "seed": args.seed})
  c = config_base.downstream(shared, "enhance")
  del c.label_fraction, c.obs  # no labels; no D²MAE search (the extractor sees unblurred images)
  c.data.organ = args.organ  # us_phantom: "" = every organ, else one of phantom.ORGANS
  c.data.native_size = 256
  c.data.num_train = 1400  # USFM §4.2: 70/15/15 for datasets without a split
  c.data.num_validation = 300
  c.data.num_test = 300
  c.data.hflip = True

  c.model.image_size = 224
  c.model.features = not args.nofeatures  # use init_from's encoder (when init_from is set)
  c.model.ngf = 64
  c.model.n_blocks = 9
  c.model.ndf = 64
  c.model.n_layers = 3  # 70×70 PatchGAN

  t = c.train
  t.batch_size = 1
  t.eval_batch_size = 16
  t.epochs = 200
  t.warmup_epochs = 0
  t.decay_fraction = 0.5  # the last 100 of 200 epochs decay linearly to 0
  t.lr = 2e-4
  t.b1 = 0.5
  t.b2 = 0.999
  t.lambda_cycle = 10.0
  t.lambda_identity = 0.5  # × lambda_cycle
  t.pool_size = 50
  t.eval_every = 1  # epochs between validations (the best epoch is picked among them)
  t.checkpoint_every = 5  # epochs, a multiple of eval_every
  t.log_every = 100
  for unused in ("min_lr", "weight_decay", "layer_decay", "grad_clip"):
    del t[unused]

  c.eval.figure_images = 6  # test images in enhanced_test.png

  if args.smoke:
    smoke(c)
  if args.epochs:
    c.train.epochs = args.epochs
  return c


def smoke(c) -> None:
  """About a minute on 2 CPU cores: 32 px, a 2-block generator with 8 base filters, a 34×34
  PatchGAN, batch 8. From a smoke pretraining (32 px micro ViT) when init_from is set."""
  c.data.native_size = 64
  c.data.num_train = 160  # thyroid (organ=thyroid, the test's): 64 / 10 / 16
  c.data.num_validation = 24
  c.data.num_test = 40
  c.model.image_size = 32
  c.model.ngf = 8
  c.model.n_blocks = 2
  c.model.ndf = 8
  c.model.n_layers = 2
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.train.epochs = 20  # 400 steps; 160 with organ=thyroid
  c.train.lr = 1e-3
  c.train.pool_size = 16
  c.train.eval_every = 5
  c.train.checkpoint_every = 10
  c.train.log_every = 40
  c.eval.n_boot = 200
  c.eval.figure_images = 4
