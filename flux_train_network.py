"""Train a LoRA for FLUX.1 dev/schnell (sd-scripts' command line).

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors --clip_l clip_l.safetensors \
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --dataset_config data.toml --output_dir out --output_name mylora \
        --network_module networks.lora_flux --network_dim 16 --network_alpha 16 --network_train_unet_only \
        --cache_latents_to_disk --cache_text_encoder_outputs_to_disk --gradient_checkpointing \
        --timestep_sampling flux_shift --model_prediction_type raw --guidance_scale 1.0 --mixed_precision bf16
"""

from library import quiet
from library.family_flux import FluxFamily
from library.train_script import run_network_training

if __name__ == "__main__":
    quiet.install()  # before anything imports bitsandbytes, diffusers' pipelines or transformers
    run_network_training(FluxFamily(), __doc__)
