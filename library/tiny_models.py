"""Built-in tiny models: real architectures (diffusers / transformers classes) with a few thousand parameters.

They serve the README's quick demo and dry runs of a real config on CPU (`--pretrained_model_name_or_path
kiln-tiny-sd`, `kiln-tiny-sd2`, `kiln-tiny-sdxl`, `kiln-tiny-flux`, `kiln-tiny-sd3`, `kiln-tiny-sd3.5-medium`,
`kiln-tiny-sd3.5-large`), and the test suite, which saves them in every on-disk format kiln reads. Weights are random but
deterministic (seeded), the tokenizer is a byte-level CLIP BPE vocabulary without merges: real CLIPTokenizer code,
one token per character.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

TINY_SD = "kiln-tiny-sd"
TINY_SD2 = "kiln-tiny-sd2"
TINY_SDXL = "kiln-tiny-sdxl"
TINY_FLUX = "kiln-tiny-flux"
TINY_SD3 = "kiln-tiny-sd3"  # SD3 Medium's layout
TINY_SD35_MEDIUM = "kiln-tiny-sd3.5-medium"
TINY_SD35_LARGE = "kiln-tiny-sd3.5-large"
TINY_SD3_VARIANT = {TINY_SD3: "sd3-medium", TINY_SD35_MEDIUM: "sd3.5-medium", TINY_SD35_LARGE: "sd3.5-large"}
BUILTIN_MODELS = (TINY_SD, TINY_SD2, TINY_SDXL, TINY_FLUX, TINY_SD3, TINY_SD35_MEDIUM, TINY_SD35_LARGE)
BUILTIN_FAMILY = {  # checkpoint_files family names
    TINY_SD: "sd1",
    TINY_SD2: "sd2",
    TINY_SDXL: "sdxl",
    TINY_FLUX: "flux",
    **dict.fromkeys(TINY_SD3_VARIANT, "sd3"),
}


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's reversible byte -> printable character table, in byte-value order of the printable ones first."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>") -> None:
    """Write vocab.json / merges.txt / configs of a character-level CLIP tokenizer (514 tokens) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)


TINY_VOCAB = 514  # 2 x 256 byte tokens + <|startoftext|> + <|endoftext|>


def tiny_clip_config(v2: bool = False, hidden_size: int = 64):
    """CLIP text config with the real models' 64-wide attention heads (hidden 64: one head), so that kiln's config
    inference for single files (heads = hidden // 64, as CLIP-L and OpenCLIP-H) rebuilds the same model."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=max(1, hidden_size // 64),
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=TINY_VOCAB - 2,
        eos_token_id=TINY_VOCAB - 1,
        pad_token_id=0 if v2 else TINY_VOCAB - 1,
        hidden_act="gelu" if v2 else "quick_gelu",
    )


def tiny_unet_config(v2: bool = False) -> dict:
    """A two-level U-Net with SD1 (8 heads, conv proj) or SD2 (64-wide heads, linear proj) conventions."""
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [64, 128] if v2 else [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 64,  # = the tiny CLIP's hidden size
        "attention_head_dim": [1, 2] if v2 else 8,
        "use_linear_projection": v2,
        "norm_num_groups": 32,
    }


def tiny_vae_config() -> dict:
    """Four levels (8x downscale like the real VAE) with few channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def build_tiny_sd(v2: bool = False, seed: int = 0) -> dict:
    """Tiny SD components: {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from library.sd_models import sd_scheduler_config

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(v2))
    vae = AutoencoderKL(**tiny_vae_config())
    text_encoder = CLIPTextModel(tiny_clip_config(v2))
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(tmp, pad_token="!" if v2 else "<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler = DDPMScheduler(**sd_scheduler_config())
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


# SDXL: two text encoders whose hidden states are concatenated (64 + 128 = the U-Net's cross_attention_dim, as
# 768 + 1280 = 2048 in the real model); the second one's projected pooled output (width 128, = its hidden size as in
# OpenCLIP bigG) joins 6 size/crop numbers of addition_time_embed_dim each in the U-Net's added embedding.
TINY_SDXL_TE1_WIDTH = 64
TINY_SDXL_TE2_WIDTH = 128
TINY_SDXL_TIME_EMBED_DIM = 8


def tiny_sdxl_unet_config() -> dict:
    """A three-level U-Net with SDXL's conventions: no attention in the first level, deeper transformers further down,
    64-wide heads, linear projections, the "text_time" added embedding. With two layers per level its block numbering
    is the real model's (input_blocks.4.1 is the first transformer, output_blocks.0.1 the first one going up)."""
    channels = [32, 64, 128]
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": channels,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [max(1, c // 64) for c in channels],
        "use_linear_projection": True,
        "cross_attention_dim": TINY_SDXL_TE1_WIDTH + TINY_SDXL_TE2_WIDTH,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TINY_SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_TE2_WIDTH,
        "norm_num_groups": 32,
    }


