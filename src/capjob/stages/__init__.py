"""The job's stages that are packages of their own (one module per variant)."""
