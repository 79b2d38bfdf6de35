"""The four per-family strategies: tokenizing captions, encoding tokens, caching text-encoder outputs, caching latents.

Strategies are plain objects handed to whoever needs them (dataset, trainer, tools); there are no global singletons.
This module holds the shared parts: CLIP's long-prompt chunking and weighted tokens, and the safetensors latent cache
of DESIGN.md section 4.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod

import torch

from library.captions import parse_weighted_caption


class TokenizeStrategy(ABC):
    """Captions -> token ids, one tensor per tokenizer."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> list[torch.Tensor]: ...

    @abstractmethod
    def tokenize_with_weights(self, texts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    @abstractmethod
    def settings(self) -> dict:
        """What changes the tokens (tokenizer identity, lengths); part of a text-encoder cache's identity."""


class TextEncodingStrategy(ABC):
    """Token ids -> the conditioning tensors the denoiser takes."""

    @abstractmethod
    def encode_tokens(self, models: list, tokens: list[torch.Tensor]) -> list[torch.Tensor]: ...

    @abstractmethod
    def encode_tokens_with_weights(
        self, models: list, tokens: list[torch.Tensor], weights: list[torch.Tensor]
    ) -> list[torch.Tensor]: ...


class TextEncoderOutputsCachingStrategy(ABC):
    """Families whose text encoders are frozen keep their outputs per caption (SDXL, SD3, FLUX)."""

    @abstractmethod
    def cache_path(self, image_path: str) -> str: ...


# ---------------------------------------------------------------------------------------------------------------------
# CLIP tokens: prompts longer than 75 tokens are split into chunks of 77 = <BOS> 75 tokens <EOS/PAD>.


def clip_chunk_ids(tokenizer, ids: list[int], max_length: int) -> torch.Tensor:
    """Token ids (without BOS/EOS) -> (n_chunks, 77) ids, n_chunks = max_length // 75.

    Text beyond max_length tokens is cut. Each chunk is <BOS> 75 tokens <EOS> followed by padding; a chunk that is
    full ends in <EOS> in place of its last token slot, as CLIP expects. For tokenizers that pad with a token other
    than EOS (SD2, SDXL's second encoder) an empty chunk still holds <BOS> <EOS> before its padding.
    """
    per_chunk = tokenizer.model_max_length - 2  # 75
    n_chunks = max(1, max_length // per_chunk)
    ids = ids[: per_chunk * n_chunks]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for c in range(n_chunks):
        body = ids[c * per_chunk : (c + 1) * per_chunk]
        chunk = [bos] + body + [eos]
        chunk += [pad] * (tokenizer.model_max_length - len(chunk))
        chunks.append(chunk)
    return torch.tensor(chunks, dtype=torch.long)


def clip_ids_and_weights(tokenizer, text: str, max_length: int, weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_chunks, 77) ids and per-token weights (all 1 unless weighted and the caption uses `(tag:1.2)` syntax)."""
    ids: list[int] = []
    weights: list[float] = []
    pieces = parse_weighted_caption(text) if weighted else [(text, 1.0)]
    for piece, weight in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False, truncation=False).input_ids
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    chunks = clip_chunk_ids(tokenizer, ids, max_length)
    per_chunk = tokenizer.model_max_length - 2
    w = torch.ones(chunks.shape, dtype=torch.float32)
    for c in range(chunks.shape[0]):
        part = weights[c * per_chunk : (c + 1) * per_chunk]
        w[c, 1 : 1 + len(part)] = torch.tensor(part, dtype=torch.float32)
    return chunks, w


def join_clip_chunks(hidden: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """(B * n, 77, D) encoder states -> (B, n * 75 + 2, D): the first <BOS>, each chunk's 75 tokens, the last <EOS>."""
    if n_chunks == 1:
        return hidden
    b = hidden.shape[0] // n_chunks
    hidden = hidden.reshape(b, n_chunks, hidden.shape[1], hidden.shape[2])
    parts = [hidden[:, 0, :1]] + [hidden[:, c, 1:-1] for c in range(n_chunks)] + [hidden[:, -1, -1:]]
    return torch.cat(parts, dim=1)


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's state by its weight; weights (B, n, 77) aligned with join_clip_chunks' layout."""
    n_chunks = weights.shape[1]
    if n_chunks == 1:
        return hidden * weights[:, 0, :, None].to(hidden.dtype)
    joined = torch.cat([weights[:, 0, :1]] + [weights[:, c, 1:-1] for c in range(n_chunks)] + [weights[:, -1, -1:]], dim=1)
    return hidden * joined[..., None].to(hidden.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Latent caches: one safetensors file per image and bucket, next to the image.

CACHE_FORMAT_VERSION = "1"


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short hash identifying a module's weights (which VAE or text encoder made a cache).

    Per tensor: name, shape, the sum and up to 1024 evenly spaced values, in float64. Cheap even for the 700M-parameter
    SDXL text encoder, and any real change of weights (another checkpoint, a fine-tune, a merge) changes it."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().flatten()
            step = max(1, flat.numel() // 1024)
            sample = flat[::step][:1024].to("cpu", torch.float64)
            h.update(f"{name}:{tuple(tensor.shape)}:{flat.double().sum().item():.10e}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what a tokenizer does (its class, vocabulary and special tokens), not of where it was loaded
    from: a cache made with the same tokenizer from another folder (or a built-in model's temporary one) stays valid."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    return h.hexdigest()[:16]


def file_signature(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


class LatentsCachingStrategy:
    """Where latents of an image live on disk and whether a cache file is still valid.

    A cache file `<image stem>_<bucket w>x<bucket h>_<arch>.safetensors` holds `latents` (and `latents_flipped`,
    `alpha_mask` when asked) plus metadata recording what it was made from: the image file's size and mtime, the VAE's
    fingerprint, the bucket, the resize and crop, the flip and alpha flags. Any difference -> the cache is rebuilt.
    """

    def __init__(self, arch: str, cache_to_disk: bool, batch_size: int = 1, skip_cache_check: bool = False) -> None:
        self.arch = arch
        self.cache_to_disk = cache_to_disk
        self.batch_size = batch_size
        self.skip_cache_check = skip_cache_check

    def cache_path(self, image_path: str, bucket: tuple[int, int]) -> str:
        return f"{os.path.splitext(image_path)[0]}_{bucket[0]:04d}x{bucket[1]:04d}_{self.arch}.safetensors"

    def expected_metadata(self, image_path: str, identity: dict) -> dict[str, str]:
        meta = {"format_version": CACHE_FORMAT_VERSION, "architecture": self.arch, "image": file_signature(image_path)}
        meta.update({k: json.dumps(v) for k, v in identity.items()})
        return meta

    def is_valid(self, path: str, expected: dict[str, str], keys: list[str]) -> bool:
        if not os.path.isfile(path):
            return False
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                present = set(f.keys())
        except Exception:
            return False
        if not set(keys) <= present:
            return False
        if self.skip_cache_check:
            return True
        return all(meta.get(k) == v for k, v in expected.items())
