"""Fine-tune (or DreamBooth) SDXL: the whole U-Net, and with --train_text_encoder both text encoders (sd-scripts'
command line).

    accelerate launch sdxl_train.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors --dataset_config data.toml \
        --output_dir out --output_name sdxl_ft --optimizer_type adafactor --optimizer_args "relative_step=False" \
        "scale_parameter=False" "warmup_init=False" --learning_rate 4e-7 --fused_backward_pass --full_bf16 \
        --mixed_precision bf16 --gradient_checkpointing --cache_latents_to_disk
"""

from library import quiet
from library.family_sdxl import SdxlFamily
from library.method_full import SDXL, FullMethod
from library.train_script import run_training

if __name__ == "__main__":
    quiet.install()  # before anything imports bitsandbytes, diffusers' pipelines or transformers
    run_training(SdxlFamily(), __doc__, FullMethod(SDXL))
