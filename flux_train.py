"""Fine-tune FLUX.1 dev/schnell: the whole transformer (CLIP-L and T5-XXL stay frozen; sd-scripts' command line).

    accelerate launch flux_train.py --pretrained_model_name_or_path flux1-dev.safetensors --clip_l clip_l.safetensors \
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --dataset_config data.toml --output_dir out --output_name ft \
        --optimizer_type adafactor --optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False" \
        --learning_rate 5e-6 --fused_backward_pass --full_bf16 --gradient_checkpointing --mixed_precision bf16 \
        --cache_latents_to_disk --cache_text_encoder_outputs_to_disk
"""

from library import quiet
from library.family_flux import FluxFamily
from library.method_full import FLUX, FullMethod
from library.train_script import run_training

if __name__ == "__main__":
    quiet.install()  # before anything imports bitsandbytes, diffusers' pipelines or transformers
    run_training(FluxFamily(), __doc__, FullMethod(FLUX))
