"""ConsisID identity-preserving text+image-to-video, diffusers' ``ConsisIDPipeline`` on a JAX mesh.

    pipe = ConsisIDPipeline.from_pretrained("path/to/ConsisID-preview", mesh="cfg=2,ulysses=2", dtype="bfloat16")
    out = pipe(face_image, "A woman walking in a park.", id_cond=id_cond, id_vit_hidden=id_vit_hidden, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

Everything is :class:`~xdit_jax.pipelines.cogvideox.CogVideoXImageToVideoPipeline`'s (T5 prompt, the image through
the CogVideoX VAE's encoder beside the noise latents, the CogVideoX schedulers, CFG over the ``cfg`` axis,
``use_dynamic_cfg``, sequence parallelism over ``ring`` x ``ulysses``), plus the identity: the transformer's local
facial extractor turns ``id_cond`` / ``id_vit_hidden`` into identity tokens once per call, and every step's face
cross-attentions read them (the same tokens in both CFG halves: diffusers passes one face for the whole doubled
batch).

**The face inputs come from outside.** ``id_cond`` (1, 1280) and ``id_vit_hidden`` (5 arrays (1, 577, 1024)) are
made from a face photo by diffusers' ``consisid_utils`` (``prepare_face_models`` / ``process_face_embeddings_infer``:
insightface's antelopev2 detector and ArcFace, facexlib's parsing, EVA-CLIP-L-14-336), which also returns the aligned
face image to pass as ``image``. Those face models are not part of xdit_jax; run them with diffusers and hand over
the arrays (the CLI reads them from an ``.npz``: ``--id-embeds``). ``kps_cond`` (is_kps checkpoints) is not taken.

PipeFusion runs (as CogVideoX's, patches of the joint [text; video] sequence) with the transformer's
:meth:`~xdit_jax.models.consisid.ConsisIDTransformer3DModel.pipefusion_blocks`: one scan over the blocks whose carry
holds the next block's index, so each stage applies the face cross-attentions that diffusers applies after its
blocks; they are token-local, so each patch runs them on its own rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.conversion import read_json
from xdit_jax.models import consisid, vae_cogvideox
from xdit_jax.pipelines import cogvideox
from xdit_jax.pipelines.cogvideox import CogVideoXImageToVideoPipeline, CogVideoXPipelineOutput

ID_EMBEDS_HELP = ("Make them from a face photo with diffusers' ConsisID face models (insightface, facexlib, EVA-CLIP; "
                  "not part of xdit_jax): `from diffusers.pipelines.consisid.consisid_utils import "
                  "prepare_face_models, process_face_embeddings_infer`; `id_cond, id_vit_hidden, image, _ = "
                  "process_face_embeddings_infer(...)`; then `np.savez(FILE, id_cond=id_cond.float().numpy(), "
                  "id_vit_hidden=np.stack([v.float().numpy() for v in id_vit_hidden]))`.")


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 6.0) -> None:
    """CogVideoX's checks (:func:`xdit_jax.pipelines.cogvideox.check_request`)."""
    cogvideox.check_request(tc, vc, height, width, num_frames, batch, mesh_spec, guidance_scale)


default_video = cogvideox.default_video


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    folder = Path(folder)
    return (consisid.ConsisIDConfig.from_dict(read_json(folder / "transformer" / "config.json")),
            vae_cogvideox.CogVideoXVAEConfig.from_dict(read_json(folder / "vae" / "config.json")))


