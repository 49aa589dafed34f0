"""What every step of the series shares besides the Trainer: configuration, the run's schedule,
where it runs (device, process group, stop signals), its run directory, snapshots, atomic files
and the Slurm environment. The launchers, `trainer.py` and `datautils.py` at the root are the
series; this package is what they stand on."""
