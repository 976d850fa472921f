"""Quantizers: bitsandbytes 4-bit NF4/FP4 and 8-bit (bnb)."""
