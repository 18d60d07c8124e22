"""Instruct fine-tuning: supervised fine-tuning with prompt masking, LoRA, QLoRA and DPO (`llama3 finetune`)."""
