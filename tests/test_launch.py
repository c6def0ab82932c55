"""launch/pod.py in --dry-run: the exact gcloud command lines for each step, single- and multi-slice."""

import importlib.util
import io
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

POD = Path(__file__).resolve().parents[1] / "launch" / "pod.py"


@pytest.fixture(scope="module")
def pod():
    spec = importlib.util.spec_from_file_location("skyjax_launch_pod", POD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry(pod, *argv):
    out = io.StringIO()
    assert pod.main(["--dry-run", *argv], out=out) == 0
    return [shlex.split(line) for line in out.getvalue().splitlines()]


def test_create_single_and_multi_slice(pod):
    (cmd,) = dry(pod, "create", "my-pod", "--zone", "us-west4-a", "--topology", "v5e:4x4", "--spot")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod", "--zone=us-west4-a",
                   "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"]
    (cmd,) = dry(pod, "create", "big", "--zone", "us-east5-a", "--project", "proj", "--topology", "v5p:2x2x2",
                 "--num-slices", "4")
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "big", "--zone=us-east5-a",
                   "--project=proj", "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5",
                   "--node-count=4", "--node-prefix=big"]
    (cmd,) = dry(pod, "create", "q", "--zone", "z", "--accelerator-type", "v6e-16", "--queued", "--reserved")
    assert cmd[4:] == ["create", "q", "--zone=z", "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e",
                       "--node-id=q", "--reserved"]


def test_accelerator_names(pod):
    assert pod.accelerator_type("v5e:2x4") == ("v5litepod-8", "v2-alpha-tpuv5-lite")
    assert pod.accelerator_type("v6e:16x16") == ("v6e-256", "v2-alpha-tpuv6e")
    assert pod.accelerator_type("v4:2x2x4") == ("v4-32", "tpu-ubuntu2204-base")  # v4 counts TensorCores
    assert pod.accelerator_type("v5:4x4x4") == ("v5p-128", "v2-alpha-tpuv5")
    with pytest.raises(pod.PodError, match="GKE only"):
        pod.accelerator_type("tpu7x:2x2x1")
    with pytest.raises(pod.PodError, match="GENERATION:AxB"):
        pod.accelerator_type("v5litepod-16")


def test_setup_ships_the_repo_and_installs_skyjax_tpu_on_every_worker_of_every_slice(pod):
    cmds = dry(pod, "setup", "my-pod", "--zone", "z", "--num-slices", "2")
    archive, scp0, scp1, ssh0, ssh1 = cmds
    assert archive[:3] == ["git", "-C", str(POD.parents[1])] and archive[3] == "archive" and archive[-1] == "HEAD"
    tarball = archive[archive.index("-o") + 1]
    assert scp0 == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-pod-0:skyjax-src.tar.gz", "--zone=z",
                    "--worker=all"]
    assert scp1[6] == "my-pod-1:skyjax-src.tar.gz"
    for node, ssh in (("my-pod-0", ssh0), ("my-pod-1", ssh1)):
        assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, "--zone=z", "--worker=all", "--command"]
        script = ssh[9]
        assert "--python 3.11 ~/skyjax-venv" in script
        assert '"$HOME/skyjax[tpu]"' in script  # the tpu extra: jax[tpu] (libtpu) and tpu-info
        assert script.endswith("~/skyjax-venv/bin/tpu-info")
    (ssh,) = dry(pod, "setup", "p", "--zone", "z", "--source", "git+https://github.com/org/skyjax@main")
    assert "'skyjax[tpu] @ git+https://github.com/org/skyjax@main'" in ssh[-1]


