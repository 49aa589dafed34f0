"""Step 4 of the series: several machines. Run the same torchrun command on every node:

    torchrun --nnodes=M --nproc_per_node=N --rdzv_id=JOB --rdzv_backend=c10d \
             --rdzv_endpoint=HEAD_HOST:29500 multinode.py [total_epochs] [save_every]

LOCAL_RANK (the process's index on its node) picks the device; RANK (unique in the job) decides
who does the once-per-job work. Nodes need not share a file system: the Trainer resumes from the
newest snapshot any node holds and sends it to the others. Started by `srun` alone (one task per
device, no torchrun), ranks and the head node's address come from Slurm's environment.
"""

import os
import socket
import sys
from datetime import timedelta

import torch
from torch.distributed import destroy_process_group, init_process_group

from datautils import prepare_dataloader
from job import load_train_objs
from support import runtime
from support.config import Config, parse_config
from support.errors import one_line_errors
from trainer import Trainer


def ddp_setup(cfg: Config) -> torch.device:
    runtime.apply_slurm_env()  # srun without torchrun: ranks come from Slurm
    local_rank, global_rank = int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"])
    device = runtime.pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group(backend=runtime.backend_for(device), store=runtime.restart_safe_store(),
                       rank=global_rank, world_size=int(os.environ["WORLD_SIZE"]),
                       timeout=timedelta(seconds=cfg.collective_timeout_s))
    if local_rank == 0:
        print(f"[{socket.gethostname()}] global rank {global_rank} of {os.environ['WORLD_SIZE']}, "
              f"local rank {local_rank} on {device}", flush=True)
    return device


@one_line_errors
def main(cfg: Config) -> int:
    device = ddp_setup(cfg)
    try:
        objs = load_train_objs(cfg)
        train_data = prepare_dataloader(objs.train_set, objs.schedule, cfg.num_workers, cfg.seed)
        trainer = Trainer(cfg, objs.model, train_data, objs.optimizer, objs.schedule,
                          objs.query_set, objs.gallery_set, device)
        return trainer.train()
    finally:
        destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(parse_config(description=__doc__)))
