"""Refinement engines (``cryocli refine --method NAME``); importing this package registers them."""

from cryocli.engines.refine.relion import RefineConfig, RelionRefineEngine
from cryocli.engines.refine.sparse_tv import SparseTVConfig, SparseTVRefineEngine

__all__ = ["RefineConfig", "RelionRefineEngine", "SparseTVConfig", "SparseTVRefineEngine"]
