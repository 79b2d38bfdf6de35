"""DreamBooth for Stable Diffusion 1.x/2.x: train the U-Net and the text encoder (sd-scripts' command line).

    accelerate launch train_db.py --pretrained_model_name_or_path v1-5-pruned-emaonly.safetensors --train_data_dir img \
        --reg_data_dir reg --prior_loss_weight 1.0 --output_dir out --output_name sks_dog --resolution 512 \
        --learning_rate 1e-6 --max_train_steps 1600 --stop_text_encoder_training 800 --save_model_as safetensors \
        --mixed_precision bf16 --gradient_checkpointing
"""

from library import quiet
from library.family_sd import SdFamily
from library.method_full import DREAMBOOTH, FullMethod
from library.train_script import run_training

if __name__ == "__main__":
    quiet.install()  # before anything imports bitsandbytes, diffusers' pipelines or transformers
    run_training(SdFamily(), __doc__, FullMethod(DREAMBOOTH))
