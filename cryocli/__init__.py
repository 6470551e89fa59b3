"""cryocli: cryo-EM single-particle reconstruction from the command line, in RELION's conventions."""

from cryocli.host_allocator import tune_host_allocator

__version__ = "0.1.0"

tune_host_allocator()
