"""The comparison report over runs of an experiment or a sweep: make_report (comparison), runs -> labelled rows
(runs), the paired comparison with a baseline (paired), intervals and tests (statistics), report.md/csv (render) and
the charts (plots)."""
