"""Ab initio engines (``cryocli abinitio --method NAME``); importing this package registers them."""

from cryocli.engines.abinitio.cryo2ssnet import Cryo2SSNetConfig, Cryo2SSNetEngine
from cryocli.engines.abinitio.cryospin import CryoSpinConfig, CryoSpinEngine
from cryocli.engines.abinitio.sagd import SAGDConfig, SAGDEngine

__all__ = ["Cryo2SSNetConfig", "Cryo2SSNetEngine", "CryoSpinConfig", "CryoSpinEngine", "SAGDConfig", "SAGDEngine"]
