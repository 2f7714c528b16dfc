"""Metrics: complexity (params, MACs), fidelity (FID/KID), consistency (SSIM), latency."""
