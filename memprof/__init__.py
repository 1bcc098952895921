"""memprof: memory and throughput profiling for fine-tuning transformers (estimate, trace, measure, compare)."""

__version__ = "0.1.0"
