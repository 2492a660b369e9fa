"""FID: Fréchet distance vs the official code, Inception-v3 forward and sharding,
and reading the pytorch-fid weights (.npz, legacy and zip torch files) without
torch. The Inception weights are random here: the real file is not available
offline, and what these tests prove does not depend on the values."""

import collections
import io
import pickle
import struct
import zipfile

import jax
import numpy as np
import pytest

from colddiff_jax import parallel
from colddiff_jax.metrics import fid
from colddiff_jax.metrics import inception

# No `fast_compiles` here: skipping XLA's optimisations halves the Inception
# compile but doubles its run time on CPU, a net loss for these tests.

# ------------------------------------------------- torch files, without torch --


class _Global:
  """A `module.name` global written into a pickle without importing it."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle only accepts callables as reducers
    raise AssertionError("never called")


class _Storage:
  """A torch storage: a flat array saved next to the pickle."""

  TYPES = {np.dtype(np.float32): "FloatStorage",
           np.dtype(np.float64): "DoubleStorage",
           np.dtype(np.int64): "LongStorage"}

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, np.ascontiguousarray(array).reshape(-1)


class _Tensor:
  """A tensor view of a `_Storage`, pickled as torch pickles tensors."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride))

  def __reduce__(self):
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            self.args + (False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes torch.save's pickle: storages as persistent ids (6-tuples in the
  legacy format, 5-tuples in the zip format), globals by name."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def _save_global_by_name(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = _save_global_by_name

  def persistent_id(self, obj):
    if not isinstance(obj, _Storage):
      return None
    pid = ("storage", _Global("torch", _Storage.TYPES[obj.array.dtype]),
           obj.key, "cpu", obj.array.size)
    return pid + (None,) if self.legacy else pid


def _state_dict(tensors: dict) -> collections.OrderedDict:
  state = collections.OrderedDict(tensors)
  state._metadata = collections.OrderedDict({"": {"version": 1}})
  return state


