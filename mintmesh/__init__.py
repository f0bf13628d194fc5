"""MinT mesh: serve and manage millions of per-user LoRA adapters on one resident backbone."""

__version__ = "0.1.0"
