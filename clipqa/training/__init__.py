"""One training run: the model and optimizer builders (build), seeds/device/precision (device), splits, labels, the
feature cache choice and DataLoaders (loaders), the loop (loop), what it changes as it goes (state), phases
(schedule), checkpoints (checkpoint), SIGTERM/SIGUSR2 (signals), GPU leases (gpu_leases) and the run function that
wires them to tracking, resume and artifacts (run)."""
