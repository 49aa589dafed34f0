"""Step 3 of the series: torchrun starts the processes and restarts them after a failure.

    torchrun --standalone --nproc_per_node=N [--max-restarts=3] multigpu_torchrun.py [total_epochs] [save_every]

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. When a worker dies,
torchrun restarts all of them; the Trainer finds its snapshot and resumes where it stopped.
"""

import os
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
    device = runtime.pick_device(cfg.device, int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group(backend=runtime.backend_for(device), store=runtime.restart_safe_store(),
                       rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                       timeout=timedelta(seconds=cfg.collective_timeout_s))
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
