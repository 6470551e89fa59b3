"""The simulated CUDA device of tests/fake_cuda.py refuses what CUDA refuses, and a command run on it computes what
the CPU computes (it checks where tensors live, so it must not change the arithmetic)."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from tests.conftest import RELION_SET, need
from tests.fake_cuda import FakeCudaError, main, simulated_cuda


def test_the_simulated_device_refuses_what_cuda_refuses() -> None:
    with simulated_cuda():
        assert torch.cuda.is_available()
        on_device = torch.zeros(3, device="cuda")
        assert on_device.device == torch.device("cuda", 0)
        with pytest.raises(FakeCudaError, match="mixed with CPU tensors"):
            on_device + torch.ones(3)
        with pytest.raises(FakeCudaError, match="numpy"):
            on_device.numpy()
        with pytest.raises(FakeCudaError, match="generator"):
            torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0))
        with pytest.raises(FakeCudaError, match="mixed with CPU tensors"):
            torch.nn.Linear(3, 2).to("cuda")(torch.ones(1, 3))
        # What CUDA allows: 0-dimensional CPU tensors, explicit moves, device generators, modules moved together.
        assert (on_device + torch.tensor(1.0)).device.type == "cuda"
        assert (on_device.cpu() + torch.ones(3)).device.type == "cpu"
        assert torch.rand(2, device="cuda", generator=torch.Generator(device="cuda")).device.type == "cuda"
        layer = torch.nn.Linear(3, 2).to("cuda")
        layer(torch.ones(1, 3, device="cuda")).sum().backward()
        assert layer.weight.device.type == "cuda" and layer.weight.grad is not None
        assert layer.weight.grad.device.type == "cuda"
    assert torch.zeros(2).device.type == "cpu" and torch.Generator is torch._C.Generator


def test_a_command_on_the_simulated_device_computes_what_the_cpu_computes(tmp_path: Path) -> None:
    star = need(RELION_SET / "noisy" / "noisy.star")
    maps = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.mrc"
        argv = ["--quiet", "--json", "reconstruct", str(star), "-o", str(out)]
        if device == "cpu":
            argv = ["--device", "cpu", *argv]
            from typer.testing import CliRunner

            from cryocli.cli.app import app

            assert CliRunner().invoke(app, argv).exit_code == 0
        else:
            assert main(argv) == 0
        maps[device] = mrcfile.read(out)
    scale = float(np.abs(maps["cpu"]).max())
    assert float(np.abs(maps["cuda"] - maps["cpu"]).max()) <= 1e-6 * scale
