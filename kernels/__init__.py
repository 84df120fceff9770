"""turbo_kernels: Triton kernels and their pure-torch references.

Imports only torch (and triton lazily, where a kernel is launched). The folder is `kernels/`
but the import name is `turbo_kernels` (a top-level `kernels` module collides with the PyPI
package `kernels` that transformers/diffusers probe).
"""
