"""Fine-tune SD3 / SD3.5: the whole MMDiT, and with --train_text_encoder / --train_t5xxl the text encoders
(sd-scripts' command line).

    accelerate launch sd3_train.py --pretrained_model_name_or_path sd3.5_medium.safetensors --clip_l clip_l.safetensors \
        --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors --dataset_config data.toml --output_dir out \
        --output_name sd3_ft --optimizer_type adafactor --optimizer_args "relative_step=False" "scale_parameter=False" \
        "warmup_init=False" --learning_rate 1e-6 --fused_backward_pass --full_bf16 --mixed_precision bf16 \
        --gradient_checkpointing --cache_latents_to_disk --cache_text_encoder_outputs_to_disk
"""

from library import quiet
from library.family_sd3 import Sd3Family
from library.method_full import SD3, FullMethod
from library.train_script import run_training

if __name__ == "__main__":
    quiet.install()  # before anything imports bitsandbytes, diffusers' pipelines or transformers
    run_training(Sd3Family(), __doc__, FullMethod(SD3))
