"""How runs start: one machine, a Cloud TPU VM pod, a SLURM cluster; sweeps and their reports."""
