"""``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml): Hydra's submitit SLURM launcher plus a watch for jobs
that vanish without a result on a cluster without accounting (:mod:`.launcher`). Any Hydra app can use it: it
depends on Hydra, submitit and hydra-submitit-launcher only. Hydra requires a launcher to live under
``hydra_plugins``; without hydra-submitit-launcher installed the module defines nothing (no warning at start-up).
"""
