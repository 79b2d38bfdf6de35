"""Fine-tune Stable Diffusion 1.x/2.x: the whole U-Net, and with --train_text_encoder the text encoder (sd-scripts'
command line; images from --in_json metadata or a dataset config with metadata_file subsets, or image folders).

    accelerate launch fine_tune.py --pretrained_model_name_or_path v1-5-pruned-emaonly.safetensors --in_json meta.json \
        --train_data_dir img --output_dir out --output_name ft --resolution 512 --learning_rate 2e-6 \
        --max_train_steps 10000 --mixed_precision bf16 --gradient_checkpointing --save_every_n_steps 1000
"""

from library import quiet
from library.family_sd import SdFamily
from library.method_full import FINE_TUNE, FullMethod
from library.train_script import run_training

if __name__ == "__main__":
    quiet.install()  # before anything imports bitsandbytes, diffusers' pipelines or transformers
    run_training(SdFamily(), __doc__, FullMethod(FINE_TUNE))
