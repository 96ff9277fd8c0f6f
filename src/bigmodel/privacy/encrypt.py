"""Encrypted artifacts: AES-256-GCM (the `cryptography` library), no hand-written crypto.

`bigmodel export RUN --encrypt --key-file K` writes one file, `<out>/model.bmenc`:

    MAGIC (16 bytes) | header length (4 bytes, big-endian) | header (JSON) | AES-256-GCM ciphertext + tag

The plaintext is a zip (stored, not compressed) of the run's `recipe.yaml` and its `model/` artifact folder, so
`predict`, `serve`, `generate` and `evaluate` work on the file as on the run. GCM authenticates the ciphertext and,
as associated data, the magic and header: a wrong key, a flipped byte anywhere or a swapped header fails
authentication and is a one-line error — never garbage weights. A fresh random 96-bit nonce per file.

Keys are 32 random bytes, kept in a key file as 64 hex characters (`bigmodel export --new-key K` writes one, mode
0600). Where a key comes from, first found: `load_artifact(path, key=...)`; the CLI's `--key-file` (also
`BIGMODEL_KEY_FILE`); `BIGMODEL_KEY` (the 64 hex characters themselves). Decrypted files exist only while a model
loads, in a private temporary folder (mode 0700) that is removed right after.
"""

from __future__ import annotations

import binascii
import contextlib
import io
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from bigmodel.errors import UserError

MAGIC = b"BIGMODEL-AESGCM\x00"
FORMAT = 1
SUFFIX = ".bmenc"
_default_key_file: Path | None = None


def set_key_file(path: Path | None) -> None:
    """The key file commands use when no key is passed (the CLI's `--key-file`)."""
    global _default_key_file
    _default_key_file = path


def new_key_file(path: Path) -> Path:
    """Write a fresh random 256-bit key (64 hex characters) to `path`, readable by its owner only."""
    if path.exists():
        raise UserError(f"--new-key {path}: exists; a key file is never overwritten")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(os.urandom(32).hex() + "\n")
    return path


def parse_key(text: str, source: str) -> bytes:
    s = text.strip()
    try:
        key = bytes.fromhex(s)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise UserError(f"{source}: expected a 256-bit key as 64 hex characters (bigmodel export --new-key FILE)")
    return key


def read_key_file(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"--key-file {path}: {e.strerror or e}") from None
    try:
        return parse_key(raw.decode("ascii"), f"--key-file {path}")
    except UnicodeDecodeError:
        raise UserError(f"--key-file {path}: expected 64 hex characters, found binary data") from None


def resolve_key(key: bytes | str | None, what: Path) -> bytes:
    if isinstance(key, bytes):
        if len(key) != 32:
            raise UserError(f"{what}: the key must be 32 bytes (AES-256)")
        return key
    if isinstance(key, str):
        return parse_key(key, "key")
    if _default_key_file is not None:
        return read_key_file(_default_key_file)
    if os.environ.get("BIGMODEL_KEY_FILE"):
        return read_key_file(Path(os.environ["BIGMODEL_KEY_FILE"]))
    if os.environ.get("BIGMODEL_KEY"):
        return parse_key(os.environ["BIGMODEL_KEY"], "BIGMODEL_KEY")
    raise UserError(f"{what}: an encrypted model; give its key with --key-file FILE (or BIGMODEL_KEY)")


def is_encrypted(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _aesgcm() -> type:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise UserError("encrypted models need the cryptography package: pip install 'bigmodel[privacy]'") from None
    return AESGCM


def encrypt_run(run_dir: Path, out: Path, key: bytes) -> Path:
    """Encrypt the run's recipe.yaml and model/ folder into `out` (written atomically, mode 0600)."""
    AESGCM = _aesgcm()  # noqa: N806

    import bigmodel

    model = run_dir / "model"
    if not (model / "config.json").is_file():
        raise UserError(f"{run_dir}: no model/ to encrypt (give a run directory whose training finished)")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        if (run_dir / "recipe.yaml").is_file():
            z.write(run_dir / "recipe.yaml", "recipe.yaml")
        for p in sorted(model.rglob("*")):
            if p.is_file():
                z.write(p, str(Path("model") / p.relative_to(model)))
    nonce = os.urandom(12)
    header = json.dumps(
        {
            "format": FORMAT,
            "cipher": "AES-256-GCM",
            "nonce": nonce.hex(),
            "content": "zip: recipe.yaml, model/",
            "bigmodel_version": bigmodel.__version__,
        },
        sort_keys=True,
    ).encode()
    prefix = MAGIC + struct.pack(">I", len(header)) + header
    blob = prefix + AESGCM(key).encrypt(nonce, buf.getvalue(), prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def decrypt(path: Path, key: bytes) -> bytes:
    """The plaintext zip of an encrypted model, or a one-line UserError (wrong key, modified or truncated file)."""
    AESGCM = _aesgcm()  # noqa: N806
    from cryptography.exceptions import InvalidTag

    blob = path.read_bytes()
    bad = UserError(f"{path}: cannot decrypt: wrong key, or the file was modified (AES-GCM authentication failed)")
    if len(blob) < len(MAGIC) + 4 or not blob.startswith(MAGIC):
        raise UserError(f"{path}: not an encrypted bigmodel model")
    (n,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    end = len(MAGIC) + 4 + n
    try:
        header = json.loads(blob[len(MAGIC) + 4 : end])
        nonce = bytes.fromhex(header["nonce"])
        fmt = header["format"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise bad from None
    if fmt != FORMAT:
        raise UserError(f"{path}: encrypted model format {fmt} is not {FORMAT}")
    try:
        return AESGCM(key).decrypt(nonce, blob[end:], blob[:end])
    except (InvalidTag, ValueError):
        raise bad from None


@contextlib.contextmanager
def decrypted(path: str | Path, key: bytes | str | None = None) -> Iterator[Path]:
    """A private temporary folder holding the decrypted recipe.yaml and model/ while the block runs."""
    path = Path(path)
    data = decrypt(path, resolve_key(key, path))
    tmp = Path(tempfile.mkdtemp(prefix="bigmodel-decrypted-"))  # mode 0700
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                target = (tmp / name).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise UserError(f"{path}: an entry points outside the model ({name!r})")
            z.extractall(tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
