"""route: GRPO post-training with gradient routing into an ablatable quarantine."""

__version__ = "0.1.0"
