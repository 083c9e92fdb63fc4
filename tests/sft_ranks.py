"""SFTTrainer with DataInfCallback, run by torchrun on several processes (gloo on the CPU):
``python -m torch.distributed.run --nproc_per_node 2 tests/sft_ranks.py MODEL OUT WORK``."""

import sys
from pathlib import Path

import datasets
import torch
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer

from datainf.integrations import DataInfCallback
from datainf.models.hf import add_lora

ROWS = [{"prompt": [{"role": "user", "content": f"Say {i} twice."}],
         "completion": [{"role": "assistant", "content": f"{i} {i}"}]} for i in range(7)]


def main(model_folder: str, out: str, work: str) -> None:
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(model_folder), r=2, alpha=4)
    args = trl.SFTConfig(output_dir=work, per_device_train_batch_size=2, num_train_epochs=1,
                         learning_rate=1e-2, report_to=[], save_strategy="no",
                         logging_strategy="no", use_cpu=True, max_length=64,
                         ddp_backend="gloo", disable_tqdm=True)
    trl.SFTTrainer(model=model, train_dataset=datasets.Dataset.from_list(ROWS), args=args,
                   processing_class=AutoTokenizer.from_pretrained(model_folder),
                   callbacks=[DataInfCallback(Path(out))]).train()


if __name__ == "__main__":
    main(*sys.argv[1:4])
