"""Importing the official checkpoints: CLI, orbax run checkpoint, errors.

A checkpoint of each official network (README "B. networks": ConvNeXt U-Net
with 3 and 1 channels, DDPM U-Net; plain and DataParallel keys) is converted
into a run directory and read back the way every inference mode reads it
(`train.restore_trained`). The restored networks must reproduce the official
outputs, and the official samplers' outputs (README "C. sampling", all run
with the 'ema' weights of ckpt_unet_c3.pt), to 1e-4.
"""

import io
import pickle
import struct
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colddiff_jax import convert
from colddiff_jax import sampling
from colddiff_jax import train
from colddiff_jax.models import layers
from conftest import FIXTURES
from conftest import REPO
from conftest import load_fixture
from conftest import run_cli

sys.path.insert(0, str(REPO))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import cifar10_blur  # noqa: E402
from configs import default  # noqa: E402
from configs import quickstart  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compiles")

# Networks are traced with the plain Flax layers (`fast_cpu_paths(False)`),
# which GPUs and TPUs run: they compile in half the time of the CPU
# formulations, which layers_test checks against them.

# The networks of the fixtures, as config overrides (fixtures README, B).
UNET_SMALL = dict(dim=4, dim_mults=(1, 2, 4, 8), attn_heads=4,
                  attn_dim_head=32)
UNET_FLAGS = ("--config.model.dim=4", "--config.model.dim_mults=(1,2,4,8)",
              "--config.model.attn_heads=4", "--config.model.attn_dim_head=32")


def unet_c3_config():
  """CIFAR-sized ConvNeXt U-Net run with the deblurring sampler fixtures' D."""
  config = default.get_config()
  config.model.update(UNET_SMALL)
  config.degradation.update(dict(name="blur", time_steps=5,
                                 blur_routine="Constant", blur_size=11,
                                 blur_std=7.0))
  return config


def unet_c1_config():
  """The quickstart (MNIST, T=20 Constant 11x11 sigma 7) with the small net."""
  config = quickstart.get_config("smoke")
  config.model.update(UNET_SMALL)
  return config


def ddpm_config():
  """CIFAR-10 deblurring (DDPM U-Net, Special_6_routine) with the small net."""
  config = cifar10_blur.get_config()
  config.model.update(dict(ch=32, ch_mult=(1, 2), num_res_blocks=1))
  return config


# name -> (checkpoint, network outputs fixture, config, use_ema, CLI
# --config). unet_c1 and ddpm are DataParallel checkpoints ('module.' keys),
# unet_c3 is plain (models_test checks that its DataParallel twin holds the
# same weights). unet_c1 goes through the CLI, with --use_ema=false.
CASES = {
    "unet_c3": ("ckpt_unet_c3.pt", "net_unet_c3.npz", unet_c3_config, True,
                None),
    "ddpm": ("ckpt_ddpm_dataparallel.pt", "net_ddpm.npz", ddpm_config, True,
             None),
    "unet_c1": ("ckpt_unet_c1_dataparallel.pt", "net_unet_c1.npz",
                unet_c1_config, False, "configs/quickstart.py:smoke"),
}


def _cli(ckpt, workdir, *flags):
  return run_cli(f"--checkpoint={FIXTURES / ckpt}", f"--workdir={workdir}",
                 *flags, module="colddiff_jax.convert")


