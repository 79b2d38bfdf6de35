"""Train a LoRA for SD3 Medium, SD3.5 Medium or SD3.5 Large (sd-scripts' command line).

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_large.safetensors --clip_l clip_l.safetensors \
        --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors --dataset_config data.toml --output_dir out \
        --output_name mylora --network_module networks.lora_sd3 --network_dim 16 --network_alpha 16 --network_train_unet_only \
        --cache_latents_to_disk --cache_text_encoder_outputs_to_disk --fp8_base --blocks_to_swap 20 --gradient_checkpointing \
        --weighting_scheme logit_normal --mixed_precision bf16
"""

from library import quiet
from library.family_sd3 import Sd3Family
from library.train_script import run_network_training

if __name__ == "__main__":
    quiet.install()  # before anything imports bitsandbytes, diffusers' pipelines or transformers
    run_network_training(Sd3Family(), __doc__)
