"""Adapters (LoRA, OFT, ...) and their file formats, one module per family; see DESIGN.md section 5."""
