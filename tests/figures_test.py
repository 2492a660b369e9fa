"""Figures of --mode=sample: the 4-row grid, trajectory strips and the GIF."""

import numpy as np
import pytest
from PIL import Image

from colddiff_jax import figures
from generation_test import save_checkpoint
from generation_test import tiny_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_sample_figures_writes_grid_strips_and_gif(tmp_path):
  config = tiny_config()  # T = 4, 8 images of 32x32
  workdir = save_checkpoint(config, tmp_path)
  paths = figures.sample_figures(config, workdir)
  assert paths["grid"].endswith("samples/sample_00000002.png")
  # Rows: degraded, direct, sampled, original; one column per image.
  assert Image.open(paths["grid"]).size == (8 * 34 + 2, 4 * 34 + 2)
  # One row per image; columns x_4, x_3, x_2, x_1 and the result x_0.
  for key in ("trajectory", "trajectory_x0hat"):
    assert Image.open(paths[key]).size == (5 * 34 + 2, 8 * 34 + 2)
  gif = Image.open(paths["gif"])
  assert gif.n_frames == 5  # the 4 steps, then the result
  assert gif.size == (8 * 34 + 2, 2 * 34 + 2)  # rows x_s and x̂0
  # The grid's degraded row is the strip's first column, its sampled row the
  # strip's last one.
  grid = np.asarray(Image.open(paths["grid"]))
  strip = np.asarray(Image.open(paths["trajectory"]))
  for i in range(8):
    top = 2 + i * 34
    np.testing.assert_array_equal(grid[2:34, top:top + 32], strip[top:top + 32, 2:34])
    np.testing.assert_array_equal(grid[70:102, top:top + 32],
                                  strip[top:top + 32, 138:170])


def test_evenly_spaced_keeps_both_ends():
  np.testing.assert_array_equal(figures.evenly_spaced(4, 8), [0, 1, 2, 3])
  np.testing.assert_array_equal(figures.evenly_spaced(301, 5), [0, 75, 150, 225, 300])
  np.testing.assert_array_equal(figures.evenly_spaced(1, 8), [0])


def test_long_trajectories_are_subsampled_into_the_gif(tmp_path):
  rng = np.random.default_rng(0)
  x_in = rng.uniform(-1, 1, (300, 2, 8, 8, 3)).astype(np.float32)
  x0_hat = rng.uniform(-1, 1, (300, 2, 8, 8, 3)).astype(np.float32)
  final = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  frames = figures.gif_frames(x_in, x0_hat, final, max_frames=20)
  assert len(frames) == 20
  np.testing.assert_array_equal(frames[0][2:10, 2:10], ((x_in[0, 0] + 1) * 127.5
                                                         + 0.5).clip(0, 255).astype(np.uint8))
  path = str(tmp_path / "a.gif")
  figures.save_gif(path, frames)
  gif = Image.open(path)
  assert gif.n_frames == 20 and gif.info["loop"] == 0
