"""Tests of the networks and the checkpoint converter against the official code.

The parity tests load the official PyTorch checkpoints (torch-free, through
`colddiff_jax.convert`) into models built abstractly with `nnx.eval_shape`
(no random initialisation to compile) and compare with the outputs the
official networks produced on the same inputs (fixtures net_*.npz). Each
network is compiled once and reused for its 'ema' and 'model' weights.
"""

import collections
import functools
import importlib
import io
import math
import pickle
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from colddiff_jax import convert
from colddiff_jax import models
from colddiff_jax.models import DDPMUnet
from colddiff_jax.models import Unet
from colddiff_jax.models.unet import gelu
from colddiff_jax.models.unet import sinusoidal_embedding
from colddiff_jax.models.unet import torch_uniform
from conftest import FIXTURES
from conftest import REPO
from conftest import load_fixture

# The networks of the net_*.npz fixtures (README "B. networks").
SMALL = {
    "unet_c3": dict(kind="unet", channels=3, dim=4),
    "unet_c1": dict(kind="unet", channels=1, dim=4),
    "ddpm": dict(kind="ddpm", ch=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(16,), dropout=0.1),
}
# (fixture, checkpoint file, network) for every official checkpoint.
CHECKPOINTS = [
    ("net_unet_c3.npz", "ckpt_unet_c3.pt", "unet_c3"),
    ("net_unet_c3.npz", "ckpt_unet_c3_dataparallel.pt", "unet_c3"),
    ("net_unet_c1.npz", "ckpt_unet_c1_dataparallel.pt", "unet_c1"),
    ("net_ddpm.npz", "ckpt_ddpm_dataparallel.pt", "ddpm"),
]


def _model_config(kind: str, **overrides) -> ml_collections.ConfigDict:
  """A model config with the keys of configs/default.py (README sizes)."""
  config = ml_collections.ConfigDict(dict(
      name=kind, dim=64, dim_mults=(1, 2, 4, 8), with_time_emb=True,
      residual=False, attn_heads=4, attn_dim_head=32, ch=128,
      ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
      dropout=0.1, resamp_with_conv=True))
  config.update(overrides)
  return config


@functools.cache
def _abstract_split(network: str, dtype) -> tuple[nnx.GraphDef, nnx.State]:
  spec = dict(SMALL[network])
  channels = spec.pop("channels", 3)
  config = _model_config(spec.pop("kind"), **spec)
  return nnx.split(nnx.eval_shape(lambda: models.build(
      config, channels, 32, rngs=nnx.Rngs(0), dtype=dtype)))


def _abstract(network: str, dtype=jnp.float32) -> nnx.Module:
  """A fresh abstract (shape-only) fixture network, ready for `load_into`."""
  return nnx.merge(*_abstract_split(network, dtype), copy=True)


def _forward(model: nnx.Module):
  """A jitted functional forward pass: f(state, x, t, rng) -> y."""
  graphdef, _ = nnx.split(model)

  @jax.jit
  def f(state, x, t, rng=None):
    return nnx.merge(graphdef, state)(x, t, dropout_rng=rng)

  return f


class _Loaded:
  """The official checkpoints, read once, with one compiled forward each."""

  def __init__(self):
    self.ckpt = {c: convert.load_torch_checkpoint(FIXTURES / c)
                 for _, c, _ in CHECKPOINTS}
    self.model, self.fn = {}, {}

  def weights(self, ckpt_file: str, which: str, network: str):
    """(model, state) with the 'ema'/'model' weights of `ckpt_file` loaded."""
    if (ckpt_file, which) not in self.model:
      model = _abstract(network)
      convert.load_into(model, convert.denoise_fn_state(
          self.ckpt[ckpt_file][which]))
      self.model[ckpt_file, which] = model
      if network not in self.fn:
        self.fn[network] = _forward(model)
    model = self.model[ckpt_file, which]
    return model, nnx.state(model)


@pytest.fixture(scope="module")
def loaded():
  return _Loaded()


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """Compiles without XLA's slow passes, then restores the flag.

  Flax's example tests do the same; compile time dominates this module, and
  restoring the flag leaves other test modules unaffected.
  """
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


# ------------------------------------------------------------ param counts --


