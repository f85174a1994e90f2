"""Writing files so that a crash leaves either the old file or the complete new one, and model folders.

A model folder is a Hugging Face model folder:

    config.json                     Llama-style fields plus `qk_norm` and `residual`, `model_type`
                                    "delta_attnres" and an `auto_map` naming the code files below
    model.safetensors               the weights, named as in `DecoderLM` (`model.layers.0...`, `lm_head`)
    generation_config.json          token ids and generation defaults
    tokenizer files                 when a tokenizer is given
    configuration_delta_attnres.py, modeling_delta_attnres.py and the package modules they import,
                                    so that transformers can load the folder with trust_remote_code=True

Loading reads only JSON and safetensors, so it never unpickles data. Folders written before this layout
(config.json with ModelConfig field names) still load.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .hf_format import (
    AUTO_MAP,
    CONFIGURATION_MODULE,
    MODEL_TYPE,
    MODELING_MODULE,
    hf_config_dict,
    is_legacy_layout,
    legacy_model_config,
    model_config_from_hf_dict,
)
from .model import DecoderLM

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Files that a tokenizer's save_pretrained writes (transformers 5.x): the fast tokenizer, its config, the
# vocabulary files of the Llama, Qwen2, GPT-2 and BERT tokenizer classes, and the chat template files.
TOKENIZER_FILE_NAMES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
# The folder in which a tokenizer's save_pretrained writes its extra chat templates as .jinja files.
CHAT_TEMPLATES_DIR = "additional_chat_templates"


class StorageError(RuntimeError):
    """A file or folder that cannot be read or written as requested; the message names it."""


def check_output_path(path: str | Path, flag: str = "--out") -> Path:
    """Return `path` as a Path, or raise StorageError when no output folder can be written there.

    Rejects an empty path, an existing file and a path below a file. Also rejects a symbolic link that
    does not lead to an existing folder (dangling or looping), a path that the OS rejects (a name that is
    too long), and a path whose nearest existing folder is not writable. Writability is checked with
    os.access and then by creating and removing an empty temporary folder there, because os.access
    passes any folder for root, including read-only file systems such as /proc. `flag` names the option in the messages.
    """
    if not str(path):
        raise StorageError(f"{flag} is empty; pass the path of the folder to write")
    target = Path(path)
    try:
        _check_output_target(target, flag)
    except OSError as error:
        raise StorageError(f"{flag} {target} cannot be used: {error}; choose another {flag}") from error
    return target


def _check_output_target(target: Path, flag: str) -> None:
    """Run the checks of `check_output_path`; an OSError from the file system passes to the caller."""
    _check_link(target, target, flag)
    if _lexists(target) and not target.is_dir():
        raise StorageError(f"{flag} {target} exists and is not a folder; choose another {flag}")

    # Path.parent is lexical, so "file/.." walks up to "file" and is rejected as lying below a file.
    nearest = target.absolute()
    while not _lexists(nearest):
        nearest = nearest.parent
    _check_link(target, nearest, flag)
    if not nearest.is_dir():
        raise StorageError(f"{flag} {target} lies below the file {nearest}; choose a {flag} outside any file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise StorageError(
            f"{flag} {target} cannot be written: the folder {nearest} is not writable; "
            f"choose a writable {flag}"
        )
    try:
        probe = tempfile.mkdtemp(prefix=".write-check.", dir=nearest)
    except OSError as error:
        raise StorageError(
            f"{flag} {target} cannot be written: creating a folder in {nearest} failed ({error}); "
            f"choose a writable {flag}"
        ) from error
    os.rmdir(probe)


def _lexists(path: Path) -> bool:
    """Return whether `path` exists, counting a dangling link, and raise OSError for an invalid path.

    A path below a file does not exist (NotADirectoryError), so the caller walks up to that file.
    """
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _check_link(target: Path, path: Path, flag: str) -> None:
    """Raise StorageError when `path` is a symbolic link that does not resolve to an existing folder."""
    if not path.is_symlink():
        return
    try:
        resolved = path.resolve(strict=True)
    except (RuntimeError, OSError) as error:
        # Python 3.11 raises RuntimeError for a loop, and newer versions raise OSError with ELOOP.
        if isinstance(error, OSError) and error.errno != errno.ELOOP:
            raise StorageError(
                f"{flag} {target} cannot be used: the symbolic link {path} points to "
                f"{os.readlink(path)}, which does not exist ({error.strerror}); "
                f"remove the link or choose another {flag}"
            ) from error
        raise StorageError(
            f"{flag} {target} cannot be used: the symbolic link {path} is part of a loop; "
            f"remove the link or choose another {flag}"
        ) from error
    if not resolved.is_dir():
        raise StorageError(
            f"{flag} {target} cannot be used: the symbolic link {path} points to {resolved}, which is not "
            f"a folder; choose another {flag}"
        )


def model_folder_problem(folder: Path) -> str | None:
    """Return why `folder` is not a model folder that `save_model_folder` wrote, or None when it is one.

    An empty folder counts as one, because replacing it loses nothing. Otherwise the folder must have a
    config.json of a delta_attnres model and nothing besides the files `save_model_folder` writes.
    """
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    known_names = {CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_NAME, *TOKENIZER_FILE_NAMES}
    # Any module of this package, because code_files() of another version may list other modules.
    known_names.update(module.name for module in Path(__file__).parent.glob("*.py"))
    foreign = [entry.name for entry in entries if not _is_model_folder_entry(entry, known_names)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it contains {shown}, which a model folder does not contain"

    path = folder / CONFIG_NAME
    if not path.is_file():
        return f"it has no {CONFIG_NAME}"
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return f"its {CONFIG_NAME} is not valid JSON"
    if not isinstance(values, dict):
        return f"its {CONFIG_NAME} does not contain a JSON object"
    if values.get("model_type") != MODEL_TYPE and not is_legacy_layout(values):
        return f"its {CONFIG_NAME} has model_type {values.get('model_type')!r}, not {MODEL_TYPE!r}"
    return None


def _is_model_folder_entry(entry: Path, known_names: set[str]) -> bool:
    if entry.name == CHAT_TEMPLATES_DIR and entry.is_dir() and not entry.is_symlink():
        return all(item.suffix == ".jinja" and not item.is_dir() for item in entry.iterdir())
    return entry.name in known_names and not (entry.is_dir() and not entry.is_symlink())


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the file the usual mode
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def replace_folder(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with `fill(tmp_folder)`, then swap it in place of `target`.

    Whatever `target` contains is deleted, so callers check first that it may be replaced. If the process
    dies before the swap, `target` is untouched. The swap itself is two renames. Between them the previous
    folder lies in a hidden `.<name>.<random>.old` folder next to `target`, which a crash at that moment
    leaves behind for the user to recover or delete.
    """
    # An absolute, normalised path has a name even when `target` is "." or ends in "..".
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_current_umask())  # mkdtemp creates 0700; give the folder the usual mode
    try:
        fill(tmp)
        if not target.exists():
            os.replace(tmp, target)
            return
        # The previous folder moves into a fresh folder, never onto a fixed name that a folder of the
        # user's could have. A symbolic link moves as a link, so the folder it points to is kept.
        old_parent = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old = old_parent / target.name
        try:
            os.replace(target, old)
        except OSError:
            old_parent.rmdir()
            raise
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(old, target)  # put the previous folder back
            old_parent.rmdir()
            raise
        shutil.rmtree(old_parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_model_folder(
    model: DecoderLM,
    folder: Path,
    tokenizer: Any | None = None,
    generation_config: dict[str, Any] | None = None,
) -> None:
    """Write `model` as a Hugging Face model folder, replacing `folder` atomically.

    `tokenizer` is a Hugging Face tokenizer whose files and special token ids are stored with the model.
    `generation_config` is the content of generation_config.json (by default the token ids).
    Raises StorageError when the tokenizer has more tokens than the model's vocabulary.
    """
    folder = Path(folder)
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise StorageError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; save the model with the tokenizer it was trained with"
        )
    token_ids = _token_ids(tokenizer)
    config = folder_config_dict(model, token_ids)
    if generation_config is None:
        generation_config = {key: value for key, value in token_ids.items() if value is not None}

    def fill(tmp: Path) -> None:
        write_json_atomic(tmp / CONFIG_NAME, config)
        write_json_atomic(tmp / GENERATION_CONFIG_NAME, generation_config)
        save_file(weights_for_saving(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for source in code_files():
            shutil.copyfile(source, tmp / source.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    replace_folder(folder, fill)


def folder_config_dict(model: DecoderLM, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """Return the config.json content of a model folder for `model`."""
    values = hf_config_dict(model.config)
    values["auto_map"] = dict(AUTO_MAP)
    values.update(token_ids)
    values["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    values["use_cache"] = True
    return values


def _token_ids(tokenizer: Any | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def code_files() -> list[Path]:
    """Return the package source files that a model folder needs for `trust_remote_code` loading.

    These are the configuration and modeling modules and, recursively, every sibling module they import
    with `from .name import`, found the way transformers finds them.
    """
    package = Path(__file__).parent
    pending = [package / f"{CONFIGURATION_MODULE}.py", package / f"{MODELING_MODULE}.py"]
    found: list[Path] = []
    while pending:
        path = pending.pop()
        if path in found:
            continue
        found.append(path)
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE):
            pending.append(package / f"{name}.py")
    return sorted(found)


def weights_for_saving(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Return the state dict without the tied LM head (safetensors refuses shared storage)."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def read_config_json(folder: Path) -> dict[str, Any]:
    """Return the parsed config.json of `folder`, or raise StorageError when it is missing or damaged."""
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise StorageError(f"model folder {folder} does not exist or is not a folder")
    if not path.is_file():
        raise StorageError(
            f"model folder {folder} has no {CONFIG_NAME}; pass a folder written by train or convert"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StorageError(f"{path} is not valid JSON ({error}); the file is damaged") from error
    if not isinstance(values, dict):
        raise StorageError(f"{path} does not contain a JSON object; the file is damaged")
    return values


def read_model_config(folder: Path) -> ModelConfig:
    """Return the ModelConfig of a model folder, or raise StorageError naming the problem."""
    folder = Path(folder)
    values = read_config_json(folder)
    path = folder / CONFIG_NAME
    if values.get("model_type") != MODEL_TYPE:
        raise StorageError(
            f"{path} has model_type {values.get('model_type')!r}, expected {MODEL_TYPE!r}; "
            "convert Hugging Face checkpoints with `delta-attnres convert` first"
        )
    try:
        if is_legacy_layout(values):
            return legacy_model_config(values)
        return model_config_from_hf_dict(values)
    except (TypeError, ValueError) as error:
        raise StorageError(f"invalid model config in {path}: {error}") from error


def weight_files(folder: Path) -> list[Path]:
    """Return the safetensors files of a checkpoint folder: one file, or the shards its index lists.

    Raises StorageError when there are none. A folder with only pickled weights (pytorch_model.bin) is
    rejected because loading those would unpickle data.
    """
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise StorageError(f"{index} is not a valid safetensors index ({error!r})") from error
        shards = sorted({folder / name for name in weight_map.values()})
        absent = [shard.name for shard in shards if not shard.is_file()]
        if absent:
            raise StorageError(f"{index} lists shard(s) missing from {folder}: {', '.join(absent)}")
        return shards
    if any((folder / name).exists() for name in PICKLE_WEIGHT_NAMES):
        raise StorageError(
            f"{folder} contains only pickled weights (pytorch_model.bin), which are not loaded because "
            "loading them runs arbitrary code; save the checkpoint with safe_serialization (safetensors)"
        )
    raise StorageError(f"{folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")


def read_weights(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint folder (single or sharded safetensors)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            shard = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as error:
            raise StorageError(f"cannot read {path}: {error}; the file is truncated or damaged") from error
        duplicated = sorted(set(shard) & set(state))
        if duplicated:
            raise StorageError(
                f"tensor(s) {', '.join(duplicated[:5])} appear in more than one shard of {folder}"
            )
        state.update(shard)
    return state


def read_weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Return the name and shape of every tensor in a checkpoint folder, reading only file headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as error:
            raise StorageError(f"cannot read {path}: {error}; the file is truncated or damaged") from error
    return shapes


def check_model_folder(folder: Path) -> ModelConfig:
    """Validate a model folder without loading its weights, and return its ModelConfig.

    Checks the config, the names and shapes of the tensors against it, and, when tokenizer files are
    present, that the tokenizer fits the model's vocabulary. Raises StorageError naming the problem.
    """
    folder = Path(folder)
    config = read_model_config(folder)
    expected = {name: tuple(tensor.shape) for name, tensor in _empty_state(config).items()}
    origin = str(folder)
    check_weight_names(config, expected, read_weight_shapes(folder), origin)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        check_tokenizer_fits(folder, config)
    return config


def _empty_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return DecoderLM(config).state_dict()


def check_tokenizer_fits(folder: Path, config: ModelConfig) -> None:
    """Raise StorageError unless the tokenizer stored in `folder` fits the model's vocabulary."""
    from .data import DataError, load_tokenizer

    try:
        tokenizer = load_tokenizer(folder)
    except DataError as error:
        raise StorageError(str(error)) from error
    if len(tokenizer) > config.vocab_size:
        raise StorageError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}; the tokenizer does not belong to this model"
        )


def check_weight_names(
    config: ModelConfig,
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    origin: str,
) -> None:
    """Raise StorageError for missing, unexpected or mis-shaped tensors, naming the first few."""
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise StorageError(
            f"{origin} does not match the model config: missing {missing[:5] or 'none'}, "
            f"unexpected {unexpected[:5] or 'none'}"
        )
    for name, shape in found.items():
        if tuple(shape) != tuple(expected[name]):
            raise StorageError(
                f"{origin}: tensor {name} has shape {tuple(shape)}, the config expects {tuple(expected[name])}"
            )


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu") -> DecoderLM:
    """Load a model folder written by `save_model_folder` as a DecoderLM; reads only JSON and safetensors."""
    folder = Path(folder)
    config = read_model_config(folder)
    state = read_weights(folder, device)
    model = DecoderLM(config).to(device)
    load_weights(model, state, str(folder))
    return model


def load_weights(model: DecoderLM, state: dict[str, torch.Tensor], origin: str) -> None:
    """Copy `state` into `model`, rejecting missing, unexpected or mis-shaped tensors by name."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    check_weight_names(model.config, expected, found, origin)
    model.load_state_dict(state, strict=False)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def load_weights_from_folder(model: DecoderLM, folder: str | Path) -> None:
    """Copy the weights of the model folder `folder` into `model`, whose config must equal the folder's."""
    folder = Path(folder)
    config = read_model_config(folder)
    if config != model.config:
        raise StorageError(
            f"the model config of {folder} differs from the model being built "
            f"(scheme {config.residual.scheme!r} vs {model.config.residual.scheme!r}); "
            "build the model from the folder's own config"
        )
    device = next(model.parameters()).device
    load_weights(model, read_weights(folder, device), str(folder))


def _current_umask() -> int:
    """Return the process umask (reading it requires setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
