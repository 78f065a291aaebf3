"""qconvert: turn a Flux checkpoint into pre-quantized checkpoints loadable with one call."""

__version__ = "0.1.0"
