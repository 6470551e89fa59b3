"""A simulated CUDA device for machines without one: finds tensors left on the wrong device before a GPU does.

On a CPU-only machine the ``cuda`` parametrisations of the device-agnostic tests do not run, and the engines'
``--device cuda`` path is never taken, so a tensor created on the CPU and mixed with device tensors (the commonest
GPU-only bug) would first show on a lent GPU. Under :func:`simulated_cuda`, tensors sent to ``cuda`` stay in host
memory but are tagged (:class:`FakeCuda`, whose ``device`` is ``cuda:0``), and what CUDA refuses is refused here:

* an operation mixing a tagged tensor with an untagged one of dimension > 0, or with a numpy array (0-dimensional
  CPU tensors mix freely, as on CUDA; CPU tensors may index tagged ones, as on CUDA);
* ``.numpy()`` or ``np.asarray`` of a tagged tensor;
* a random draw whose generator is not on the draw's device (``torch.Generator(device="cuda")`` makes a tagged one).

Modules moved with ``.to("cuda")`` get tagged parameters and buffers, and their gradients are tagged after the
backward pass. ``torch.cuda.is_available()`` answers True, pinned memory is plain memory, and the memory statistics
are zero (so a test of the peak GPU memory fails here). The arithmetic is the CPU's: this checks where tensors
live, not what a GPU computes (cuFFT, atomic-add rounding, TF32). Opt-in, not part of the default suite::

    pytest -p tests.fake_cuda tests/test_projector.py     # the [cuda] cases of the device-parametrised tests
    python -m tests.fake_cuda reconstruct particles.star -o map.mrc     # a cryocli command with --device cuda
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda", 0)
_RealGenerator = torch.Generator
_cuda_generators: weakref.WeakSet[torch.Generator] = weakref.WeakSet()
_tagged_parameters: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()


class FakeCudaError(RuntimeError):
    """What CUDA would have refused (a device mismatch, a numpy conversion, a generator on another device)."""


class FakeCuda(torch.Tensor):
    """A host tensor that says it lives on ``cuda:0``."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def numpy(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise FakeCudaError("can't convert a cuda:0 tensor to numpy (use .cpu() first)")

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise FakeCudaError("can't convert a cuda:0 tensor to numpy (use .cpu() first)")


def _plain(t: Any) -> Any:
    if isinstance(t, FakeCuda):
        with torch._C.DisableTorchFunction():
            return torch.Tensor.as_subclass(t, torch.Tensor)
    return t


