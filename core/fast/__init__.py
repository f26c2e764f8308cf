"""Speed on the GPU: static K/V buffers, a CUDA-graph decode step, one interface to fused attention
kernels, verified memories loaded straight into device buffers, and ingest that writes chunk i while
chunk i+1 computes. Everything here is an optimisation of a path core/ already has; results match it."""