@pytest.mark.parametrize("kind,channels,expected", [
    ("unet", 3, 56_615_708), ("unet", 1, 56_612_916), ("ddpm", 3, 35_746_307)])
def test_readme_param_counts(kind, channels, expected):
  fixture = load_fixture("net_unet_c3.npz")
  key = {("unet", 3): "param_count_full_unet64_c3",
         ("unet", 1): "param_count_full_unet64_c1",
         ("ddpm", 3): "param_count_full_ddpm_cifar"}[(kind, channels)]
  assert int(fixture[key]) == expected
  model = nnx.eval_shape(lambda: models.build(
      _model_config(kind), channels, 32, rngs=nnx.Rngs(0)))
  assert models.count_params(model) == expected


@pytest.mark.parametrize("fixture_name,network", [
    ("net_unet_c3.npz", "unet_c3"), ("net_unet_c1.npz", "unet_c1"),
    ("net_ddpm.npz", "ddpm")])
def test_small_param_counts(fixture_name, network):
  assert models.count_params(_abstract(network)) == int(
      load_fixture(fixture_name)["param_count"])


def test_unet_without_time_embedding_drops_the_time_parameters():
  build = lambda t: nnx.eval_shape(lambda: models.build(  # noqa: E731
      _model_config("unet", with_time_emb=t), 3, 32, rngs=nnx.Rngs(0)))
  with_t, without_t = build(True), build(False)
  assert without_t.time_fc1 is None
  assert without_t.downs[0].block1.time_proj is None
  # 56.28 M (spec §2.1): the 2-layer MLP and one projection per block go.
  assert models.count_params(without_t) == 56_278_745
  assert models.count_params(with_t) - models.count_params(without_t) == (
      64 * 256 + 256 + 256 * 64 + 64
      + sum(64 * c + c for c in (3, 64, 64, 128, 128, 256, 256, 512)  # downs
            + (512, 512)                                              # mid
            + (1024, 256, 512, 128, 256, 64)))                        # ups


# ------------------------------------------------------------------ parity --


@pytest.mark.parametrize("fixture_name,ckpt_file,network", CHECKPOINTS)
@pytest.mark.parametrize("which", ["ema", "model"])
def test_matches_official_outputs(loaded, fixture_name, ckpt_file, network,
                                  which):
  data = load_fixture(fixture_name)
  _, state = loaded.weights(ckpt_file, which, network)
  y = loaded.fn[network](state, jnp.asarray(data["x"]), jnp.asarray(data["t"]))
  assert y.dtype == jnp.float32 and y.shape == data[f"y_{which}"].shape
  np.testing.assert_allclose(np.asarray(y), data[f"y_{which}"], rtol=0,
                             atol=1e-4)


@pytest.mark.parametrize("fixture_name,ckpt_file,network", CHECKPOINTS)
def test_time_embedding_matches_official(loaded, fixture_name, ckpt_file,
                                         network):
  data = load_fixture(fixture_name)
  model, _ = loaded.weights(ckpt_file, "ema", network)
  t = jnp.asarray(data["t"])
  width = data["sinusoidal_emb"].shape[1]
  np.testing.assert_allclose(np.asarray(sinusoidal_embedding(t, width)),
                             data["sinusoidal_emb"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.time_embedding(t)),
                             data["temb"], rtol=0, atol=1e-5)


def test_split_merge_round_trip_is_exact(loaded):
  data = load_fixture("net_unet_c1.npz")
  model, state = loaded.weights("ckpt_unet_c1_dataparallel.pt", "ema",
                                "unet_c1")
  x, t = jnp.asarray(data["x"]), jnp.asarray(data["t"])
  graphdef, split_state = nnx.split(model)
  # Through host memory and back, as a checkpoint restore would.
  restored = nnx.merge(graphdef, jax.device_get(split_state))
  f = loaded.fn["unet_c1"]
  np.testing.assert_array_equal(np.asarray(f(state, x, t)),
                                np.asarray(f(nnx.state(restored), x, t)))


