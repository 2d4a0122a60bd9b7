"""mae_jax: masked image modelling for ultrasound in JAX/Flax (MAE, Deblurring MAE, D²MAE, USFM)."""

__version__ = "0.1.0"
