"""Production I/O shared by every stage: `webdataset` (shards: list, read, write, the sample
key and image extensions) and `parquet` (listing, URIs, atomic writes)."""