def build_tiny_sdxl(seed: int = 0) -> dict:
    """Tiny SDXL components: {"unet", "vae", "text_encoder" (CLIPTextModel, CLIP-L style), "text_encoder_2"
    (CLIPTextModelWithProjection, bigG style: gelu, pads with id 0), "tokenizer", "tokenizer_2" (pads with "!" = id 0),
    "scheduler"}."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from library.sdxl_models import sdxl_scheduler_config

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    vae = AutoencoderKL(**{**tiny_vae_config(), "scaling_factor": 0.13025, "force_upcast": True})
    text_encoder = CLIPTextModel(tiny_clip_config(v2=False, hidden_size=TINY_SDXL_TE1_WIDTH))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(v2=True, hidden_size=TINY_SDXL_TE2_WIDTH))
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(os.path.join(tmp, "1"))
        write_tiny_clip_tokenizer(os.path.join(tmp, "2"), pad_token="!")
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tmp, "1"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "2"))
    scheduler = EulerDiscreteScheduler(**sdxl_scheduler_config())
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.1: a double/single-stream transformer conditioned on T5 hidden states (width = the T5's d_model) and CLIP-L's
# pooled output (width = the CLIP's hidden size), a 16-channel VAE without quant convs, flow matching.
# ---------------------------------------------------------------------------------------------------------------------

TINY_FLUX_CLIP_WIDTH = 64
TINY_T5_WIDTH = 64
TINY_T5_VOCAB = 384  # >= the tiny T5 tokenizer's pieces + T5's 100 <extra_id_N> tokens; tells kiln's loader "tiny"
TINY_FLUX_HEAD_DIM = 16

_T5_CORPUS_WORDS = (
    "a an the of in on under over with and or photo picture painting drawing sketch portrait landscape close up "
    "cat dog bird horse fish tree flower grass house car road city forest river lake mountain beach sky cloud sun "
    "moon star night day morning evening red orange yellow green blue purple black white gray brown small large tall "
    "old new young man woman girl boy child person people sitting standing running walking looking at viewer smiling "
    "holding wearing hat dress shirt long short hair eyes face hands light dark bright soft sharp detailed high quality "
    "best masterpiece style anime realistic cinematic lighting background foreground indoors outdoors 1girl 1boy solo"
).split()


def _tiny_t5_corpus() -> list[str]:
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(_T5_CORPUS_WORDS) for _ in range(9)) for _ in range(400)]
    lines.append(" ".join(chr(c) for c in range(33, 127)))  # every printable ASCII character gets a piece
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 2024")
    return lines


def tiny_t5_spiece_model() -> bytes:
    """A small sentencepiece unigram model (pad 0, eos 1, unk 2, no bos: T5's ids) trained on a fixed corpus, in well
    under a second; the same bytes every call."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_t5_corpus()),
        model_writer=buffer,
        vocab_size=256,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def write_tiny_t5_tokenizer(folder: str) -> None:
    """Write kiln's tiny T5 tokenizer (tokenizer.json + configs, loadable without sentencepiece) into `folder`."""
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "spiece.model"), "wb") as f:
            f.write(tiny_t5_spiece_model())
        tokenizer = T5Tokenizer.from_pretrained(tmp)
    tokenizer.save_pretrained(folder)


def tiny_t5_tokenizer():
    """kiln's tiny T5 tokenizer (a transformers T5Tokenizer)."""
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_t5_tokenizer(tmp)
        return T5Tokenizer.from_pretrained(tmp)


