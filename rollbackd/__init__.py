"""rollbackd: monitoring and auto-rollback for model-serving deployments."""

__version__ = "0.1.0"
