"""Step 1 of the series: the ArcFace job on one device (CUDA, else MPS, else CPU), no process group.

    python single_gpu.py [total_epochs] [save_every] [--batch_size 32] [--config configs/demo.toml]

With no arguments it trains the demo: a small ResNet on a synthetic In-Shop-format set that is
generated on first use, evaluated by Recall@K and mAP@10 before, during and after training.
"""

import sys

from datautils import prepare_dataloader
from job import load_train_objs
from support import runtime
from support.config import Config, parse_config
from support.errors import one_line_errors
from trainer import Trainer


@one_line_errors
def main(cfg: Config) -> int:
    device = runtime.pick_device(cfg.device)
    objs = load_train_objs(cfg)
    train_data = prepare_dataloader(objs.train_set, objs.schedule, cfg.num_workers, cfg.seed)
    trainer = Trainer(cfg, objs.model, train_data, objs.optimizer, objs.schedule,
                      objs.query_set, objs.gallery_set, device)
    return trainer.train()


if __name__ == "__main__":
    sys.exit(main(parse_config(description=__doc__)))
