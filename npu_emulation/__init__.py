"""A CPU emulation of the torch_npu operators the NPU backend calls (placeholder, being written)."""
