import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(2)


TINY_TEST_DEFAULTS = {"num_steps": 4, "guidance_scale": 2.0, "lora_rank": 4, "gradient_checkpointing": False}


def tiny_generator(**kwargs):
    """A random 16x16 text-to-image generator with 2 UNet levels: fast enough for unit tests."""
    from domains.images.tiny import build_tiny_generator

    return build_tiny_generator(seed=0, size=16, channels=(8, 16), **{**TINY_TEST_DEFAULTS, **kwargs})


def tiny_flow_generator(**kwargs):
    """``tiny_generator``'s random UNet and text encoder as a rectified flow (FlowUNetGenerator)."""
    from domains.images.tiny import build_tiny_flow_generator

    return build_tiny_flow_generator(seed=0, size=16, channels=(8, 16), **{**TINY_TEST_DEFAULTS, **kwargs})


def aesthetic_stand_in_args(tmp_path):
    """CLI overrides that point an AestheticReward at a tiny random CLIP vision tower and head."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from domains.images.rewards import AestheticHead

    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(tmp_path / "vision")
    torch.save(AestheticHead(16).state_dict(), tmp_path / "head.pth")
    return ["--model.init_args.reward.init_args.clip_model", str(tmp_path / "vision"),
            "--model.init_args.reward.init_args.head", str(tmp_path / "head.pth")]


@pytest.fixture
def make_tiny_generator():
    return tiny_generator


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny model saved with save_pretrained, loaded back by path in tests."""
    d = tmp_path_factory.mktemp("tiny_t2i")
    tiny_generator(lora_rank=None).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + tokenizer saved to a folder (stand-in for real reward weights)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from domains.images.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=8, pad_token_id=0, bos_token_id=2,
                                   eos_token_id=3).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8).to_dict(),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random LLaVA (CLIP vision tower + Llama text model) and its processor, saved to a
    folder: the in-process judge loads it with AutoModelForImageTextToText / AutoProcessor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<unk>", "<pad>", "<s>", "</s>", "<image>", *map(str, range(10)),
             *"score : a the of image prompt you are judging generated for blue red circle square . , \"".split()]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8).to_dict(),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512).to_dict(),
        image_token_index=vocab["<image>"], vision_feature_layer=-1)
    d = tmp_path_factory.mktemp("tiny_vlm")
    LlavaForConditionalGeneration(cfg).save_pretrained(d)
    proc.save_pretrained(d)
    return d
