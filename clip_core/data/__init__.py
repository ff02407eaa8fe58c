"""Production I/O shared by every stage: `webdataset` (shards: list, read, write, the sample
key and image extensions), `parquet` (listing, URIs, column checks, atomic writes) and `staging`
(a stage's outputs built aside and swapped in whole)."""
