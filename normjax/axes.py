"""Mesh axis names, the one place both the training loop and the fused kernels read them from.

``data`` splits the batch, ``fsdp`` splits the batch and the parameters' embedding dimension,
``tensor`` splits heads and MLP width. Norms are row-local, so the kernels split rows over
``BATCH_AXES`` and need no collectives.
"""

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes the leading (batch) dimension is split over