def tiny_t5_config(d_model: int = TINY_T5_WIDTH):
    """A two-layer T5 v1.1-style encoder (gated-gelu, no dropout: train-mode outputs stay deterministic)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=TINY_T5_VOCAB,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )


def tiny_flux_transformer_config(schnell: bool = False) -> dict:
    """FluxTransformer2DModel config: 2 double + 2 single blocks, two 16-wide heads (rope axes 4+6+6 = 16)."""
    return {
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels x 2 x 2 packed patches, as the real model
        "out_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": TINY_FLUX_HEAD_DIM,
        "num_attention_heads": 2,
        "joint_attention_dim": TINY_T5_WIDTH,
        "pooled_projection_dim": TINY_FLUX_CLIP_WIDTH,
        "guidance_embeds": not schnell,
        "axes_dims_rope": [4, 6, 6],
    }


def tiny_flux_vae_config() -> dict:
    """FLUX-style VAE: 16 latent channels, no quant convs, FLUX's scaling and shift factors."""
    return {
        **tiny_vae_config(),
        "latent_channels": 16,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
    }


def flux_scheduler_config() -> dict:
    return {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def build_tiny_flux(seed: int = 0, schnell: bool = False) -> dict:
    """Tiny FLUX.1 components: {"transformer", "vae", "text_encoder" (CLIP-L style), "text_encoder_2" (T5 encoder),
    "tokenizer", "tokenizer_2" (T5, sentencepiece-trained), "scheduler"}; schnell: no guidance embedding."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_flux_transformer_config(schnell))
    vae = AutoencoderKL(**tiny_flux_vae_config())
    text_encoder = CLIPTextModel(tiny_clip_config(v2=False, hidden_size=TINY_FLUX_CLIP_WIDTH))
    text_encoder_2 = T5EncoderModel(tiny_t5_config())
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**flux_scheduler_config()),
    }


# ---------------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5: an MMDiT conditioned on CLIP-L + CLIP-G hidden states (zero-padded to the T5 width, then joined with T5's
# along the sequence) and their pooled outputs (CLIP-L + CLIP-G widths), a 16-channel VAE with SD3's factors, flow
# matching. The two CLIPs have different widths: diffusers tells the towers of a single file apart by width.
# ---------------------------------------------------------------------------------------------------------------------


def tiny_sd3_vae_config() -> dict:
    """SD3-style VAE: 16 latent channels, no quant convs, SD3's scaling (1.5305) and shift (0.0609) factors."""
    return {
        **tiny_vae_config(),
        "latent_channels": 16,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "force_upcast": True,
    }


def tiny_sd3_clip_config(which: str):
    """CLIPTextConfig of the tiny SD3 "clip_l" (CLIP ViT-L style: quick_gelu, pads with <|endoftext|>) or "clip_g"
    (OpenCLIP bigG style: gelu, pads with id 0), each with its own width."""
    from library.sd3_models import TINY_SD3_CLIP_G_WIDTH, TINY_SD3_CLIP_L_WIDTH

    if which not in ("clip_l", "clip_g"):
        raise ValueError(f"which must be 'clip_l' or 'clip_g', not {which!r}")
    clip_g = which == "clip_g"
    return tiny_clip_config(v2=clip_g, hidden_size=TINY_SD3_CLIP_G_WIDTH if clip_g else TINY_SD3_CLIP_L_WIDTH)


def tiny_sd3_t5_config():
    """The tiny T5 encoder at SD3's tiny joint width (>= the two CLIP widths together)."""
    from library.sd3_models import TINY_SD3_T5_WIDTH

    return tiny_t5_config(d_model=TINY_SD3_T5_WIDTH)


def build_tiny_sd3(variant: str = "sd3-medium", seed: int = 0) -> dict:
    """Tiny SD3 / SD3.5 components in StableDiffusion3Pipeline's names: {"transformer" (the layout of `variant`, one
    of sd3_models.SD3_VARIANTS), "vae", "text_encoder" (CLIP-L), "text_encoder_2" (CLIP-G), "text_encoder_3" (T5
    encoder), "tokenizer", "tokenizer_2" (pads with "!" = id 0), "tokenizer_3" (T5), "scheduler"}; seeded weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    from library.sd3_models import sd3_scheduler_config, tiny_sd3_transformer_config

    config = tiny_sd3_transformer_config(variant)  # ValueError for an unknown variant, before any work
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config)
    vae = AutoencoderKL(**tiny_sd3_vae_config())
    text_encoder = CLIPTextModelWithProjection(tiny_sd3_clip_config("clip_l"))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_sd3_clip_config("clip_g"))
    text_encoder_3 = T5EncoderModel(tiny_sd3_t5_config())
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(os.path.join(tmp, "1"))
        write_tiny_clip_tokenizer(os.path.join(tmp, "2"), pad_token="!")
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tmp, "1"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "2"))
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "text_encoder_3": text_encoder_3.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tiny_t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**sd3_scheduler_config()),
    }
