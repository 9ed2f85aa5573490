"""The comparison report over runs of an experiment or a sweep: statistics, run selection, rendering and charts."""