def test_ddpm_dropout_only_with_a_key(loaded):
  data = load_fixture("net_ddpm.npz")
  _, state = loaded.weights("ckpt_ddpm_dataparallel.pt", "ema", "ddpm")
  x, t, f = jnp.asarray(data["x"]), jnp.asarray(data["t"]), loaded.fn["ddpm"]
  y0 = np.asarray(f(state, x, t))
  np.testing.assert_array_equal(y0, np.asarray(f(state, x, t, None)))
  k1, k2 = jax.random.key(1), jax.random.key(2)
  y1, y1b, y2 = (np.asarray(f(state, x, t, k)) for k in (k1, k1, k2))
  np.testing.assert_array_equal(y1, y1b)  # Same key, same mask.
  assert np.abs(y1 - y0).max() > 1e-3
  assert np.abs(y1 - y2).max() > 1e-3


@pytest.mark.parametrize("fixture_name,ckpt_file,network", [
    CHECKPOINTS[2], CHECKPOINTS[3]])
def test_bf16_compute_is_close_to_fp32(loaded, fixture_name, ckpt_file,
                                       network):
  data = load_fixture(fixture_name)
  model = _abstract(network, dtype=jnp.bfloat16)
  convert.load_into(model, convert.denoise_fn_state(
      loaded.ckpt[ckpt_file]["ema"]))
  params = nnx.state(model, nnx.Param)
  assert all(v.get_value().dtype == jnp.float32
             for _, v in nnx.to_flat_state(params))
  y = _forward(model)(nnx.state(model), jnp.asarray(data["x"]),
                      jnp.asarray(data["t"]))
  assert y.dtype == jnp.float32
  ref = data["y_ema"]
  # bf16 keeps ~3 significant digits; each block adds ~0.5% relative error
  # (measured: ~0.5% for the ConvNeXt U-Net, ~3% for the DDPM one).
  rel = np.linalg.norm(np.asarray(y) - ref) / np.linalg.norm(ref)
  assert rel < 0.06, rel
  assert np.abs(np.asarray(y) - ref).max() < 0.1 * np.abs(ref).max()


# ------------------------------------------------------ architecture details --


def _filled(model: nnx.Module, seed: int) -> nnx.Module:
  """Gives an abstract model random values from numpy (nothing to compile)."""
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  for _, var in nnx.to_flat_state(params):
    shape = var.get_value().shape
    var.set_value(jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32))
  nnx.update(model, params)
  return model


def test_unet_residual_adds_the_input_and_no_time_ignores_t():
  def tiny(**kw):
    return _filled(nnx.eval_shape(lambda: Unet(
        channels=2, dim=4, dim_mults=(1,), rngs=nnx.Rngs(0), **kw)), 0)

  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 2)),
                  jnp.float32)
  t0, t1 = jnp.array([0, 3]), jnp.array([7, 1])
  plain, residual = tiny(), tiny(residual=True)
  np.testing.assert_allclose(np.asarray(residual(x, t0)),
                             np.asarray(plain(x, t0) + x), atol=1e-6)
  assert np.abs(np.asarray(plain(x, t0) - plain(x, t1))).max() > 1e-4
  untimed = tiny(with_time_emb=False)
  np.testing.assert_array_equal(np.asarray(untimed(x, t0)),
                                np.asarray(untimed(x, t1)))


