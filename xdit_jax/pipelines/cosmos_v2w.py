"""The command line's view of Cosmos-Predict2 Video2World (a video family; the pipeline:
:class:`xdit_jax.pipelines.cosmos.Cosmos2VideoToWorldPipeline`): its configs, default video and request checks."""

from xdit_jax.pipelines.cosmos import check_video_request as check_request
from xdit_jax.pipelines.cosmos import default_world as default_video
from xdit_jax.pipelines.cosmos import read_configs

__all__ = ["check_request", "default_video", "read_configs"]