def _tag(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and not isinstance(t, FakeCuda):
        with torch._C.DisableTorchFunction():
            return torch.Tensor.as_subclass(t, FakeCuda)
    return t


def _tag_all(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _tag(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuples (torch.return_types)
        return type(obj)(*(_tag_all(o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tag_all(o) for o in obj)
    return obj


def _names_cuda(device: Any) -> bool:
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cuda"
    return isinstance(device, int)  # a bare index means a CUDA device


def _leaves(obj: Any, out: list[Any]) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        for o in obj:
            _leaves(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _leaves(o, out)
    else:
        out.append(obj)
    return out


FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace, torch.logspace, torch.eye,
             torch.tensor, torch.as_tensor, torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal,
             torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.randn_like, torch.rand_like,
             torch.fft.fftfreq, torch.fft.rfftfreq, torch.scalar_tensor, torch.tril_indices, torch.triu_indices,
             torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full,
             torch.Tensor.new_tensor}
MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.type_as}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


class FakeCudaMode(TorchFunctionMode):
    """Routes every torch call: factories and moves make or drop the tag, other calls are checked for mixed devices
    and their outputs tagged when an input was."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        if func in MOVES:
            return _move(func, args, kwargs)
        if name.endswith("_has_compatible_shallow_copy_type"):
            with torch._C.DisableTorchFunction():
                return func(*args, **kwargs)
        _check_generator(name, args, kwargs)
        if func in FACTORIES or kwargs.get("device") is not None:
            device = kwargs.get("device")
            if device is None:  # new_* and *_like follow the tensor they are called on
                cuda = bool(args) and isinstance(args[0], FakeCuda) and (".new_" in name or "_like" in name)
            else:
                cuda = _names_cuda(device)
                kwargs["device"] = "cpu"
            with torch._C.DisableTorchFunction():
                out = func(*args, **kwargs)
            return _tag_all(out) if cuda else out
        if func is torch.autograd.grad:  # autograd's own outputs (undefined gradients) are made untagged in C++
            with torch._C.DisableTorchFunction():
                out = func(*args, **kwargs)
            return _tag_all(out) if any(isinstance(a, FakeCuda) for a in _leaves([args, kwargs], [])) else out
        tagged = _check_devices(func, name, args, kwargs)
        with torch._C.DisableTorchFunction():
            out = func(*args, **kwargs)
        if func is torch.Tensor.__setitem__:
            return out
        return _tag_all(out) if tagged else out


def _check_generator(name: str, args: tuple, kwargs: dict) -> None:
    generator = kwargs.get("generator")
    if generator is None:
        return
    if kwargs.get("device") is not None:
        on_cuda = _names_cuda(kwargs["device"])
    else:  # a draw shaped like, or into, its first tensor argument (rand_like, multinomial, normal_, uniform_)
        on_cuda = bool(args) and isinstance(args[0], FakeCuda)
    if on_cuda != (generator in _cuda_generators):
        raise FakeCudaError(f"{name}: the generator is not on the draw's device")


def _check_devices(func: Any, name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the call has a tagged input; raises when it also has an untagged one CUDA would refuse."""
    if func in INDEXING:
        base, rest = args[0], _leaves(list(args[1:]), [])
        if isinstance(base, FakeCuda):
            if func is torch.Tensor.__setitem__:
                value = args[2]
                if (isinstance(value, torch.Tensor) and not isinstance(value, FakeCuda) and value.dim() > 0) or (
                        isinstance(value, np.ndarray) and value.ndim > 0):
                    raise FakeCudaError(f"{name}: CPU values written into a cuda tensor")
            return True
        if any(isinstance(a, FakeCuda) for a in rest):
            raise FakeCudaError(f"{name}: a cuda index or value used on a CPU tensor")
        return False
    items = _leaves([args, kwargs], [])
    tagged = [a for a in items if isinstance(a, FakeCuda)]
    plain = [a for a in items if (isinstance(a, torch.Tensor) and not isinstance(a, FakeCuda) and a.dim() > 0)
             or (isinstance(a, np.ndarray) and a.ndim > 0)]
    if tagged and plain:
        raise FakeCudaError(f"{name}: cuda tensors mixed with CPU tensors or arrays of shapes "
                            f"{[tuple(p.shape) for p in plain]}")
    return bool(tagged)


def _move(func: Any, args: tuple, kwargs: dict) -> Any:
    """``.to``, ``.cuda``, ``.cpu``, ``.type_as``: the conversion on the host tensor, tagged by the target device."""
    source = args[0]
    was_cuda = isinstance(source, FakeCuda)
    with torch._C.DisableTorchFunction():
        plain = _plain(source)
        if func is torch.Tensor.cpu:
            return torch.Tensor.clone(plain) if was_cuda else source
        if func is torch.Tensor.cuda:
            return source if was_cuda else _tag(torch.Tensor.clone(plain))
        if func is torch.Tensor.type_as:
            out, cuda = torch.Tensor.to(plain, args[1].dtype), isinstance(args[1], FakeCuda)
        else:
            cuda, rest = was_cuda, []
            for a in args[1:]:
                if a is None:
                    continue
                if isinstance(a, (str, torch.device)):
                    cuda = _names_cuda(a)
                elif isinstance(a, torch.Tensor):
                    cuda = isinstance(a, FakeCuda)
                    rest.append(a.dtype)
                else:
                    rest.append(a)
            device = kwargs.pop("device", None)
            if device is not None:
                cuda = _names_cuda(device)
            if kwargs.get("dtype", 0) is None:
                kwargs.pop("dtype")
            out = torch.Tensor.to(plain, *rest, **kwargs) if (rest or kwargs) else plain  # type: ignore[call-overload]
        if cuda == was_cuda:
            return (source if out is plain else _tag(out)) if cuda else out
        if out.data_ptr() == plain.data_ptr():  # a move copies, as between devices
            out = torch.Tensor.clone(out)
        return _tag(out) if cuda else _plain(out)


def _generator(device: Any = None) -> torch.Generator:
    generator = _RealGenerator()
    if device is not None and _names_cuda(device):
        _cuda_generators.add(generator)
    return generator


def _module_to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """``Module.to``: a move to or from ``cuda`` swaps the parameters for tagged (or plain) leaves that are still
    parameters; anything else (a dtype alone) goes to PyTorch's own."""
    target = next((_names_cuda(a) if not isinstance(a, torch.Tensor) else isinstance(a, FakeCuda)
                   for a in [*args, kwargs.get("device")] if isinstance(a, (str, torch.device, torch.Tensor))), None)
    if target is None:
        return _REAL["module_to"](self, *args, **kwargs)
    for module in self.modules():
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            with torch._C.DisableTorchFunction():
                data = torch.Tensor.clone(torch.Tensor.detach(_plain(p)))
            if target:
                moved = _tag(data)
                moved.requires_grad_(p.requires_grad)
                moved._is_param = True  # isinstance(moved, nn.Parameter), as Module.__setattr__ checks
                _tagged_parameters.add(moved)
            else:
                moved = torch.nn.Parameter(data, requires_grad=p.requires_grad)
            module._parameters[key] = moved
        for key, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[key] = _tag(_plain(b)) if target else _plain(b)
    return self


def _backward(*args: Any, **kwargs: Any) -> Any:
    """The backward pass, then the gradients of tagged parameters tagged (autograd makes them untagged)."""
    with torch._C.DisableTorchFunction():
        out = _REAL["backward"](*args, **kwargs)
    for p in list(_tagged_parameters):
        if p.grad is not None and not isinstance(p.grad, FakeCuda):
            with torch._C.DisableTorchFunction():
                p.grad = _tag(p.grad)
    return out


_REAL: dict[str, Any] = {}


@contextmanager
def simulated_cuda() -> Iterator[None]:
    """Within the block, ``cuda`` is a simulated device (see the module docstring); everything is restored after."""
    import torch.distributed.tensor  # noqa: F401  (imported while torch.Generator is still the class it annotates)
    import torch.optim  # noqa: F401

    patches: list[tuple[Any, str, Any]] = [
        (torch, "Generator", _generator), (torch.nn.Module, "to", _module_to), (torch.autograd, "backward", _backward),
        (torch.cuda, "is_available", lambda: True), (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "current_device", lambda: 0), (torch.cuda, "set_device", lambda device: None),
        (torch.cuda, "synchronize", lambda *a, **k: None), (torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None),
        (torch.cuda, "max_memory_allocated", lambda *a, **k: 0), (torch.cuda, "get_device_name", lambda *a, **k: "fake"),
        (torch.Tensor, "pin_memory", lambda self, *a, **k: self), (torch.Tensor, "is_pinned", lambda self, *a, **k: False),
    ]
    _REAL.update(module_to=torch.nn.Module.to, backward=torch.autograd.backward)
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    for owner, attr, value in patches:
        setattr(owner, attr, value)
    try:
        with FakeCudaMode():
            yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


# ------------------------------------------------------------------------------------------------ pytest plugin


def pytest_configure(config: pytest.Config) -> None:
    """Add ``cuda`` to the devices the tests are parametrised over."""
    from tests import conftest

    if "cuda" not in conftest.DEVICES:
        conftest.DEVICES.append("cuda")


@pytest.fixture(autouse=True)
def _simulated_cuda_for_cuda_cases(request: pytest.FixtureRequest) -> Iterator[None]:
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("device") != "cuda":
        yield
        return
    with simulated_cuda():
        yield


def main(argv: list[str]) -> int:
    """``python -m tests.fake_cuda <cryocli arguments>``: the command, in this process, with ``--device cuda``."""
    from typer.testing import CliRunner

    from cryocli.cli.app import app

    with simulated_cuda():
        result = CliRunner().invoke(app, ["--device", "cuda", *argv])
    sys.stdout.write(result.output)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        traceback.print_exception(result.exception)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
