"""The pipeline's stages, in the order the data flows: sources/ (read) -> ids (and resume: the
ids already done) -> images (decode, validate, resize) -> caption/ (requests -> vLLM -> records)
-> sinks (write), with samples (the contact sheet's rows), tables (the output store) and storage
(fsspec) below them. A stage imports only stages below it and the leaf modules (docs/architecture.md)."""
