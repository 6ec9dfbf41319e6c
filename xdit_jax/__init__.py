"""xdit_jax: parallel inference for diffusion transformers on JAX SPMD meshes."""
