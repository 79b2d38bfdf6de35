"""Entry point shared by the LoRA training scripts: parse, train, turn known failures into clear exit messages."""

from __future__ import annotations

import logging
import sys

from library.family import ModelFamily


def run_network_training(family: ModelFamily, description: str, argv: list[str] | None = None) -> None:
    from library.saving import SaveError
    from library.tool_family import tool_errors
    from library.train_args import parse_args_with_config, setup_network_parser
    from library.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = setup_network_parser(description)
    family.add_arguments(parser)
    args = parse_args_with_config(parser, argv)
    try:
        train(args, family)
    except (*tool_errors(), SaveError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
