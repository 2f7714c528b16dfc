"""Metrics: complexity (params, MACs), fidelity (FID/KID), consistency (SSIM), CLIP score, latency.

Pure measurement functions and the networks they need; the evaluate stage (`evaluation*.py`) decides
what to measure and writes the JSON. Imports point one way inside the package:
`extractor_base` <- `digits_net`, `inception` <- `features` (the extractor registry); `feature_choice`
(numpy only: which net may judge which images, `--feature-net auto`) <- `features`; `fid` (numpy
only) <- `inception`, `digits_net`; `imageset` <- `ssim`. Outside it: `errors`, `fsutil`, `data`, and
`latency` -> `sampling` (throughput of the sampling loop). `complexity` is shared with the prune
stage (size search counts MACs with the same counter). A new metric is one module here plus its
call in the evaluate stage and its row in `report/tables.py`.
"""