def test_gelu_is_the_exact_gelu_with_its_gradient():
  # The networks' erf form against jax.nn.gelu's erfc form and the float64
  # definition x Phi(x), values and derivative Phi(x) + x phi(x), including
  # the tails where 1 + erf cancels.
  x = np.concatenate([np.linspace(-12, 12, 4001),
                      np.random.default_rng(0).normal(0, 3, 4000)])
  x = x.astype(np.float32)
  x64 = x.astype(np.float64)
  phi = np.exp(-0.5 * x64 ** 2) / np.sqrt(2 * np.pi)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(x64 / np.sqrt(2)))
  got = np.asarray(jax.jit(gelu)(x))
  np.testing.assert_allclose(got, x64 * cdf, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(
      got, np.asarray(jax.nn.gelu(x, approximate=False)), rtol=2e-6,
      atol=2e-6)
  grad = np.asarray(jax.jit(jax.vmap(jax.grad(gelu)))(x))
  np.testing.assert_allclose(grad, cdf + x64 * phi, rtol=2e-6, atol=2e-6)
  half = gelu(jnp.asarray(x, jnp.bfloat16))
  assert half.dtype == jnp.bfloat16


def test_init_is_pytorch_uniform_and_the_same_eagerly_and_jitted():
  init = torch_uniform(fan_in=9)
  key = jax.random.key(3)
  shape = (70_000, 2)  # Spans several draw chunks.
  eager = np.asarray(init(key, shape))
  np.testing.assert_array_equal(eager, np.asarray(jax.jit(
      lambda k: init(k, shape))(key)))
  assert np.abs(eager).max() <= 1 / 3 and np.abs(eager).max() > 0.33
  assert abs(eager.std() - 1 / 3 / np.sqrt(3)) < 1e-3
  assert len(np.unique(eager)) > 0.99 * eager.size  # Chunks differ.
  model = Unet(channels=1, dim=4, dim_mults=(1,), rngs=nnx.Rngs(0))
  kernel = np.asarray(model.downs[0].block1.conv1.kernel[...])
  assert np.abs(kernel).max() <= 1 / np.sqrt(1 * 9)
  np.testing.assert_array_equal(model.downs[0].attn.norm.g[...], 1.0)


def test_conv_transpose_mapping_matches_pytorch_semantics():
  """ConvTranspose2d(k=4, s=2, p=1), written out as PyTorch defines it."""
  rng = np.random.default_rng(0)
  cin, cout, k, s, p = 3, 2, 4, 2, 1
  x = rng.normal(size=(1, 5, 5, cin)).astype(np.float32)
  w = rng.normal(size=(cin, cout, k, k)).astype(np.float32)  # torch layout
  b = rng.normal(size=(cout,)).astype(np.float32)
  full = np.zeros((1, (5 - 1) * s + k, (5 - 1) * s + k, cout), np.float32)
  for i in range(5):
    for j in range(5):
      full[0, i * s:i * s + k, j * s:j * s + k] += np.einsum(
          "c,cokl->klo", x[0, i, j], w)
  expected = full[:, p:p + 10, p:p + 10] + b
  layer = nnx.eval_shape(lambda: nnx.ConvTranspose(
      cin, cout, (k, k), strides=(s, s), padding=((2, 2), (2, 2)),
      rngs=nnx.Rngs(0)))
  layer.kernel.set_value(jnp.asarray(convert.torch_layout(layer, "kernel", w)))
  layer.bias.set_value(jnp.asarray(b))
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected,
                             atol=1e-5)


# --------------------------------------------------------------- converter --


def test_checkpoint_reader_layout():
  ckpt = convert.load_torch_checkpoint(FIXTURES / "ckpt_unet_c3.pt")
  assert ckpt["step"] == 123000 and set(ckpt) == {"step", "model", "ema"}
  ema = ckpt["ema"]
  assert type(ema) is dict  # noqa: E721  (OrderedDicts become plain dicts)
  assert ema["denoise_fn.time_mlp.1.weight"].shape == (16, 4)
  assert ema["denoise_fn.time_mlp.1.weight"].dtype == np.float32
  assert ema["gaussian_kernels.0.weight"].shape == (3, 1, 11, 11)
  net = convert.denoise_fn_state(ema)
  assert "time_mlp.1.weight" in net and not any("gaussian" in k for k in net)
  parallel = convert.load_torch_checkpoint(
      FIXTURES / "ckpt_unet_c3_dataparallel.pt")["ema"]
  assert all(k.startswith("module.") for k in parallel)
  other = convert.denoise_fn_state(parallel)
  assert sorted(other) == sorted(net)
  for key in net:
    np.testing.assert_array_equal(other[key], net[key])
  model = _abstract("unet_c3")
  assert convert.load_official(
      model, FIXTURES / "ckpt_unet_c3_dataparallel.pt", "model") == 123000
  np.testing.assert_array_equal(  # Linear (out, in) -> (in, out).
      model.time_fc1.kernel[...],
      ckpt["model"]["denoise_fn.time_mlp.1.weight"].T)
  np.testing.assert_array_equal(  # Conv OIHW -> HWIO.
      model.downs[1].block1.conv1.kernel[...],
      ckpt["model"]["denoise_fn.downs.1.0.net.1.weight"].transpose(2, 3, 1, 0))


