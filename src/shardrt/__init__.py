"""shardrt: run one GGUF language model across the devices and processes of a mixed box."""

__version__ = "0.1.0"