def load_id_embeds(path) -> tuple[np.ndarray, np.ndarray]:
    """(id_cond (1, id_dim), id_vit_hidden (scales, 1, tokens, vit_dim)) from an ``.npz`` with those two arrays."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--id-embeds {path}: no such file. {ID_EMBEDS_HELP}")
    with np.load(path) as z:
        missing = [k for k in ("id_cond", "id_vit_hidden") if k not in z.files]
        if missing:
            raise ValueError(f"--id-embeds {path} lacks {', '.join(missing)} (it has {', '.join(z.files) or 'none'}). "
                             + ID_EMBEDS_HELP)
        return np.asarray(z["id_cond"], np.float32), np.asarray(z["id_vit_hidden"], np.float32)


class ConsisIDPipeline(CogVideoXImageToVideoPipeline):
    """diffusers' ``ConsisIDPipeline`` — see the module docstring."""

    _check_request = staticmethod(check_request)
    PIPELINE_CLASSES = ("ConsisIDPipeline",)
    CONFIG = consisid.ConsisIDConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.vae_config.invert_scale_latents:
            raise ValueError("This VAE has invert_scale_latents; diffusers' ConsisIDPipeline scales the image's latents "
                             "by scaling_factor regardless, and no ConsisID checkpoint has it.")

    def _model_blocks(self, model, joint, tokens, cond):
        """PipeFusion runs the form whose scan carries the next block's index (the face cross-attentions)."""
        if self.uses_pipefusion:
            return model.pipefusion_blocks(joint, tokens, cond)
        return model.blocks(joint, tokens, cond)

    def _embed_extra(self, texts) -> dict:
        return {"face": texts[2]} if self.transformer_config.is_train_face else {}

    def _condition_shapes(self, latent_shape) -> tuple:
        tc = self.transformer_config
        face = ((1, tc.LFE_num_querie, tc.LFE_output_dim),) if tc.is_train_face else ()
        return (latent_shape,) + face

    def face_embedding(self, id_cond, id_vit_hidden) -> jax.Array:
        """The identity tokens (1, LFE_num_querie, LFE_output_dim) of one face, replicated (jitted; once per call)."""
        if "face" not in self._decode_cache:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            graphdef, state = nnx.split(self.transformer)

            @jax.jit
            def face(state, c, v):
                out = nnx.merge(graphdef, state).face_embedding(c, list(v))
                return jax.lax.with_sharding_constraint(out.astype(jnp.float32), NamedSharding(self.mesh, P()))

            self._decode_cache["face"] = lambda c, v: face(state, self._put_replicated(c), self._put_replicated(v))
        tc = self.transformer_config
        id_cond = jnp.asarray(id_cond, jnp.float32)
        vit = jnp.stack([jnp.asarray(v, jnp.float32) for v in id_vit_hidden])
        if id_cond.ndim != 2 or id_cond.shape[0] != 1:
            raise ValueError(f"id_cond {tuple(id_cond.shape)}: give one face, (1, {tc.LFE_id_dim}) (diffusers' pipeline "
                             "passes one face for the whole batch).")
        if vit.ndim != 4 or vit.shape[0] != tc.LFE_num_scale or vit.shape[1] != 1 or vit.shape[3] != tc.LFE_vit_dim:
            raise ValueError(f"id_vit_hidden {tuple(vit.shape)}: expected {tc.LFE_num_scale} arrays (1, tokens, "
                             f"{tc.LFE_vit_dim}) (a list, or stacked with the scales first).")
        return self._decode_cache["face"](id_cond, vit)

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 6.0, use_dynamic_cfg: bool = False, prompt_embeds=None,
                 negative_prompt_embeds=None, latents=None, max_sequence_length: int = 226,
                 num_videos_per_prompt: int = 1, seed: int = 0, output_type: str = "np", progress: bool = True,
                 id_vit_hidden=None, id_cond=None) -> CogVideoXPipelineOutput:
        """diffusers' call: ``image`` the (aligned) face image, the first frame; ``id_cond`` (1, LFE_id_dim) and
        ``id_vit_hidden`` (LFE_num_scale arrays (1, tokens, LFE_vit_dim), or one stacked array) the face's
        embeddings (see the module docstring: made by face models outside xdit_jax); the rest as
        :meth:`CogVideoXImageToVideoPipeline.__call__`."""
        self._check_image_call(image, num_frames, prompt_embeds, max_sequence_length)
        face = None
        if self.transformer_config.is_train_face:
            if id_cond is None or id_vit_hidden is None:
                raise ValueError("ConsisID needs the face's id_cond and id_vit_hidden. " + ID_EMBEDS_HELP)
            face = self.face_embedding(id_cond, id_vit_hidden)

        def condition(shape, rng):
            latents_ = self.image_condition(image, shape, rng)
            return latents_ if face is None else (latents_, face)

        return self._generate(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              use_dynamic_cfg=use_dynamic_cfg, prompt_embeds=prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                              max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt,
                              seed=seed, output_type=output_type, progress=progress, condition=condition)