def test_rebuild_tensor_follows_strides():
  storage = np.arange(20, dtype=np.float32)
  # A transposed (non-contiguous) 3x4 view starting at element 2.
  out = convert._rebuild_tensor_v2(storage, 2, (4, 3), (1, 4))
  np.testing.assert_array_equal(out, storage[2:14].reshape(3, 4).T)
  assert out.flags.owndata
  with pytest.raises(ValueError, match="past its storage"):
    convert._rebuild_tensor_v2(storage, 10, (4, 3), (1, 4))


def _zip_checkpoint(payload: bytes) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/byteorder", "little")
  return buf.getvalue()


def test_reader_refuses_unexpected_globals(tmp_path):
  path = tmp_path / "evil.pt"
  path.write_bytes(_zip_checkpoint(pickle.dumps(
      {"x": collections.Counter}, protocol=2)))
  with pytest.raises(pickle.UnpicklingError, match="collections.Counter"):
    convert.load_torch_checkpoint(path)
  path.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a zip"):
    convert.load_torch_checkpoint(path)


def test_load_into_reports_bad_keys(loaded):
  state = convert.denoise_fn_state(
      loaded.ckpt["ckpt_unet_c3.pt"]["ema"])
  model = _abstract("unet_c3")
  broken = dict(state)
  del broken["mid_attn.fn.fn.to_out.bias"]
  broken["extra.weight"] = np.zeros(3, np.float32)
  broken["final_conv.1.bias"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError) as err:
    convert.load_into(model, broken)
  message = str(err.value)
  assert "mid_attn.fn.fn.to_out.bias" in message
  assert "extra.weight" in message
  assert "final_conv.1.bias" in message
  # A C=3 checkpoint does not fit a C=1 network.
  with pytest.raises(ValueError, match="shape mismatches"):
    convert.load_into(_abstract("unet_c1"), state)
  with pytest.raises(TypeError):
    convert.ddpm_params_from_torch(state, model)


# ------------------------------------------------------------------ config --


@pytest.mark.parametrize("kind,overrides,key", [
    ("vit", {}, "model.name"),
    ("unet", dict(dim=0), "model.dim"),
    ("unet", dict(dim=6, dim_mults=()), "model.dim_mults"),
    ("unet", dict(dim=3), "model.dim"),
    ("unet", dict(with_time_emb=1), "model.with_time_emb"),
    ("unet", dict(residual="no"), "model.residual"),
    ("unet", dict(dim_mults=(1, 1, 1, 1, 1, 1, 1)), "data.image_size"),
    ("ddpm", dict(ch=48), "model.ch"),
    ("ddpm", dict(ch_mult=(1, 0)), "model.ch_mult"),
    ("ddpm", dict(num_res_blocks=0), "model.num_res_blocks"),
    ("ddpm", dict(attn_resolutions=16), "model.attn_resolutions"),
    ("ddpm", dict(dropout=1.0), "model.dropout"),
    ("ddpm", dict(resamp_with_conv=None), "model.resamp_with_conv"),
    ("ddpm", dict(ch_mult=(1, 1, 1, 1, 1, 1, 1)), "data.image_size"),
])
def test_bad_model_config_names_the_key(kind, overrides, key):
  config = _model_config(kind)
  with config.ignore_type():
    config.update(overrides)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    # Abstractly, so a missed check costs no initialisation.
    nnx.eval_shape(lambda: models.build(config, 3, 32, rngs=nnx.Rngs(0)))


def test_bad_data_shape_names_the_key():
  with pytest.raises(ValueError, match=r"data\.channels"):
    models.build(_model_config("unet"), 0, 32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"data\.image_size"):
    models.build(_model_config("ddpm"), 3, 36, rngs=nnx.Rngs(0))


def test_default_config_builds(monkeypatch):
  # configs/ is imported from the repository root, as configs_test does.
  monkeypatch.syspath_prepend(str(REPO))
  default = importlib.import_module("configs.default")
  config = default.get_config()
  model = nnx.eval_shape(lambda: models.build(
      config.model, config.data.channels, config.data.image_size,
      rngs=nnx.Rngs(0)))
  assert isinstance(model, (Unet, DDPMUnet))
