"""colddiff_jax: Cold Diffusion (Bansal et al.) in JAX/Flax."""

__version__ = "0.1.0"