def test_run_copies_inputs_then_starts_the_same_command_everywhere(pod, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("kind: sft\n")
    cmds = dry(pod, "run", "my-pod", "--zone", "z", "--num-slices", "2", "--copy", str(cfg), "--copy",
               "gs://bucket/data", "--env", "JAX_COMPILATION_CACHE_DIR=gs://bucket/cache", "--", "train", "run.yaml",
               "optimizer.lr=1e-5", "name=my run")
    mkdir = cmds[:2]
    assert [c[5] for c in mkdir] == ["my-pod-0", "my-pod-1"] and mkdir[0][-1] == "mkdir -p ~/skyjax-run"
    assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(cfg), "my-pod-0:skyjax-run/", "--zone=z",
                       "--worker=all"]
    assert cmds[3][6] == "my-pod-1:skyjax-run/"
    assert cmds[4][-1] == "set -e; gcloud storage cp --recursive gs://bucket/data ~/skyjax-run/"
    runs = cmds[6:]
    assert [c[5] for c in runs] == ["my-pod-0", "my-pod-1"] and all("--worker=all" in c for c in runs)
    script = runs[0][-1]
    assert runs[1][-1] == script  # every host runs the identical command
    assert "export JAX_COMPILATION_CACHE_DIR=gs://bucket/cache;" in script
    assert "nohup ~/skyjax-venv/bin/skyjax train run.yaml optimizer.lr=1e-5 'name=my run' > ~/skyjax-run/run.log" \
        in script
    assert script.endswith("& echo $! > ~/skyjax-run/run.pid")
    # the remote shell parses the script back into the same skyjax argv
    remote = shlex.split(script.split("nohup ", 1)[1].split(" >", 1)[0])
    assert remote == ["~/skyjax-venv/bin/skyjax", "train", "run.yaml", "optimizer.lr=1e-5", "name=my run"]


def test_logs_monitor_stop_delete(pod):
    (logs,) = dry(pod, "logs", "p", "--zone", "z", "--lines", "20")
    assert logs[7:] == ["--worker=0", "--command", "tail -n 20 ~/skyjax-run/run.log"]
    monitor = dry(pod, "monitor", "p", "--zone", "z", "--num-slices", "3", "--iap")
    assert [m[5] for m in monitor] == ["p-0", "p-1", "p-2"]
    assert monitor[0][7:] == ["--worker=all", "--tunnel-through-iap", "--command", "~/skyjax-venv/bin/tpu-info"]
    (stop,) = dry(pod, "stop", "p", "--zone", "z")
    assert "kill -TERM $(cat ~/skyjax-run/run.pid)" in stop[-1]
    assert dry(pod, "delete", "p", "--zone", "z") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "p", "--zone=z", "--quiet"]]
    assert dry(pod, "delete", "p", "--zone", "z", "--num-slices", "2") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "p", "--zone=z", "--force", "--quiet"]]
    assert dry(pod, "status", "p", "--zone", "z", "--queued")[0][3:6] == ["queued-resources", "describe", "p"]


def test_errors_and_nothing_runs_in_dry_run(pod, monkeypatch, capsys):
    monkeypatch.delenv("SKYJAX_ZONE", raising=False)
    with pytest.raises(SystemExit):
        pod.main(["--dry-run", "create", "p", "--topology", "v5e:2x2"])
    assert "--zone is required" in capsys.readouterr().err
    assert pod.main(["--dry-run", "create", "p", "--zone", "z"], out=io.StringIO()) == 2
    assert "exactly one of --topology" in capsys.readouterr().err
    assert pod.main(["--dry-run", "run", "p", "--zone", "z"], out=io.StringIO()) == 2
    assert "needs the skyjax command after `--`" in capsys.readouterr().err
    assert pod.main(["--dry-run", "run", "p", "--zone", "z", "--env", "1BAD=x", "--", "train", "x"],
                    out=io.StringIO()) == 2

    def boom(*a, **k):
        raise AssertionError("dry-run must not execute anything")

    monkeypatch.setattr(subprocess, "Popen", boom)
    monkeypatch.setattr(subprocess, "run", boom)
    dry(pod, "setup", "p", "--zone", "z")
    dry(pod, "run", "p", "--zone", "z", "--", "train", "x.yaml")


def test_runner_executes_and_reports_failures(pod):
    out = io.StringIO()
    runner = pod.Runner(dry_run=False, out=out)
    assert runner.run_all([[sys.executable, "-c", "pass"], [sys.executable, "-c", "pass"]]) == 0
    assert out.getvalue().startswith("+ ")
    with pytest.raises(SystemExit, match="exit code 3"):
        runner.run([sys.executable, "-c", "raise SystemExit(3)"])


def test_script_runs_from_the_command_line():
    done = subprocess.run([sys.executable, str(POD), "--dry-run", "delete", "p", "--zone", "z"],
                          capture_output=True, text=True, check=True)
    assert done.stdout == "gcloud compute tpus tpu-vm delete p --zone=z --quiet\n"
