"""Instruction data for the finetune stage: reading the common JSONL layouts, the chat template, tokenization
with a completion-only loss mask, and packing of short examples."""
