"""The vault's master key: where it comes from, and what is derived from it.

Sources, first found wins: a systemd credential (``$CREDENTIALS_DIRECTORY/vault-key``,
which ``LoadCredentialEncrypted=`` can seal to the TPM), a key file (mode 0600, else
refused), or a passphrase stretched with scrypt (salt and parameters stored in the
vault's metadata, never weaker than N=2^17, r=8, p=1). The master key never encrypts
data itself: HKDF-SHA256 derives one key per purpose. A key check value in the
metadata tells a wrong key apart from corrupted data.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from edgellm.errors import NoKey, VaultKeyError, WrongKey
from edgellm.vault.files import fsync_dir

KEY_LEN = 32
SCRYPT_MIN = {"n": 1 << 17, "r": 8, "p": 1}
CREDENTIAL = "vault-key"


@dataclass(frozen=True)
class MasterKey:
    key: bytes
    source: str  # "credential", "key file …", "passphrase"

    def derive(self, purpose: str) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(),
            length=KEY_LEN,
            salt=None,
            info=f"edgellm-vault/1 {purpose}".encode(),
        ).derive(self.key)

    @property
    def key_id(self) -> bytes:
        return hmac.new(self.key, b"edgellm-vault/1 key id", hashlib.sha256).digest()[:8]

    @property
    def check_value(self) -> bytes:
        return hmac.new(self.key, b"edgellm-vault/1 key check", hashlib.sha256).digest()[:16]


def _parse_key(raw: bytes, where: str) -> bytes:
    text = raw.strip()
    if len(raw) == KEY_LEN:
        return raw
    if len(text) == 2 * KEY_LEN:
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
    raise VaultKeyError(f"{where} does not hold a 256-bit key (32 raw bytes or 64 hex digits)")


def read_key_file(path: Path) -> MasterKey:
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise VaultKeyError(
            f"{path} can be read by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"the key file must be 0600: chmod 600 {path}"
        )
    return MasterKey(_parse_key(path.read_bytes(), str(path)), f"key file {path}")


def create_key_file(path: Path, key: bytes | None = None) -> MasterKey:
    """A new key (random unless given) in a new 0600 file; never overwrites one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = os.urandom(KEY_LEN) if key is None else key
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    return MasterKey(key, f"key file {path}")


def from_passphrase(passphrase: str, kdf: dict[str, object]) -> MasterKey:
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])  # type: ignore[call-overload]
    if n < SCRYPT_MIN["n"] or r < SCRYPT_MIN["r"] or p < SCRYPT_MIN["p"]:
        raise VaultKeyError(
            f"scrypt parameters N={n}, r={r}, p={p} are weaker than N=2^17, r=8, p=1; refusing them"
        )
    salt = bytes.fromhex(str(kdf["salt"]))
    key = Scrypt(salt=salt, length=KEY_LEN, n=n, r=r, p=p).derive(passphrase.encode())
    return MasterKey(key, "passphrase")


def new_kdf_params() -> dict[str, object]:
    return {"name": "scrypt", "salt": os.urandom(16).hex(), **SCRYPT_MIN}


def find_master_key(
    key_file: Path | None,
    passphrase: str | None,
    kdf: dict[str, object] | None,
    environ: dict[str, str] | None = None,
) -> MasterKey:
    env = os.environ if environ is None else environ
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL).exists():
        path = Path(creds) / CREDENTIAL
        return MasterKey(_parse_key(path.read_bytes(), f"credential {CREDENTIAL}"), "credential")
    if key_file is not None:
        return read_key_file(key_file)
    if passphrase is not None:
        if kdf is None:
            raise VaultKeyError("this vault has no passphrase set up (it uses a key file)")
        return from_passphrase(passphrase, kdf)
    if kdf is not None:
        raise NoKey("this vault is opened by a passphrase: give it (`edgellm vault unlock`)")
    raise NoKey(
        "no vault key: give --key-file / EDGELLM_VAULT_KEY_FILE, or a systemd "
        f"credential named {CREDENTIAL}"
    )


def seal_secret(key: MasterKey, secret: bytes, label: str) -> str:
    """A small secret sealed under the master key (hex), for ``vault.json``."""
    nonce = os.urandom(12)
    sealed = AESGCM(key.derive("meta-wrap")).encrypt(nonce, secret, label.encode())
    return (nonce + sealed).hex()


def open_secret(key: MasterKey, sealed_hex: str, label: str) -> bytes:
    raw = bytes.fromhex(sealed_hex)
    try:
        return AESGCM(key.derive("meta-wrap")).decrypt(raw[:12], raw[12:], label.encode())
    except InvalidTag:
        raise VaultKeyError(
            f"the sealed {label} in vault.json does not open with this key (the file was altered)"
        ) from None


CURRENT = 2  # 2: objects bound to their identity, and the audit log's signed head
_AUDIT_KEY_AAD = {1: "audit key", 2: "audit key/v2"}


@dataclass
class VaultMeta:
    """``vault.json``: what is needed to open the vault, and nothing secret in clear.

    ``audit_key`` is the audit chain's key sealed under the master key: it survives a
    key rotation, so the chain written before still verifies after."""

    check: str
    key_id: str
    kdf: dict[str, object] | None = None
    audit_key: str | None = None
    version: int = 1

    @classmethod
    def for_key(
        cls, key: MasterKey, kdf: dict[str, object] | None = None, audit_key: bytes | None = None
    ) -> VaultMeta:
        audit_key = os.urandom(KEY_LEN) if audit_key is None else audit_key
        return cls(
            check=key.check_value.hex(),
            key_id=key.key_id.hex(),
            kdf=kdf,
            audit_key=seal_secret(key, audit_key, _AUDIT_KEY_AAD[CURRENT]),
            version=CURRENT,
        )

    def audit_key_for(self, key: MasterKey) -> bytes:
        if self.audit_key is None:  # vaults made before the key was sealed here
            return key.derive("audit-hmac")
        if self.version not in _AUDIT_KEY_AAD:
            raise WrongKey(
                f"vault.json has version {self.version!r}, which this edgellm does not know"
            )
        # the seal authenticates the version: set back to 1 by hand (to skip the
        # signed audit head and the objects' identity checks), the audit key fails
        return open_secret(key, self.audit_key, _AUDIT_KEY_AAD[self.version])

    def verify(self, key: MasterKey) -> None:
        if not hmac.compare_digest(bytes.fromhex(self.check), key.check_value):
            raise WrongKey(
                f"wrong vault key (from {key.source}): it does not match this "
                "vault's key check value"
            )

    @classmethod
    def load(cls, path: Path) -> VaultMeta:
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        """Atomically (temporary file, fsync, rename, fsync the directory)."""
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(vars(self), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
