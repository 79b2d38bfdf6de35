"""Train a LoRA for Stable Diffusion 1.x/2.x (sd-scripts' command line).

    accelerate launch train_network.py --pretrained_model_name_or_path MODEL --dataset_config data.toml \
        --output_dir out --output_name mylora --network_module networks.lora --network_dim 16 --network_alpha 8
"""

from library import quiet
from library.family_sd import SdFamily
from library.train_script import run_network_training

if __name__ == "__main__":
    quiet.install()  # before anything imports bitsandbytes, diffusers' pipelines or transformers
    run_network_training(SdFamily(), __doc__)
