"""xdit_jax: parallel inference for diffusion transformers on JAX SPMD meshes."""

from xdit_jax.mesh import MeshSpec, build_mesh
from xdit_jax.pipelines.cogvideox import CogVideoXPipeline, CogVideoXPipelineOutput
from xdit_jax.pipelines.hunyuandit import HunyuanDiTPipeline, HunyuanDiTPipelineOutput
from xdit_jax.pipelines.pixart import PixArtPipeline, PixArtPipelineOutput

__all__ = ["CogVideoXPipeline", "CogVideoXPipelineOutput", "HunyuanDiTPipeline", "HunyuanDiTPipelineOutput",
           "MeshSpec", "PixArtPipeline", "PixArtPipelineOutput", "build_mesh"]
__version__ = "0.1.0"
