"""XLA:CPU settings that must be in place before JAX's CPU backend starts.

Imported by the package's `__init__`, so any `import colddiff_jax...` (the
CLI, the tests, the benchmarks, a notebook) applies them before the first JAX
computation. No JAX import here: the settings are environment variables that
the backend reads once, at start-up.
"""

from __future__ import annotations

import os

#: The XLA:CPU flag that routes convolutions and matmuls to YNNPACK (its
#: default) or, empty, to XLA's Eigen kernels.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def prefer_eigen_on_cpu() -> bool:
  """Appends `--xla_cpu_experimental_ynn_fusion_type=` to XLA_FLAGS.

  XLA:CPU hands dense convolutions and matmuls to YNNPACK by default. On
  these networks Eigen, XLA's other CPU backend, is faster: YNNPACK runs the
  kernel gradient of a convolution (a convolution with a 32x32 "kernel") ~10x
  slower, and measured over a whole ConvNeXt U-Net training step, a DDPM U-Net
  forward pass and a 128x128 ConvNeXt forward pass, the Eigen build was
  faster in each (the quickstart trains at 7.6 instead of 5.2 steps/s). The
  flag takes effect only if the CPU backend has not started yet, and a user's
  own setting of it is left alone. Called when the package is imported.

  Returns:
    True if the flag was added.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_FLAG.lstrip("-") in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
  return True