class _Runs:
  """Converts each case once and restores it as the inference modes do."""

  def __init__(self, tmp_path_factory):
    self._tmp = tmp_path_factory
    self._runs = {}
    self._forward = {}

  def get(self, name):
    """(workdir, conversion info or CLI result, (mesh, deg, model, state))."""
    if name not in self._runs:
      ckpt, _, make_config, use_ema, cli_config = CASES[name]
      workdir = self._tmp.mktemp(name)
      if cli_config:
        info = _cli(ckpt, workdir, f"--config={cli_config}", *UNET_FLAGS,
                    f"--use_ema={use_ema}")
        assert info.returncode == 0, info.stderr[-3000:]
      else:
        info = convert.convert_checkpoint(make_config(), FIXTURES / ckpt,
                                          workdir, use_ema=use_ema)
      self._runs[name] = (workdir, info,
                          train.restore_trained(make_config(), workdir))
    return self._runs[name]

  def forward(self, name):
    """The jitted network of a restored case."""
    if name not in self._forward:
      _, _, (_, _, model, _) = self.get(name)
      self._forward[name] = jax.jit(train.make_apply_fn(model))
    return self._forward[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return _Runs(tmp_path_factory)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_outputs(runs, name):
  """Both weight sets of a restored run give the official outputs."""
  _, _, (_, _, _, state) = runs.get(name)
  data = load_fixture(CASES[name][1])
  f = runs.forward(name)
  x, t = jnp.asarray(data["x"]), jnp.asarray(data["t"])
  ema = "y_ema" if CASES[name][3] else "y_model"  # --use_ema=false: raw
  for weights, expected in (("ema", ema), ("params", "y_model")):
    with layers.fast_cpu_paths(False):
      y = np.asarray(f(state[weights], x, t))
    np.testing.assert_allclose(y, data[expected], rtol=0, atol=1e-4,
                               err_msg=f"{name} {weights}")


# ------------------------------------------------------------- conversion --


@pytest.mark.parametrize("name", ["unet_c3", "ddpm"])
def test_converted_run_reproduces_official_network(runs, name):
  workdir, info, (_, _, _, state) = runs.get(name)
  assert info["step"] == 123000 and int(state["step"]) == 123000
  assert info["use_ema"] and info["num_tensors"] == {
      "unet_c3": 238, "ddpm": 144}[name]
  # The blur kernels (one per step) are not network weights.
  assert info["ignored"] == [f"gaussian_kernels.{i}.weight" for i in range(
      {"unet_c3": 5, "ddpm": 50}[name])]
  assert (workdir / "config.json").exists()
  assert int(state["opt_state"][0].count) == 0  # fresh Adam
  _assert_outputs(runs, name)


def test_cli_conversion_with_raw_weights(runs):
  workdir, result, (_, _, _, state) = runs.get("unet_c1")
  log = result.stderr
  assert "step 123000, 238 network tensors" in log
  assert "DataParallel 'module.' prefix" in log
  assert "gaussian_kernels.<i>.weight (x20)" in log
  assert "model.dim_mults=(1, 2, 4, 8)" in log
  assert "ema = 'model' weights" in log
  assert (workdir / "config.json").exists()
  assert int(state["step"]) == 123000
  # --use_ema=false: 'ema' holds the raw weights (their outputs are y_model).
  for a, b in zip(_leaves(state["ema"]), _leaves(state["params"]),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  _assert_outputs(runs, "unet_c1")
  # A second import into the same run is refused, with a message, no trace.
  again = _cli(CASES["unet_c1"][0], workdir,
               "--config=configs/quickstart.py:smoke", *UNET_FLAGS)
  assert again.returncode == 1
  assert "already holds checkpoints" in again.stderr
  assert "Traceback" not in again.stderr


@pytest.mark.parametrize("method,fixture_name", [
    ("tacos", "sample_deblur_x0_step_down.npz"),
    ("naive", "sample_deblur_default.npz")])
def test_sampling_from_converted_weights_is_official(runs, method,
                                                     fixture_name):
  _, _, (_, deg, model, state) = runs.get("unet_c3")
  data = load_fixture(fixture_name)
  apply_fn = train.make_apply_fn(model)
  run = jax.jit(lambda p, x: sampling.sample(
      lambda y, k: apply_fn(p, y, k), deg, x, method=method,
      return_trajectory=True))
  with layers.fast_cpu_paths(False):
    final, traj = run(state["ema"], jnp.asarray(data["traj_x_in"][0]))
  np.testing.assert_allclose(np.asarray(traj["x0_hat"]), data["traj_x0hat"],
                             rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(final), data["final"], rtol=0,
                             atol=1e-4)


def test_refuses_a_workdir_with_checkpoints(runs):
  workdir, _, _ = runs.get("unet_c3")
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    convert.convert_checkpoint(unet_c3_config(),
                               FIXTURES / "ckpt_unet_c3.pt", workdir)


# ---------------------------------------------------------------- errors --


def _zip_checkpoint(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/byteorder", "little")
  return path


@pytest.mark.parametrize("module,name", [("os", "system"),
                                         ("builtins", "eval")])
def test_forbidden_global_is_refused_without_running_it(tmp_path, module,
                                                        name):
  sentinel = tmp_path / "ran"
  command = (f"touch {sentinel}" if name == "system"
             else f"open({str(sentinel)!r}, 'w').close()")
  # GLOBAL module.name, then call it with one string argument (REDUCE).
  payload = f"c{module}\n{name}\n(V{command}\ntR.".encode()
  path = _zip_checkpoint(tmp_path / "evil.pt", payload)
  with pytest.raises(convert.UnsafeCheckpointError) as err:
    convert.convert_checkpoint(unet_c3_config(), path, tmp_path / "run")
  assert f"{module}.{name}" in str(err.value)
  assert str(path) in str(err.value)
  assert not sentinel.exists()
  assert not (tmp_path / "run" / "checkpoints").exists()
  # The same pickle really runs when unrestricted: the test can fail.
  pickle.loads(payload)
  assert sentinel.exists()


def test_truncated_or_corrupt_file_names_the_file(tmp_path):
  data = (FIXTURES / "ckpt_unet_c3.pt").read_bytes()
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.CheckpointError, match="truncated") as err:
    convert.load_torch_checkpoint(truncated)
  assert str(truncated) in str(err.value)
  # One flipped byte inside a tensor: the zip's CRC catches it.
  corrupt = tmp_path / "corrupt.pt"
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    info = max(z.infolist(), key=lambda i: i.file_size)
  flipped = bytearray(data)
  # Stored (uncompressed) entries: the member's bytes follow its local header
  # (30 bytes, then the name and the extra field, whose lengths end it).
  name_len, extra_len = struct.unpack(
      "<HH", data[info.header_offset + 26:info.header_offset + 30])
  offset = info.header_offset + 30 + name_len + extra_len
  flipped[offset + info.file_size // 2] ^= 0xFF
  corrupt.write_bytes(bytes(flipped))
  with pytest.raises(convert.CheckpointError, match="CRC") as err:
    convert.load_torch_checkpoint(corrupt)
  assert str(corrupt) in str(err.value)
  (tmp_path / "empty.pt").write_bytes(b"")
  with pytest.raises(convert.CheckpointError, match="empty"):
    convert.load_torch_checkpoint(tmp_path / "empty.pt")
  with pytest.raises(FileNotFoundError, match="missing.pt"):
    convert.load_torch_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("content,use_ema,match", [
    ({"step": 3, "model": {}}, True, r"no 'ema' state dict.*--use_ema=false"),
    ({"step": 3, "weights": {}}, False, r"no 'model' state dict.*'weights'"),
    ({"denoise_fn.conv.weight": 0}, True, "a bare state dict"),
])
def test_checkpoint_without_model_or_ema(tmp_path, content, use_ema, match):
  path = _zip_checkpoint(tmp_path / "ckpt.pt",
                         pickle.dumps(content, protocol=2))
  with pytest.raises(convert.CheckpointError, match=match) as err:
    convert.convert_checkpoint(unet_c3_config(), path, tmp_path / "run",
                               use_ema=use_ema)
  assert str(path) in str(err.value)


@pytest.mark.parametrize("ckpt,change,first,hints", [
    # A wider network for 1-channel images: the first key, both shapes and
    # every config key to change.
    ("ckpt_unet_c3.pt", dict(model=dict(dim=8), data=dict(channels=1)),
     "'time_mlp.1.weight': checkpoint shape (16, 4), the model expects "
     "(32, 8)", ["--config.data.channels=3", "--config.model.dim=4"]),
    # The other architecture.
    ("ckpt_ddpm_dataparallel.pt", {},
     "'temb.dense.0.weight' (128, 32) is in the checkpoint but not in the "
     "model", ["--config.model.name=ddpm", "--config.model.ch=32",
               "'--config.model.ch_mult=(1,2)'",
               "--config.model.num_res_blocks=1"]),
])
def test_wrong_architecture_names_key_shapes_and_config_keys(
    tmp_path, ckpt, change, first, hints):
  config = unet_c3_config()
  for section, values in change.items():
    config[section].update(values)
  with pytest.raises(convert.ArchitectureMismatch) as err:
    convert.convert_checkpoint(config, FIXTURES / ckpt, tmp_path)
  message = str(err.value)
  assert f"first mismatching key {first}" in message, message
  for hint in hints:
    assert hint in message, message
  assert not (tmp_path / "checkpoints").exists()


def test_attention_head_split_must_be_official(tmp_path):
  config = unet_c3_config()
  config.model.update(dict(attn_heads=1, attn_dim_head=128))  # same shapes
  with pytest.raises(convert.CheckpointError,
                     match=r"attn_heads=4 --config\.model\.attn_dim_head=32"):
    convert.convert_checkpoint(config, FIXTURES / "ckpt_unet_c3.pt", tmp_path)


def test_official_architecture_is_read_from_the_weights():
  c1 = convert.denoise_fn_state(convert.load_torch_checkpoint(
      FIXTURES / "ckpt_unet_c1_dataparallel.pt")["ema"])
  assert convert.official_architecture(c1) == {
      "model.name": "unet", "data.channels": 1, "model.dim": 4,
      "model.dim_mults": (1, 2, 4, 8), "model.with_time_emb": True,
      "model.attn_heads": 4, "model.attn_dim_head": 32}
  ddpm = convert.denoise_fn_state(convert.load_torch_checkpoint(
      FIXTURES / "ckpt_ddpm_dataparallel.pt")["ema"])
  assert convert.official_architecture(ddpm, image_size=32) == {
      "model.name": "ddpm", "data.channels": 3, "model.ch": 32,
      "model.ch_mult": (1, 2), "model.num_res_blocks": 1,
      "model.attn_resolutions": (16,), "model.resamp_with_conv": True}
  assert convert.summarize_keys(
      ["gaussian_kernels.0.weight", "gaussian_kernels.1.weight", "alphas"]
  ) == "gaussian_kernels.<i>.weight (x2), alphas"
