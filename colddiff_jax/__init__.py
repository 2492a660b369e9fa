"""colddiff_jax: Cold Diffusion (Bansal et al.) in JAX/Flax."""

from colddiff_jax import xla_cpu as _xla_cpu

# Before anything starts JAX's CPU backend (the CLI logs the device count
# before it imports the models): see xla_cpu.prefer_eigen_on_cpu.
_xla_cpu.prefer_eigen_on_cpu()

__version__ = "0.1.0"
