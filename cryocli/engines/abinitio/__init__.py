"""Ab initio engines (``cryocli abinitio --method NAME``); importing this package registers them."""

from cryocli.engines.abinitio.cryospin import CryoSpinConfig, CryoSpinEngine

__all__ = ["CryoSpinConfig", "CryoSpinEngine"]
