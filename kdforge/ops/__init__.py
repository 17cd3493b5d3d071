"""Tensor operations the dense tasks share: box and rotated-box geometry, NMS, assignment, metrics kernels.

Pure PyTorch (torchvision cannot be installed beside the CPU torch wheel), batched, tested against reference
implementations that are test-only dependencies.
"""
