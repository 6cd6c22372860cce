"""Test helpers shared by the suite: paths and config composition, local servers (S3, HTTP,
Prometheus), generated inputs and the shape-scene references."""