def _as_tensors(arrays: dict) -> tuple[dict, list]:
  """One storage per array, as torch.save writes a state dict."""
  tensors, storages = {}, []
  for i, (key, value) in enumerate(arrays.items()):
    value = np.array(value, order="C")
    storage = _Storage(str(i), value)
    storages.append(storage)
    strides = tuple(s // value.itemsize for s in value.strides)
    tensors[key] = _Tensor(storage, 0, value.shape, strides)
  return tensors, storages


def _write_legacy(path, tensors: dict, storages: list) -> None:
  """torch.save(..., _use_new_zipfile_serialization=False) of a state dict."""
  f = io.BytesIO()
  pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
  pickle.dump(1001, f, protocol=2)
  pickle.dump({"protocol_version": 1001, "little_endian": True,
               "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
  _TorchPickler(f, legacy=True).dump(_state_dict(tensors))
  keys = sorted(s.key for s in storages)
  pickle.dump(keys, f, protocol=2)
  by_key = {s.key: s for s in storages}
  for key in keys:
    array = by_key[key].array
    f.write(struct.pack("<q", array.size))
    f.write(array.astype(array.dtype.newbyteorder("<")).tobytes())
  path.write_bytes(f.getvalue())


def _write_zip(path, tensors: dict, storages: list) -> None:
  """torch.save(...) (zip format, torch >= 1.6) of a state dict."""
  pkl = io.BytesIO()
  _TorchPickler(pkl, legacy=False).dump(_state_dict(tensors))
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl.getvalue())
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3")
    for s in storages:
      z.writestr(f"archive/data/{s.key}", s.array.tobytes())


def _small_state() -> tuple[dict, list, dict]:
  """Tensors sharing a storage (one of them transposed), other dtypes."""
  shared = _Storage("0", np.arange(20, dtype=np.float32))
  stats = _Storage("1", np.array([0.5, -1.5, 2.0], np.float64))
  steps = _Storage("2", np.array([7], np.int64))
  tensors = {"a.conv.weight": _Tensor(shared, 0, (2, 3), (3, 1)),
             "a.conv.weight_t": _Tensor(shared, 2, (4, 3), (1, 4)),
             "a.bn.running_mean": _Tensor(stats, 0, (3,), (1,)),
             "a.bn.num_batches_tracked": _Tensor(steps, 0, (), ())}
  expected = {"a.conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
              "a.conv.weight_t": np.arange(2, 14, dtype=np.float32)
                                 .reshape(3, 4).T,
              "a.bn.running_mean": np.array([0.5, -1.5, 2.0]),
              "a.bn.num_batches_tracked": np.array(7)}
  return tensors, [shared, stats, steps], expected


@pytest.mark.parametrize("writer", [_write_legacy, _write_zip])
def test_reads_torch_files_without_torch(tmp_path, writer):
  path = tmp_path / "weights.pth"
  tensors, storages, expected = _small_state()
  writer(path, tensors, storages)
  state = inception.read_state_dict(path)
  assert sorted(state) == sorted(expected)
  for key, value in expected.items():
    assert state[key].dtype == value.dtype, key
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  np.savez(tmp_path / "weights.npz", **expected)
  from_npz = inception.read_state_dict(tmp_path / "weights.npz")
  for key, value in expected.items():
    np.testing.assert_array_equal(from_npz[key], value, err_msg=key)


def test_legacy_reader_refuses_code_and_junk(tmp_path):
  path = tmp_path / "evil.pth"
  f = io.BytesIO()
  pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
  pickle.dump(1001, f, protocol=2)
  pickle.dump({}, f, protocol=2)
  _TorchPickler(f, legacy=True).dump({"x": _Global("os", "system")})
  path.write_bytes(f.getvalue())
  with pytest.raises(pickle.UnpicklingError, match="os.system"):
    inception.read_state_dict(path)
  path.write_bytes(b"definitely not weights")
  with pytest.raises(ValueError, match="evil.pth is neither"):
    inception.read_state_dict(path)
  tensors, storages, _ = _small_state()
  _write_legacy(path, tensors, storages)
  path.write_bytes(path.read_bytes()[:-8])
  with pytest.raises(ValueError, match="truncated"):
    inception.read_state_dict(path)
  with pytest.raises(FileNotFoundError, match="inception_weights"):
    inception.read_state_dict(tmp_path / "missing.pth")


# ---------------------------------------------------------- weight checks --


@pytest.fixture(scope="module")
def random_state():
  """A full pytorch-fid state dict with random values (He-normal convs, so
  the random network's activations stay O(1)) plus the keys the real file
  may carry and the features ignore (1008-class fc, BatchNorm counters)."""
  rng = np.random.default_rng(0)
  state = {}
  for key, shape in inception.expected_shapes().items():
    if key.endswith("conv.weight"):
      std = np.sqrt(2.0 / np.prod(shape[1:]))
      state[key] = (rng.standard_normal(shape) * std).astype(np.float32)
    elif key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      state[key] = rng.normal(0.0, 0.1, shape).astype(np.float32)
      if key.endswith("bn.weight"):
        state[key] += 1.0
  state["fc.weight"] = np.zeros((1008, 2048), np.float32)
  state["fc.bias"] = np.zeros((1008,), np.float32)
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0, np.int64)
  return state


def test_expected_keys_are_the_pytorch_fid_names():
  shapes = inception.expected_shapes()
  assert len(shapes) == 94 * 5  # 94 BasicConv2d: conv.weight + 4 BatchNorm
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Conv2d_1a_3x3.bn.running_var"] == (32,)
  assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
  assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
  params = sum(int(np.prod(s)) for k, s in shapes.items()
               if not k.endswith(("running_mean", "running_var")))
  # With the aux head (3,326,696) and a 1000-class fc (2,049,000) this is
  # torchvision's published inception_v3 size, 27,161,264.
  assert params + 3_326_696 + 2_049_000 == 27_161_264


def test_weight_errors_name_file_key_and_shapes(tmp_path, random_state):
  broken = dict(random_state)
  del broken["Mixed_6c.branch7x7dbl_3.bn.running_mean"]
  with pytest.raises(ValueError, match=r"(?s)my\.npz.*1 missing key.*"
                     r"'Mixed_6c\.branch7x7dbl_3\.bn\.running_mean'"):
    inception.check_state_dict(broken, "my.npz")
  broken = dict(random_state, extra=np.zeros(1))
  with pytest.raises(ValueError, match="unknown key.*'extra'"):
    inception.check_state_dict(broken, "my.npz")
  with pytest.raises(ValueError, match="torchvision"):
    inception.check_state_dict(
        dict(random_state, **{"fc.weight": np.zeros((1000, 1))}), "tv.pth")
  # Through a file: the wrong shape is named with both shapes.
  path = tmp_path / "tiny.npz"
  np.savez(path, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5))})
  with pytest.raises(ValueError) as err:
    inception.load_inception(path)
  message = str(err.value)
  assert str(path) in message
  assert ("Conv2d_1a_3x3.conv.weight: file (32, 3, 5, 5), expected "
          "(32, 3, 3, 3)") in message
  assert "469 missing key(s)" in message


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, random_state):
  """The random weights as a legacy .pth (the pytorch-fid file's format) and
  as the .npz the conversion CLI makes of it."""
  folder = tmp_path_factory.mktemp("inception")
  pth, npz = folder / "pt_inception.pth", folder / "inception_fid.npz"
  _write_legacy(pth, *_as_tensors(random_state))
  assert inception.main(["--weights", str(pth), "--output", str(npz)]) == 0
  return pth, npz


