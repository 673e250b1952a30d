"""DVC stage train_rafdb: Ray Train (DDP) LIP-VGG16 on RAF-DB from the imagenet_init weights."""
from stages import run_stage
from stages.common import train_stage

if __name__ == "__main__":
    run_stage(lambda: train_stage(stage="train_rafdb", dataset="rafdb"))
