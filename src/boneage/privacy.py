"""Keyed pseudonyms: what lets a table row be matched to its DICOM instance without carrying the identifier.

A pseudonym is HMAC-SHA-256 of the value (a SOP Instance UID, a report's input key) under this site's secret key:
stable for the same key, unlinkable without it (a plain hash of a UID could be reversed by hashing candidate UIDs).
The key is 32 random bytes in a file readable only by its owner: ``--pseudonym-key FILE``, else
``$BONEAGE_PSEUDONYM_KEY`` (a file path), else ``~/.config/boneage/pseudonym.key``, made on first use. Keep it with
the archive's other secrets: whoever holds it (and the UIDs) can re-link rows to instances; nobody else can.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from boneage.errors import BoneAgeError

KEY_BYTES = 32
PSEUDONYM_HEX = 24  # 96 bits: no collisions among billions of instances


def default_key_file() -> Path:
    """Where the site key lives unless ``--pseudonym-key`` says otherwise."""
    env = os.environ.get("BONEAGE_PSEUDONYM_KEY")
    return Path(env) if env else Path.home() / ".config" / "boneage" / "pseudonym.key"


def load_key(path: str | Path | None = None, *, create: bool = True) -> bytes:
    """The secret key from ``path`` (default ``default_key_file()``), created (mode 0600) when missing."""
    path = Path(path) if path else default_key_file()
    if not path.exists() and create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(KEY_BYTES))
        except FileExistsError:
            pass  # another process made it first: read theirs
        except OSError as exc:
            raise BoneAgeError(f"cannot create the pseudonym key {path} ({exc.strerror}); give a writable "
                               "--pseudonym-key FILE") from exc
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise BoneAgeError(f"cannot read the pseudonym key {path} ({exc.strerror}); give --pseudonym-key FILE") from exc
    if len(key) < 16:
        raise BoneAgeError(f"the pseudonym key {path} holds {len(key)} bytes; it needs at least 16 random bytes "
                           "(delete it to have a new one made, which changes every pseudonym)")
    return key


def pseudonym(value: str, key: bytes) -> str:
    """The keyed pseudonym of ``value``: 24 hex digits."""
    return hmac.new(key, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


_UID_PART = re.compile(r"^([0-2](?:\.(?:0|[1-9][0-9]*)){2,})((?:\.[A-Za-z][A-Za-z0-9]{0,4})?)$")


def public_path(key: str, secret: bytes) -> str:
    """``key`` (a posix path relative to the input root) with every component that is a DICOM UID (PACS exports
    name files and folders by their Study/Series/SOP Instance UIDs) replaced by ``uid-<pseudonym>``, a suffix such
    as ``.dcm`` kept. Other names are kept as they are: a folder named after a patient must be renamed, or the
    table kept private."""
    parts = key.split("/")
    for i, part in enumerate(parts):
        match = _UID_PART.match(part)
        if match and len(match.group(1)) >= 10:
            parts[i] = f"uid-{pseudonym(match.group(1), secret)}{match.group(2)}"
    return "/".join(parts)
