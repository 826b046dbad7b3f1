"""The benchmark harness: datasets, accuracy probes, feature cache, latency and reports."""
