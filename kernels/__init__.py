"""slothbook.kernels: Triton kernels with autograd Functions and plain-torch references.

Pure Triton + torch: nothing here imports transformers. One module per op.
"""
