"""xdit_jax: parallel inference for diffusion transformers on JAX SPMD meshes."""

from xdit_jax.mesh import MeshSpec, build_mesh
from xdit_jax.pipelines.chroma import (
    ChromaImg2ImgPipeline,
    ChromaInpaintPipeline,
    ChromaPipeline,
    ChromaPipelineOutput,
)
from xdit_jax.pipelines.chronoedit import ChronoEditPipeline, ChronoEditPipelineOutput
from xdit_jax.pipelines.cogvideox import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXPipelineOutput
from xdit_jax.pipelines.cogview3 import CogView3PipelineOutput, CogView3PlusPipeline
from xdit_jax.pipelines.cogview4 import CogView4Pipeline, CogView4PipelineOutput
from xdit_jax.pipelines.cogview4_control import CogView4ControlPipeline
from xdit_jax.pipelines.consisid import ConsisIDPipeline
from xdit_jax.pipelines.cosmos import (
    Cosmos2TextToImagePipeline,
    Cosmos2VideoToWorldPipeline,
    CosmosPipelineOutput,
)
from xdit_jax.pipelines.flux import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxPipelineOutput,
)
from xdit_jax.pipelines.flux2 import Flux2KleinPipeline, Flux2Pipeline, Flux2PipelineOutput
from xdit_jax.pipelines.flux_fill import (
    FluxControlImg2ImgPipeline,
    FluxControlInpaintPipeline,
    FluxControlPipeline,
    FluxFillPipeline,
)
from xdit_jax.pipelines.hidream import HiDreamImagePipeline, HiDreamImagePipelineOutput
from xdit_jax.pipelines.hunyuan_video import HunyuanVideoPipeline, HunyuanVideoPipelineOutput
from xdit_jax.pipelines.hunyuan_video15 import (
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15PipelineOutput,
)
from xdit_jax.pipelines.hunyuan_video_i2v import HunyuanVideoImageToVideoPipeline
from xdit_jax.pipelines.hunyuandit import HunyuanDiTPipeline, HunyuanDiTPipelineOutput
from xdit_jax.pipelines.hunyuanimage import HunyuanImagePipeline, HunyuanImagePipelineOutput
from xdit_jax.pipelines.kandinsky5 import Kandinsky5PipelineOutput, Kandinsky5T2VPipeline
from xdit_jax.pipelines.kandinsky5_i2i import Kandinsky5I2IPipeline
from xdit_jax.pipelines.kandinsky5_i2v import Kandinsky5I2VPipeline
from xdit_jax.pipelines.kandinsky5_t2i import Kandinsky5ImagePipelineOutput, Kandinsky5T2IPipeline
from xdit_jax.pipelines.latte import LattePipeline, LattePipelineOutput
from xdit_jax.pipelines.longcat_image import (
    LongCatImageEditPipeline,
    LongCatImagePipeline,
    LongCatImagePipelineOutput,
)
from xdit_jax.pipelines.ltx import LTXImageToVideoPipeline, LTXPipeline, LTXPipelineOutput
from xdit_jax.pipelines.ltx_condition import LTXConditionPipeline, LTXVideoCondition
from xdit_jax.pipelines.lumina2 import Lumina2Pipeline, Lumina2PipelineOutput
from xdit_jax.pipelines.mochi import MochiPipeline, MochiPipelineOutput
from xdit_jax.pipelines.ovis_image import OvisImagePipeline, OvisImagePipelineOutput
from xdit_jax.pipelines.pixart import PixArtPipeline, PixArtPipelineOutput
from xdit_jax.pipelines.qwenimage import (
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImagePipeline,
    QwenImagePipelineOutput,
)
from xdit_jax.pipelines.qwenimage_edit import (
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
)
from xdit_jax.pipelines.sana import SanaPipeline, SanaPipelineOutput, SanaSprintPipeline
from xdit_jax.pipelines.sana_video import SanaImageToVideoPipeline, SanaVideoPipeline, SanaVideoPipelineOutput
from xdit_jax.pipelines.sd3 import (
    SD3PipelineOutput,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from xdit_jax.pipelines.skyreels_v2 import (
    SkyReelsV2DiffusionForcingImageToVideoPipeline,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2DiffusionForcingVideoToVideoPipeline,
    SkyReelsV2ImageToVideoPipeline,
    SkyReelsV2Pipeline,
    SkyReelsV2PipelineOutput,
)
from xdit_jax.pipelines.wan import (
    WanImageToVideoPipeline,
    WanPipeline,
    WanPipelineOutput,
    WanVideoToVideoPipeline,
)
from xdit_jax.pipelines.wan_vace import WanVACEPipeline
from xdit_jax.pipelines.zimage import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline, ZImagePipelineOutput

__all__ = ["ChromaImg2ImgPipeline", "ChromaInpaintPipeline", "ChromaPipeline", "ChromaPipelineOutput",
           "CogVideoXImageToVideoPipeline",
           "CogVideoXPipeline",
           "CogVideoXPipelineOutput", "CogView3PipelineOutput", "CogView3PlusPipeline", "CogView4Pipeline",
           "CogView4PipelineOutput", "ConsisIDPipeline",
           "CogView4ControlPipeline",
           "Flux2KleinPipeline", "Flux2Pipeline", "Flux2PipelineOutput",
           "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextInpaintPipeline",
           "FluxKontextPipeline", "FluxPipeline", "FluxPipelineOutput",
           "FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline", "FluxFillPipeline",
           "HiDreamImagePipeline", "HiDreamImagePipelineOutput", "HunyuanDiTPipeline",
           "HunyuanDiTPipelineOutput", "HunyuanImagePipeline", "HunyuanImagePipelineOutput",
           "HunyuanVideo15ImageToVideoPipeline", "HunyuanVideo15Pipeline",
           "HunyuanVideo15PipelineOutput", "HunyuanVideoPipeline", "HunyuanVideoPipelineOutput",
           "HunyuanVideoImageToVideoPipeline",
           "Kandinsky5I2IPipeline", "Kandinsky5I2VPipeline", "Kandinsky5ImagePipelineOutput",
           "Kandinsky5PipelineOutput", "Kandinsky5T2IPipeline",
           "Kandinsky5T2VPipeline", "LattePipeline",
           "LattePipelineOutput", "LTXImageToVideoPipeline", "LTXPipeline", "LTXPipelineOutput", "Lumina2Pipeline",
           "LTXConditionPipeline", "LTXVideoCondition",
           "Lumina2PipelineOutput", "MeshSpec", "MochiPipeline",
           "MochiPipelineOutput", "PixArtPipeline", "PixArtPipelineOutput", "QwenImageEditPipeline",
           "QwenImageEditInpaintPipeline", "QwenImageEditPlusPipeline", "QwenImageImg2ImgPipeline",
           "QwenImageInpaintPipeline", "QwenImagePipeline",
           "QwenImagePipelineOutput",
           "SD3PipelineOutput",
           "SanaPipeline", "SanaPipelineOutput", "SanaSprintPipeline", "SanaImageToVideoPipeline", "SanaVideoPipeline",
           "SanaVideoPipelineOutput",
           "SkyReelsV2DiffusionForcingImageToVideoPipeline",
           "SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
           "SkyReelsV2ImageToVideoPipeline", "SkyReelsV2Pipeline", "SkyReelsV2PipelineOutput",
           "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline", "StableDiffusion3Pipeline",
           "WanImageToVideoPipeline", "WanPipeline", "WanPipelineOutput", "WanVideoToVideoPipeline",
           "ZImagePipeline", "ZImagePipelineOutput", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline",
           "build_mesh", "WanVACEPipeline",
           "ChronoEditPipeline", "ChronoEditPipelineOutput"]
__all__ += ["Cosmos2TextToImagePipeline", "Cosmos2VideoToWorldPipeline", "CosmosPipelineOutput"]
__all__ += ["LongCatImageEditPipeline", "LongCatImagePipeline", "LongCatImagePipelineOutput"]
__all__ += ["OvisImagePipeline", "OvisImagePipelineOutput"]
__version__ = "0.1.0"
