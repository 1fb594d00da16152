"""API keys at rest: AES-GCM under a master keyring; each ciphertext names the key id it needs.

The keyring comes from PREFD_SECRET_KEY (comma-separated base64url 32-byte keys, the first is
current) or, in embedded mode, from the data directory's `secret_key` file (created on first
use). Rotation: put the new key first, run `prefd rotate-master-key` to re-encrypt everything
under it, then drop the old key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from prefd_server.kernel.errors import MasterKeyMissing, SecretUnreadable
from prefd_server.settings import Settings

KEY_BYTES = 32
NONCE_BYTES = 12
KEYRING_FILE = "secret_key"


@dataclass(frozen=True, slots=True)
class Sealed:
    """One encrypted secret as stored."""

    key_id: str
    nonce: bytes
    ciphertext: bytes


def key_id(key: bytes) -> str:
    """A short public name for a master key (never the key)."""
    return hashlib.sha256(b"prefd-master-key:" + key).hexdigest()[:16]


def parse_keyring(text: str) -> list[bytes]:
    """Keys from 'k1,k2' or one per line; ValueError on a malformed key."""
    keys = []
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            key = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (binascii.Error, ValueError) as exc:
            raise ValueError("a master key is not base64url") from exc
        if len(key) != KEY_BYTES:
            raise ValueError(f"a master key must be {KEY_BYTES} bytes (got {len(key)})")
        keys.append(key)
    return keys


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def keyring_path(settings: Settings) -> Path:
    return settings.data_dir / KEYRING_FILE


def write_keyring(path: Path, keys: list[bytes]) -> None:
    """Replace the keyring file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(encode_key(k) for k in keys) + "\n")
    tmp.replace(path)


def load_keyring(settings: Settings) -> list[bytes]:
    """The configured keyring; embedded mode creates one in the data directory. Empty: none configured."""
    if settings.secret_key is not None:
        return parse_keyring(settings.secret_key.get_secret_value())
    if not settings.embedded:
        return []
    path = keyring_path(settings)
    if not path.exists():
        write_keyring(path, [secrets.token_bytes(KEY_BYTES)])
    return parse_keyring(path.read_text())


class SecretBox:
    """Encrypts under the current master key; decrypts under any key of the ring."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._load()

    def _load(self) -> None:
        keys = load_keyring(self._settings)
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self.current_id = key_id(keys[0]) if keys else ""

    @property
    def configured(self) -> bool:
        return bool(self.current_id)

    def seal(self, plaintext: str, context: str) -> Sealed:
        """Encrypt `plaintext`, bound to `context` (so a ciphertext cannot be moved to another row)."""
        if not self.configured:
            raise MasterKeyMissing("no master key configured: set PREFD_SECRET_KEY to store API keys")
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._keys[self.current_id].encrypt(nonce, plaintext.encode(), context.encode())
        return Sealed(self.current_id, nonce, sealed)

    def open(self, sealed: Sealed, context: str) -> str:
        """Decrypt; re-reads the keyring once if the key id is unknown (a rotation happened meanwhile)."""
        cipher = self._keys.get(sealed.key_id)
        if cipher is None:
            self._load()
            cipher = self._keys.get(sealed.key_id)
        if cipher is None:
            raise SecretUnreadable(f"API key sealed under unknown master key {sealed.key_id}")
        try:
            return cipher.decrypt(sealed.nonce, sealed.ciphertext, context.encode()).decode()
        except InvalidTag as exc:
            raise SecretUnreadable("API key failed authentication") from exc

    def holds(self, kid: str) -> bool:
        return kid in self._keys


def sealing_context(config_id: str) -> str:
    """Binds a sealed key to its config (either slot: rotation moves the primary to the secondary)."""
    return f"prefd:ai_api_key:{config_id}"
