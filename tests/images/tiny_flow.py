"""Tiny random SD3 and FLUX components from configs (CPU-fast stand-ins for the real checkpoints), with word-level
tokenizers so that nothing is downloaded. Used by tests/images/test_flow_pipelines.py and the recipe stand-ins."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from domains.images.tiny import word_level_tokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "cat", "dog", "on", "the", "grass"]
CLIP_TOKENS, T5_TOKENS, T5_WIDTH = 8, 6, 48
SIZE = 16  # pixels; VAE factor 2 -> 8x8 latents


def clip_config(hidden: int, projection: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_TOKENS,
                          pad_token_id=0, bos_token_id=2, eos_token_id=3, projection_dim=projection)


def t5_encoder() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 4, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3))


def vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=8, sample_size=SIZE, scaling_factor=0.8, shift_factor=0.1)


def sd3_components(seed: int = 0, t5: bool = True, dynamic_shift: bool = False) -> dict:
    """SD3's components: CLIP-L (16 wide) + CLIP-G (24 wide) padded to T5's 48, pooled 16 + 16."""
    torch.manual_seed(seed)
    sched = (FlowMatchEulerDiscreteScheduler(shift=3.0) if not dynamic_shift else
             FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64,
                                             base_shift=0.5, max_shift=1.16))
    comps = dict(
        transformer=SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                          caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                          pos_embed_max_size=8).eval(),
        scheduler=sched, vae=vae().eval(),
        text_encoder=CLIPTextModelWithProjection(clip_config(16)).eval(),
        tokenizer=word_level_tokenizer(WORDS, CLIP_TOKENS),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(24)).eval(),
        tokenizer_2=word_level_tokenizer(WORDS, CLIP_TOKENS),
        text_encoder_3=t5_encoder().eval() if t5 else None,
        tokenizer_3=word_level_tokenizer(WORDS, T5_TOKENS) if t5 else None,
    )
    return comps


def flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict:
    """FLUX's components: CLIP pooled (16 wide), T5 (48 wide), 4 latent channels packed to 16."""
    torch.manual_seed(seed)
    return dict(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                           pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                           axes_dims_rope=(2, 2, 4)).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4,
                                                  max_image_seq_len=64, base_shift=0.5, max_shift=1.15),
        vae=vae().eval(),
        text_encoder=CLIPTextModel(clip_config(16)).eval(), tokenizer=word_level_tokenizer(WORDS, CLIP_TOKENS),
        text_encoder_2=t5_encoder().eval(), tokenizer_2=word_level_tokenizer(WORDS, T5_TOKENS),
    )


#: generator class path -> (the tiny components, the constructor's overrides) for recipes/images/flow/*
STAND_INS = {"domains.images.flow.StableDiffusion3Generator": sd3_components,
             "domains.images.flow.FluxGenerator": flux_components}


def stand_in_folder(class_path: str, folder) -> str:
    """Save the tiny stand-in of ``class_path``'s family as a diffusers folder (our save_pretrained); its path."""
    import importlib

    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    cls.from_components(**STAND_INS[class_path](), height=SIZE, width=SIZE, num_steps=2,
                        max_sequence_length=T5_TOKENS, lora_rank=None).save_pretrained(folder)
    return str(folder)
