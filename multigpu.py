"""Step 2 of the series: one machine, one process per GPU, started by mp.spawn.

    python multigpu.py [total_epochs] [save_every] [--batch_size 32] [--nprocs N]

The script sets MASTER_ADDR/MASTER_PORT itself (a free port, so two jobs never collide) and starts
the processes (support.runtime.spawn: RANK, LOCAL_RANK and WORLD_SIZE set as torchrun sets them; a
failed job ends with one `error:` line, the first failing rank's). Without GPUs, `--nprocs N` runs N CPU processes with the gloo backend.
"""

import os
import sys
from datetime import timedelta

import torch
from torch.distributed import destroy_process_group, init_process_group

from datautils import prepare_dataloader
from job import load_train_objs
from support import runtime
from support.config import Config, arg_parser, config_or_exit
from support.errors import one_line_errors
from trainer import Trainer


def ddp_setup(rank: int, world_size: int, port: int, cfg: Config) -> torch.device:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    device = runtime.pick_device(cfg.device, rank)  # one node: the local rank is the global rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # processes share the CPU cores instead of each using them all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    init_process_group(backend=runtime.backend_for(device), rank=rank, world_size=world_size,
                       timeout=timedelta(seconds=cfg.collective_timeout_s))
    return device


@one_line_errors
def main(rank: int, world_size: int, port: int, cfg: Config) -> None:
    device = ddp_setup(rank, world_size, port, cfg)
    try:
        objs = load_train_objs(cfg)
        train_data = prepare_dataloader(objs.train_set, objs.schedule, cfg.num_workers, cfg.seed)
        trainer = Trainer(cfg, objs.model, train_data, objs.optimizer, objs.schedule,
                          objs.query_set, objs.gallery_set, device)
        code = trainer.train()
    finally:
        destroy_process_group()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    parser = arg_parser(description=__doc__)
    parser.add_argument("--nprocs", type=int, default=torch.cuda.device_count() or 2,
                        help="processes to start (default: one per GPU, or 2 on a CPU)")
    args = parser.parse_args()
    if args.nprocs < 1:
        parser.error(f"--nprocs: expected at least 1 process, got {args.nprocs}")
    cfg = config_or_exit(parser, args)
    sys.exit(runtime.spawn(main, args=(args.nprocs, runtime.free_port(), cfg), nprocs=args.nprocs))
