"""Writing files that must never be lost or half-written: adapter weights with metadata, checkpoints, training states.

Every file is written to a temporary name in the same folder and renamed into place, so a crash or a full disk
leaves the previous file as it was (`atomic_write`, the one place that creates and publishes files). Files get the
mode of any file the user creates (0666 & ~umask), not tempfile.mkstemp's 0600. With `overwrite=False` the rename never
replaces a file: a file created at that name while it was being written stays as it was, and the write fails.
Checkpoint and state names follow sd-scripts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import secrets
import shutil

import torch
from safetensors.torch import save as safetensors_bytes

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SaveError(RuntimeError):
    """A file could not be written; the previous file of that name is intact."""


def new_temp_file(path: str) -> str:
    """Create an empty temporary file next to `path` (same folder, so the rename is atomic) and return its name.

    Created exclusively with mode 0666 & ~umask, like any file the user creates: tempfile.mkstemp would give 0600, and
    the published file keeps its temporary file's mode."""
    for _ in range(100):
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def publish_file(tmp: str, path: str, overwrite: bool = True) -> None:
    """Move the complete file `tmp` to `path`. overwrite=False never replaces a file: `path` is hard-linked to `tmp`
    (which fails if `path` exists, however recently it appeared), then `tmp` is removed. On a file system without hard
    links it falls back to a check just before the rename."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise SaveError(
            f"{path} appeared while it was being written; it was left as it is and nothing was written "
            "(kiln does not overwrite files)"
        ) from None
    except OSError:  # no hard links here (FAT, some network file systems)
        if os.path.lexists(path):
            raise SaveError(f"{path} appeared while it was being written; it was left as it is and nothing was written") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def atomic_write(path: str, write, overwrite: bool = True) -> None:
    """Write a file atomically: `write(tmp)` fills a new temporary file (see new_temp_file), which is synced to disk and
    then published as `path` (publish_file). The temporary file never outlives the call. An OSError becomes SaveError;
    any other error (from `write`) is raised as it is."""
    tmp = None
    try:
        tmp = new_temp_file(path)
        mode = os.stat(tmp).st_mode & 0o777  # 0666 & ~umask
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that made its own file (safetensors' save_file: 0600)
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        publish_file(tmp, path, overwrite)
    except OSError as e:
        raise SaveError(f"cannot write {path}: {e}; the previous file (if any) is unchanged") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def new_temp_folder(path: str) -> str:
    """Create an empty temporary folder next to `path` (mode 0777 & ~umask, unlike tempfile.mkdtemp's 0700)."""
    for _ in range(100):
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"cannot create a temporary folder next to {path}")


def publish_folder(tmp: str, path: str) -> None:
    """Move the complete folder `tmp` to `path`, which must not exist: a rename fails on an existing file or non-empty
    folder (POSIX only lets it replace an empty folder, which holds nothing to lose). `tmp` is removed on failure.
    Its files get the usual mode first (writers such as safetensors' save_file, used by save_pretrained, make 0600
    files): that of the folder made by new_temp_folder, without execute bits."""
    mode = os.stat(tmp).st_mode & 0o666  # new_temp_folder: 0777 & ~umask
    for root, _dirs, files in os.walk(tmp):
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file) and os.stat(file).st_mode & 0o777 != mode:
                os.chmod(file, mode)
    try:
        os.rename(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"cannot write {path}: it appeared while it was being written ({e}); it was left as it is") from e