def test_conversion_cli_keeps_exactly_the_needed_arrays(weight_files,
                                                        random_state):
  pth, npz = weight_files
  converted = inception.read_state_dict(npz)
  assert sorted(converted) == sorted(inception.expected_shapes())
  for key, value in converted.items():
    np.testing.assert_array_equal(value, random_state[key], err_msg=key)
  # Atomic write: nothing but the two files in the folder.
  assert sorted(p.name for p in pth.parent.iterdir()) == sorted(
      [pth.name, npz.name])
  bad = pth.parent / "bad.npz"
  np.savez(bad, x=np.zeros(1))
  assert inception.main(["--weights", str(bad), "--output",
                         str(pth.parent / "out.npz")]) == 1
  assert not (pth.parent / "out.npz").exists()
  bad.unlink()


# ------------------------------------------------------ resize and forward --


def test_resize_is_pytorch_bilinear_without_antialiasing():
  up = inception.resize_bilinear(
      np.array([0.0, 1.0], np.float32).reshape(1, 1, 2, 1), 4)
  # F.interpolate([0, 1], 4, mode='linear', align_corners=False).
  np.testing.assert_allclose(np.asarray(up).reshape(4, 4)[0],
                             [0.0, 0.25, 0.75, 1.0], atol=1e-7)
  down = inception.resize_bilinear(
      np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1), 2)
  # No antialiasing when shrinking (jax.image.resize would blend 3 pixels).
  np.testing.assert_allclose(np.asarray(down).reshape(2, 2)[:, 0], [0.5, 2.5],
                             atol=1e-6)
  same = np.random.default_rng(0).random((1, 5, 5, 2), np.float32)
  np.testing.assert_array_equal(inception.resize_bilinear(same, 5), same)


def test_pools_follow_the_tf_fid_patches():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  avg = np.asarray(inception._tf_avg_pool(x))[0, :, :, 0]
  # The zero padding is not counted (count_include_pad=False).
  assert avg[0, 0] == np.mean([0, 1, 4, 5])
  assert avg[0, 1] == np.mean([0, 1, 2, 4, 5, 6])
  assert avg[1, 1] == np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10])
  # Mixed_7c's padded max pool: the padding never wins, even over negatives.
  top = np.asarray(inception._max_pool(-x - 1.0, 1, 1))[0, :, :, 0]
  assert top[0, 0] == -1.0 and top[3, 3] == -11.0


