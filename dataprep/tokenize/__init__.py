"""Tokenize logic: byte-level BPE and packing of token windows."""
