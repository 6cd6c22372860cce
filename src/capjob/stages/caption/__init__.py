"""Stage: the caption step, Ray Data LLM (vLLM) around prepared images: requests -> engine -> records."""
