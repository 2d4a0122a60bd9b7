"""The model sizes, without importing jax or flax: the config files and the command line's checks
read this table, so a config loads (and a mistake in it is rejected) in well under a second.

(width, depth, heads, patch) of the standard ViT sizes;
`tiny` and `micro` are for tests and smoke runs.
"""

PRESETS = {
    "micro": (32, 2, 2, 8),
    "tiny": (64, 4, 4, 8),
    "ti": (192, 12, 3, 16),
    "s": (384, 12, 6, 16),
    "b": (768, 12, 12, 16),
    "l": (1024, 24, 16, 16),
    "h": (1280, 32, 16, 14),
}
