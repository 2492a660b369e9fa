"""Workdir file access that works for local paths and gs:// (TPU pods) alike.

Every file a run writes into its workdir goes through here: etils.epath
dispatches to the local file system or to GCS, and writes are atomic (a
temporary name, then a rename) so a killed run never leaves half a file under
the final name.
"""

from __future__ import annotations

import io
import os

from etils import epath


def is_remote(path: str) -> bool:
  return "://" in str(path)


def resolve(path: str) -> str:
  """An absolute local path, or a URL (gs://...) unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` through a temporary file and a rename."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(target)


def save_image(path: str, image, fmt: str = "PNG", **kwargs) -> None:
  """Saves a PIL image atomically (format given, since the name may be remote)."""
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  write_atomic(path, buffer.getvalue())
