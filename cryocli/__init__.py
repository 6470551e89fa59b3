"""cryocli: cryo-EM single-particle reconstruction from the command line, in RELION's conventions."""

__version__ = "0.1.0"