@pytest.fixture(scope="module")
def fid8(weight_files):
  """FID sharded over the 8 test devices, from the converted .npz."""
  return fid.FID(str(weight_files[1]), mesh=parallel.make_mesh(), batch_size=8)


@pytest.fixture(scope="module")
def fid1(weight_files):
  """FID on one device in batches of 2, straight from the legacy .pth."""
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  return fid.FID(str(weight_files[0]), mesh=mesh, batch_size=2)


def _images(n: int, channels: int = 3, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.uniform(-1.0, 1.0, (n, 16, 16, channels)).astype(np.float32)


def test_sharded_activations_equal_unsharded(fid8, fid1):
  assert jax.device_count() == 8 and fid8.batch_size == 8
  images = _images(5)  # one padded batch of 8 / three batches of 2
  sharded = fid8.activations(images)
  single = fid1.activations(images)
  assert sharded.shape == single.shape == (5, inception.FEATURES)
  assert sharded.dtype == np.float64
  assert np.isfinite(sharded).all() and sharded.std() > 1e-3
  # Every row is its own image's (order kept, padding dropped).
  np.testing.assert_allclose(sharded, single, rtol=1e-4,
                             atol=1e-5 * np.abs(single).max())
  assert np.abs(sharded[0] - sharded[1]).max() > 1e-3 * np.abs(sharded).max()


def test_single_channel_counts_as_its_three_channel_repeat(fid1, monkeypatch):
  # `distance` on a 1-channel set and its 3-channel repeat: both sets reach
  # the Fréchet distance with identical features. (The real 2048-d sqrtm takes
  # minutes on this CPU; the distance itself is tested on the official
  # fixtures below.)
  seen = []
  monkeypatch.setattr(fid, "fid_from_activations",
                      lambda a, b: seen.append((a, b)) or 0.0)
  gray = _images(2, channels=1, seed=1)
  assert fid1.distance(gray, np.repeat(gray, 3, -1)) == 0.0
  (a, b), = seen
  assert a.shape == (2, inception.FEATURES) and a.std() > 1e-3
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="C in"):
    fid1.activations(_images(2, channels=2))


# -------------------------------------------------------- Fréchet distance --


@pytest.mark.parametrize("name", ["metrics_fid_250x16.npz",
                                  "metrics_fid_500x64.npz"])
def test_frechet_distance_matches_official(fixture, name):
  d = fixture(name)
  mu1, sigma1 = fid.statistics(d["f1"])
  np.testing.assert_allclose(mu1, d["mu1"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(sigma1, d["sigma1"], rtol=1e-6, atol=1e-7)
  official = float(d["fid"])
  assert fid.frechet_distance(d["mu1"], d["sigma1"], d["mu2"],
                              d["sigma2"]) == pytest.approx(official, rel=1e-3)
  assert fid.fid_from_activations(d["f1"], d["f2"]) == pytest.approx(
      official, rel=1e-3)
  # Against itself: the official numerical floor, far below the distance.
  own = fid.fid_from_activations(d["f1"], d["f1"])
  assert abs(own) <= max(1e-9, 100 * abs(float(d["fid_self"])))
  assert abs(own) < 1e-8 * official


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_fallback_and_checks(caplog):
  mu = np.zeros(2)
  # No square root exists: pytorch-fid adds 1e-6 to the diagonals and goes on.
  nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])
  value = fid.frechet_distance(mu, nilpotent, mu, np.eye(2))
  assert np.isfinite(value)
  assert "adding 1e-06 to the diagonal" in caplog.text
  # A large imaginary part is an error, not silently dropped.
  with pytest.raises(ValueError, match="imaginary component"):
    fid.frechet_distance(mu, np.eye(2), mu, -np.eye(2))
  with pytest.raises(ValueError, match="different shapes"):
    fid.frechet_distance(mu, np.eye(2), mu, np.eye(3))
  with pytest.raises(ValueError, match="N >= 2"):
    fid.statistics(np.zeros((1, 4)))
