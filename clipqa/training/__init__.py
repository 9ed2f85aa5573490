"""One training run: builders (build), the loop (loop), what it changes as it goes (state), phases (schedule),
checkpoints (checkpoint), SIGTERM/SIGUSR2 (signals), GPU leases (gpu_leases) and the run function that wires them to
tracking, resume and artifacts (run)."""
