"""capjob: config-driven batch captioning of image datasets with VLMs (Ray Data LLM + vLLM)."""

__version__ = "0.1.0"
