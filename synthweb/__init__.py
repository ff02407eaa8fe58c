"""The synthetic web: a deterministic stand-in for the internet that the pipeline crawls.

A fixture and the demo's source, never imported by production code (it imports clip_core,
not the other way round): `generator` writes pairs, truth and eval sets; `app` answers
every path as a pure function of it; `server` serves it on 127.0.0.1; `render`, `scenes`,
`captions` and `concepts` make its images and alt texts; `eval_sets` writes the eval sets
as WebDataset shards; `wat_writer` and `wat_export` write its pages as Common Crawl WAT files.
"""
