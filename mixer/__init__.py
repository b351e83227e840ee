"""mixer: a dynamic data-mixing service for LLM pretraining."""

__version__ = "0.1.0"
