"""Instruction data: records from files, schemas, prompt templates, masking, packing/padding."""
