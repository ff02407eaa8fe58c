"""Data: WebDataset shard helpers and the synthetic web (generator, renderer, server).

Modules: `synthetic_web` (generate_web), `web_server` (serve_web, run_web_server),
`web_app` (responses as a pure function of the path), `eval_sets`, `scenes`, `render`,
`captions`, `concepts`, `web_spec`, `webdataset_io`. Nothing is imported here, so
importing one module stays cheap.
"""
