"""Megatron-core side of opd: CPU shims, parallel state, the GPTModel built from an HF
Qwen3/Qwen2 config, exact HF <-> torch_dist conversion, and the checkpoint layout.

Submodules import megatron lazily, so importing this package is cheap.
"""