def atomic_write_bytes(path: str, data: bytes, overwrite: bool = True) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, overwrite)


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-webui-additional-networks' hashes of a safetensors file holding `tensors` and only the `ss_*` metadata:
    (sha256 of everything after the header, first 8 hex digits of sha256 of bytes 0x100000..0x110000)."""
    data = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_weights(
    path: str,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    dtype: torch.dtype | None,
    overwrite: bool = True,
) -> None:
    """Save adapter weights (safetensors with metadata and sshs_* hashes, or a torch state dict for .ckpt/.pt).
    overwrite=False: an existing `path` is an error (SaveError), even one that appears while this writes."""
    tensors = {
        k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state_dict.items()
    }
    if path.endswith(".safetensors"):
        metadata = dict(metadata or {})
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
        atomic_write_bytes(path, safetensors_bytes(tensors, metadata), overwrite)
    else:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        atomic_write_bytes(path, buf.getvalue(), overwrite)


def load_weights_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file, or a .ckpt/.pt state dict through weights-only loading (never a full unpickle)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        from library.checkpoint_files import ModelLoadError, safetensors_problem, unreadable_model

        problem = safetensors_problem(path)
        if problem:
            raise ModelLoadError(problem)
        try:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:
            raise unreadable_model(path, e) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} cannot be read without unpickling arbitrary objects ({e}); kiln does not unpickle files. "
            "Convert it to .safetensors with a tool you trust."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


# ---------------------------------------------------------------------------------------------------------------------
# Names and pruning (sd-scripts: name.ext, name-000001.ext, name-step00000500.ext, and "-state" folders)


def checkpoint_name(output_name: str, epoch: int | None = None, step: int | None = None) -> str:
    if step is not None:
        return f"{output_name}-step{step:08d}"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}"
    return output_name


def prune_checkpoints(
    output_dir: str, output_name: str, suffix_pattern: str, kind: str, keep_from: int, state: bool = False
) -> list[str]:
    """Remove this run's epoch (kind="epoch") or step checkpoints numbered below keep_from (files and folders whose
    name is the checkpoint's followed by a match of `suffix_pattern`, a regular expression), or their states;
    returns removed paths."""
    pattern = (
        re.escape(output_name)
        + (r"-step(\d{8})" if kind == "step" else r"-(\d{6})")
        + ("-state" if state else f"(?:{suffix_pattern})")
        + "$"
    )
    removed = []
    for entry in os.listdir(output_dir):
        m = re.match(pattern, entry)
        if m and int(m.group(1)) < keep_from:
            path = os.path.join(output_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# Training state: everything --resume needs, in one folder.


def save_state(
    folder: str, network_state: dict[str, torch.Tensor], optimizer_state, scheduler_state: dict, train_state: dict, rng: dict
) -> None:
    """Write a state folder atomically: a complete new folder replaces the old one, or the old one stays.
    `optimizer_state`: the optimizer's state_dict (a list of them under --deepspeed); `rng`: the random generators'
    states (library.run_control.rng_states)."""
    tmp = folder + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        os.makedirs(tmp)
        save_weights(os.path.join(tmp, "network.safetensors"), network_state, None, None)
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler_state, os.path.join(tmp, "lr_scheduler.pt"))
        torch.save(rng, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(train_state, f, indent=1)
    except BaseException as e:  # an interrupt too: no unfinished folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise SaveError(f"cannot write state {folder}: {e}; the previous state (if any) is unchanged") from e
        raise
    old = folder + ".old"
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def remove_unfinished(output_dir: str, output_name: str) -> list[str]:
    """Clean up after a run of `output_name` that was killed while saving: temporary files and folders (`*.tmp`) are
    removed, and a state folder or a diffusers checkpoint folder killed between its two renames gets its complete
    previous version (`-state.old`, `<name>.diffusers.<pid>.<hex>.old`) back. Whole-model checkpoints count too:
    their EMA copies (`-ema`) and SD3's text-encoder side files (`_clip_l` ...). Returns what was removed or
    restored."""
    if not os.path.isdir(output_dir):
        return []
    ours = re.compile(
        re.escape(output_name)
        + r"(-step\d{8}|-\d{6})?(-ema)?(_clip_l|_clip_g|_t5xxl)?"
        + r"(-state|_losses\.json|\.[A-Za-z]+)(\.\d+\.[0-9a-f]+)?\.(tmp|old)$"
    )
    touched = []
    for entry in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, entry)
        if not ours.match(entry):
            continue
        if entry.endswith(".tmp"):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        elif entry.endswith("-state.old"):
            final = path[: -len(".old")]
            shutil.rmtree(path) if os.path.exists(final) else os.rename(path, final)
        elif ".diffusers." in entry:  # a checkpoint folder moved aside while its new version was put in place
            final = path[: path.index(".diffusers.", len(output_dir))]
            shutil.rmtree(path) if os.path.exists(final) else os.rename(path, final)
        else:
            continue
        touched.append(path)
    return touched


class StateError(ValueError):
    """A --resume state folder holds a file that cannot be read; the message names it and says what to do."""


TRAIN_STATE_KEYS = ("current_epoch", "current_step", "batches_done", "seed")


def _read_train_state(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in TRAIN_STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return state


def load_state(folder: str, deepspeed: bool = False) -> dict:
    """Read a state folder (weights-only loading). Returns network weights, optimizer, scheduler, rng, train_state.
    A missing file raises FileNotFoundError, a truncated or corrupt one StateError naming it. `deepspeed`: the run
    reading it uses --deepspeed."""
    needed = ["network.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng.pt", "train_state.json"]
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"--resume {folder} is not a kiln state folder (missing {', '.join(missing)})")

    def read(name: str, reader):
        from library.checkpoint_files import safetensors_fault

        path = os.path.join(folder, name)
        fault = safetensors_fault(path) if name.endswith(".safetensors") else None
        if fault is None:
            try:
                return reader(path)
            except StateError:
                raise
            except Exception as e:
                fault = f"truncated or corrupt ({(str(e).strip().splitlines() or [type(e).__name__])[0]})"
        raise StateError(
            f"--resume {folder}: {path} is {fault}; this state cannot be used: resume from another state folder, "
            "or start again without --resume"
        )

    pickled = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731

    def optimizer_state(path: str):
        """Weights-only; a --deepspeed run's state holds three plain-data DeepSpeed classes, allowed by name."""
        if not deepspeed:
            try:
                return pickled(path)
            except pickle.UnpicklingError as e:
                if "deepspeed" not in str(e):
                    raise
                raise StateError(f"--resume {folder}: this state was written by a --deepspeed run; add --deepspeed") from None
        from library.deepspeed_run import state_classes

        with torch.serialization.safe_globals(state_classes()):
            return pickled(path)

    return {
        "network": read("network.safetensors", lambda path: load_weights_file(path)[0]),
        "optimizer": read("optimizer.pt", optimizer_state),
        "lr_scheduler": read("lr_scheduler.pt", pickled),
        "rng": read("rng.pt", pickled),
        "train_state": read("train_state.json", _read_train_state),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Streaming safetensors writer: a file far larger than RAM, one tensor in memory at a time.

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def stream_safetensors(
    path: str,
    layout: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """Write a safetensors file whose tensors are made one at a time by `produce(name)`, in `layout` order
    (name, shape, dtype): the header is written first from the layout, then each tensor's bytes. Atomic like every
    other write here (atomic_write; overwrite=False never replaces a file)."""
    import json as _json

    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in layout:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = _json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, shape, dtype in layout:
                tensor = produce(name)
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, the header says {tuple(shape)} {dtype}")
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")

    atomic_write(path, write, overwrite)


def save_tensors(
    path: str,
    layout: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
    pickle_key: str | None = "state_dict",
) -> None:
    """A model file of the tensors `produce(name)` makes, in `layout` order: `.safetensors` streamed (stream_safetensors,
    one tensor in memory at a time); any other name a torch pickle that loads with weights_only=True, of
    {pickle_key: tensors} (single-file checkpoints) or of the tensors themselves (pickle_key=None: a diffusers/transformers
    .bin), built in memory. Atomic; overwrite=False never replaces a file."""
    if path.lower().endswith(".safetensors"):
        stream_safetensors(path, layout, produce, metadata, overwrite)
        return
    tensors = {}
    for name, shape, dtype in layout:
        tensor = produce(name)
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, the layout says {tuple(shape)} {dtype}")
        tensors[name] = tensor.contiguous()
    atomic_write(path, lambda tmp: torch.save({pickle_key: tensors} if pickle_key else tensors, tmp), overwrite)
