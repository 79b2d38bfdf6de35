"""Train a LoRA for SDXL (sd-scripts' command line).

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config data.toml --output_dir out --output_name mylora --network_module networks.lora \
        --network_dim 32 --network_alpha 16 --network_train_unet_only --cache_latents_to_disk \
        --cache_text_encoder_outputs_to_disk --mixed_precision bf16 --gradient_checkpointing
"""

from library import quiet
from library.family_sdxl import SdxlFamily
from library.train_script import run_network_training

if __name__ == "__main__":
    quiet.install()  # before anything imports bitsandbytes, diffusers' pipelines or transformers
    run_network_training(SdxlFamily(), __doc__)
