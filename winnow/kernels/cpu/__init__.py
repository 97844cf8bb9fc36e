"""Winnow's C kernels for x86-64 CPUs (AVX2 / AVX-512), loaded through ctypes."""
