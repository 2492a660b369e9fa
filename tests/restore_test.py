"""Restore mode: the user's own images, through the CLI, and the per-family aux."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from colddiff_jax import degradations
from colddiff_jax import restore
from conftest import run_cli
from generation_test import save_checkpoint
from generation_test import tiny_config

pytestmark = pytest.mark.usefixtures("fast_compiles")

# The CLI flags that turn the smoke config into `tiny_config()`.
TINY_FLAGS = ("--config.degradation.time_steps=4", "--config.eval.num_images=16")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return save_checkpoint(tiny_config(), tmp_path_factory.mktemp("run"))


def _user_folder(root):
  """A blurred RGB image (sub/), a grayscale 48x64 image and a corrupt file."""
  deg = degradations.build(tiny_config().degradation, 32, 1)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (1, 32, 32, 1)).astype(np.float32))
  blurred = np.asarray(deg.apply(x0, jnp.full((1,), 4, jnp.int32)))[0, ..., 0]
  blurred = np.clip((blurred + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  os.makedirs(root / "sub")
  Image.fromarray(np.stack([blurred] * 3, -1)).save(root / "sub" / "blurred.png")
  Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)).save(
      root / "gray.jpg")
  (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  return root


def test_cli_restores_a_folder_and_skips_a_corrupt_file(workdir, tmp_path):
  inputs = _user_folder(tmp_path / "in")
  out = run_cli("--config=configs/quickstart.py:smoke", *TINY_FLAGS, "--mode=restore",
                f"--workdir={workdir}", f"--input={inputs}",
                f"--output={tmp_path / 'out'}")
  assert out.returncode == 0, out.stderr[-3000:]
  written = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "out")
                   for d, _, files in os.walk(tmp_path / "out") for f in files)
  assert written == ["gray_restored.png", os.path.join("sub", "blurred_restored.png")]
  for name in written:
    # Three 32x32 panels side by side: input as fed, direct, sampled.
    assert Image.open(tmp_path / "out" / name).size == (3 * 34 + 2, 36)
  warnings = [line for line in out.stderr.splitlines()
              if line.startswith("W") and "broken.png" in line]
  assert len(warnings) == 1, out.stderr[-3000:]
  assert "cannot read image file" in warnings[0]
  # The fed blurred image is the file itself (already the model's size).
  panel = np.asarray(Image.open(tmp_path / "out" / written[1]))[2:34, 2:34]
  source = np.asarray(Image.open(inputs / "sub" / "blurred.png").convert("L"))
  np.testing.assert_array_equal(panel, source)


@pytest.mark.parametrize("step", [0, 5, -1])
def test_restore_from_step_out_of_range_is_a_clear_error(workdir, tmp_path, step):
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
  with pytest.raises(ValueError, match=r"--restore_from_step=.* must be an integer in 1\.\.4"):
    restore.restore_files(tiny_config(), workdir, str(tmp_path / "a.png"),
                          str(tmp_path / "out"), step)
  assert not os.path.exists(tmp_path / "out")


def test_missing_or_empty_input_names_the_flag(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="--input"):
    restore.restore_files(tiny_config(), workdir, str(tmp_path / "nope"),
                          str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="--input=.*no image file"):
    restore.restore_files(tiny_config(), workdir, str(tmp_path / "empty"),
                          str(tmp_path / "out"))


def test_find_images_skips_the_output_folder_and_names_stay_unique(tmp_path):
  for rel in ("a.png", "a.JPG", "a.jpg", "b.webp", "notes.txt",
              "out/a_restored.png", "deep/c.bmp"):
    os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
    (tmp_path / rel).write_bytes(b"")
  found = restore.find_images(str(tmp_path), exclude=str(tmp_path / "out"))
  rels = [rel for _, rel in found]
  assert rels == ["a.JPG", "a.jpg", "a.png", "b.webp", os.path.join("deep", "c.bmp")]
  assert restore.output_names(rels) == [
      "a_jpg_restored.png", "a_jpg_2_restored.png", "a_png_restored.png",
      "b_restored.png", os.path.join("deep", "c_restored.png")]


def _deg(**options):
  config = tiny_config().degradation
  config.update(options)
  return degradations.build(config, 32, 3)


def test_aux_of_noise_is_estimated_from_the_input():
  deg = _deg(name="noise", time_steps=10)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
  z = jnp.asarray(rng.standard_normal((2, 32, 32, 3)).astype(np.float32))
  x_s = deg.apply(x0, jnp.full((2,), 6, jnp.int32), {"z": z})
  aux = restore.make_aux_fn(deg, "tacos")(x_s, x0, 6)
  np.testing.assert_allclose(aux["z"], z, atol=1e-4)  # exact with a perfect x̂0


def test_aux_of_random_colour_is_estimated_from_the_input():
  deg = _deg(name="mask_generation", time_steps=10, reverse=True, kernel_std=0.5,
             initial_mask=1)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
  colour = jnp.asarray([[0.1, -0.3, 0.4], [-0.45, 0.0, 0.2]], jnp.float32)
  x_T = deg.apply(x0, jnp.full((2,), 10, jnp.int32), {"colour": colour})
  aux = restore.make_aux_fn(deg, "tacos")(x_T, None, 10)
  np.testing.assert_allclose(aux["colour"], colour, atol=1e-5)


def test_aux_of_random_masks_assumes_a_centred_hole():
  deg = _deg(name="mask", time_steps=5, fade_routine="Random_Incremental")
  fixed = _deg(name="mask", time_steps=5, fade_routine="Incremental")
  x = jnp.ones((1, 32, 32, 3))
  aux = restore.make_aux_fn(deg, "tacos")(x, x, 5)
  s = jnp.full((1,), 5, jnp.int32)
  np.testing.assert_allclose(deg.apply(x, s, aux), fixed.apply(x, s), atol=1e-6)


def test_random_snow_needs_the_direct_method():
  deg = _deg(name="snow", time_steps=5, random_snow=True)
  with pytest.raises(ValueError, match="sample.method=direct"):
    restore.make_aux_fn(deg, "tacos")
  assert restore.make_aux_fn(deg, "direct")(None, None, 5) is None
