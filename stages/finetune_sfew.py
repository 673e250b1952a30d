"""DVC stage finetune_sfew: fine-tune the RAF-DB model on SFEW 2.0 (the paper's Table 3 setting)."""
from stages import run_stage
from stages.common import train_stage

if __name__ == "__main__":
    run_stage(lambda: train_stage(stage="finetune_sfew", dataset="sfew"))
