"""What every ``abinitio`` and ``refine`` method is: its configuration, its protocol, the registry by name.

* :class:`EngineConfig`: the options every engine shares; each engine subclasses it with its own fields,
  whose defaults are its paper's, and extends :meth:`EngineConfig.validate`.
* :class:`Engine`: the protocol (``name``, ``kind``, ``summary``, ``config_class``,
  ``check_inputs(data, config)``, ``run(data, config, reporter) -> Reconstruction``). Engines neither print nor write files.
* A registry by method name (:func:`register_engine`, :func:`get_engine`, :func:`engine_names`,
  :func:`engine_summaries`).

Errors are raised in the engine's own terms (:class:`~cryocli.errors.OptionError` names the config
field); the command line translates field names into its flags.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from cryocli.errors import CryocliError, OptionError

if TYPE_CHECKING:
    from cryocli.engines.progress import Reporter
    from cryocli.engines.result import Reconstruction
    from cryocli.io.dataset import ParticleStack


@dataclass
class EngineConfig:
    """Options shared by every engine.

    epochs: passes over the particles. batch_size: particles per step. lr: the engine's main learning
    rate (``None``: the engine's default). box: Fourier-crop the particles to this box in pixels
    (``None``: keep the data's box); the map comes out at that box and its pixel size.
    max_particles: use only the first N particles. invert: ``True`` multiplies the images by -1 (dark
    protein data), ``False`` keeps them, ``None`` detects the sign. seed: every random draw (>= 0).
    use_ctf: correct for the CTF of each particle (``False`` only for data without a CTF).
    particle_diameter: Angstrom, for masks (``None``: 0.8 x the box).
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float | None = None
    box: int | None = None
    max_particles: int | None = None
    invert: bool | None = None
    seed: int = 0
    use_ctf: bool = True
    particle_diameter: float | None = None

    #: Fields a ``resume`` may change: how long the run goes on, and the memory it takes (a run that ran short of
    #: memory goes on with a smaller batch, as :data:`cryocli.errors.MEMORY_ADVICE` says). Every other field must
    #: be the one the run started with (:meth:`check_resumes`).
    resume_may_change: ClassVar[frozenset[str]] = frozenset({"epochs", "batch_size", "preload"})

    def as_dict(self) -> dict[str, Any]:
        """The configuration as plain values (for logs and checkpoints)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def validate(self) -> None:
        """Refuse values the method cannot run with (:class:`OptionError` naming the field), before any work."""
        at_least(self, "epochs", 1)
        at_least(self, "batch_size", 1)
        at_least(self, "seed", 0)
        if self.lr is not None:
            positive(self, "lr")
        if self.box is not None:
            at_least(self, "box", 8)
            if self.box % 2:
                raise OptionError("box", self.box, "the box must be even")
        if self.max_particles is not None:
            at_least(self, "max_particles", 2)
        if self.particle_diameter is not None:
            positive(self, "particle_diameter")

    def check_resumes(self, saved: dict[str, Any] | None) -> None:
        """Refuse to resume a run whose checkpoint holds the configuration ``saved`` (:meth:`as_dict`; ``None``: an
        older checkpoint without one) with other values of the fields outside :attr:`resume_may_change`: the
        run would go on as a mixture no single set of options makes (another seed or symmetry, other half sets,
        another mask), and its maps and resolutions would not be those of the options it reports.
        :class:`OptionError` names the first such field."""
        if not saved:
            return
        for name, value in self.as_dict().items():
            if name in self.resume_may_change or name not in saved or saved[name] == value:
                continue
            raise OptionError(name, "(default)" if value is None else value,
                              f"the run to resume was made with {'the default' if saved[name] is None else saved[name]}"
                              "; --resume continues a run with the options it started with (only its length, batch "
                              "size and preload may change): give the same, or start again with --force")


def positive(config: Any, name: str) -> None:
    """``config.name`` must be a finite number > 0."""
    value = getattr(config, name)
    if value is None or not math.isfinite(float(value)) or float(value) <= 0:
        raise OptionError(name, value, "must be a positive number")


def at_least(config: Any, name: str, low: float) -> None:
    """``config.name`` must be a finite number >= ``low``."""
    value = getattr(config, name)
    if value is None or not math.isfinite(float(value)) or float(value) < low:
        raise OptionError(name, value, f"must be at least {low:g}")


def within(config: Any, name: str, low: float, high: float) -> None:
    """``config.name`` must be a finite number in ``[low, high]``."""
    value = getattr(config, name)
    if value is None or not math.isfinite(float(value)) or not low <= float(value) <= high:
        raise OptionError(name, value, f"must be between {low:g} and {high:g}")


class Engine(Protocol):
    """A reconstruction method. ``run`` reads the particles, reports through ``reporter`` and returns the
    result; it neither prints nor writes files. An engine that sets the class attribute ``data_parallel = True``
    shares its particles over torchrun's ranks (:mod:`cryocli.distributed`) and returns the same whole result on
    every rank; under torchrun the others are refused."""

    name: ClassVar[str]
    kind: ClassVar[str]          # "abinitio" or "refine"
    summary: ClassVar[str]       # one line for ``--help``
    config_class: ClassVar[type[EngineConfig]]

    def check_inputs(self, data: ParticleStack, config: EngineConfig) -> None:
        """Refuse, before any work, inputs beyond the particles that cannot start a run (e.g. a reference)."""
        ...

    def run(self, data: ParticleStack, config: EngineConfig, reporter: Reporter) -> Reconstruction: ...


_REGISTRY: dict[str, type[Engine]] = {}
_EngineType = TypeVar("_EngineType", bound=Engine)


def register_engine(cls: type[_EngineType]) -> type[_EngineType]:
    """Class decorator: make an engine available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def engine_names(kind: str | None = None) -> list[str]:
    """Registered method names (of one ``kind`` when given), in registration order."""
    _load_builtin_engines(kind)
    return [n for n, c in _REGISTRY.items() if kind is None or c.kind == kind]


def engine_summaries(kind: str | None = None) -> dict[str, str]:
    """``{name: one-line summary}`` of the registered methods."""
    return {n: _REGISTRY[n].summary for n in engine_names(kind)}


def get_engine(name: str, kind: str | None = None, **options: Any) -> Engine:
    """An instance of the engine called ``name`` (``options`` go to its constructor, e.g. ``device``);
    :class:`OptionError` on ``method`` listing the choices otherwise."""
    names = engine_names(kind)
    if name not in names:
        raise OptionError("method", name, f"unknown method; choose from {', '.join(names) or 'none'}")
    engine: Engine = _REGISTRY[name](**options)
    return engine


def build_config(engine: Engine, options: dict[str, Any]) -> EngineConfig:
    """The engine's validated config from ``options`` (``None`` means "the paper's default").

    An option the method does not have is an :class:`OptionError` on that option.
    """
    known = {f.name for f in fields(engine.config_class)}
    for key, value in options.items():
        if value is not None and key not in known:
            raise OptionError(key, value, f"method {engine.name} has no such option")
    config = engine.config_class(**{k: v for k, v in options.items() if v is not None})
    config.validate()
    return config


def _load_builtin_engines(kind: str | None = None) -> None:
    """Import the engine packages of ``kind`` (both when ``None``): their @register_engine decorators run."""
    for package in ("abinitio", "refine"):
        if kind is None or kind == package:
            importlib.import_module(f"cryocli.engines.{package}")


def unknown_choice(name: str, value: Any, choices: tuple[str, ...]) -> CryocliError:
    """The error for a value outside a fixed set of choices."""
    return OptionError(name, value, f"choose from {', '.join(choices)}")
