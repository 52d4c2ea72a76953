"""Signed cache entries: only the holder of the private key (CI) can vouch for an artifact.

A store checks every file against the sha256 its entry records, but whoever can
write to the store can replace a file and its recorded sha256 together. A
signature over the entry closes that hole: CI signs each entry with an Ed25519
private key; readers hold only the public key and treat an entry whose
signature is missing or wrong as a miss.

Keys come from the environment, as a PEM file's path or the PEM text itself
(what a CI secret holds):

- ``RKNN_PIPELINE_CACHE_SIGNING_KEY``: the private key (writers). Its public
  half also checks what this process reads.
- ``RKNN_PIPELINE_CACHE_PUBLIC_KEY``: the public key (readers).

``python -m pipeline.signing keygen DIR`` writes a new pair.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from pipeline.errors import PipelineError

PRIVATE_ENV = "RKNN_PIPELINE_CACHE_SIGNING_KEY"
PUBLIC_ENV = "RKNN_PIPELINE_CACHE_PUBLIC_KEY"


class SignatureError(PipelineError):
    """An entry's signature is missing or does not verify; the message says which."""


def _pem(value: str) -> bytes:
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).expanduser().read_bytes()


class Signing:
    """The signing and checking keys of one process (either may be absent)."""

    def __init__(self, private_pem: bytes | None = None, public_pem: bytes | None = None):
        from cryptography.hazmat.primitives import serialization

        self._private = serialization.load_pem_private_key(private_pem, None) if private_pem else None
        public = serialization.load_pem_public_key(public_pem) if public_pem else None
        if public is None and self._private is not None:
            public = self._private.public_key()
        self._public = public

    @classmethod
    def from_environment(cls) -> Signing | None:
        """The keys named by the environment, or None when no key is configured (entries unsigned)."""
        private, public = os.environ.get(PRIVATE_ENV), os.environ.get(PUBLIC_ENV)
        if not private and not public:
            return None
        try:
            return cls(_pem(private) if private else None, _pem(public) if public else None)
        except (OSError, ValueError, TypeError) as exc:
            raise SignatureError(f"cannot load the cache signing keys ({PRIVATE_ENV} / {PUBLIC_ENV}): {exc}. "
                                 f"Give a PEM file's path or the PEM text; make a pair with "
                                 f"`python -m pipeline.signing keygen DIR`") from exc

    @property
    def can_sign(self) -> bool:
        return self._private is not None

    def sign(self, payload: bytes) -> str:
        return self._private.sign(payload).hex()

    def check(self, payload: bytes, signature) -> None:
        """Raise :class:`SignatureError` unless ``signature`` (hex) signs ``payload`` with the public key."""
        from cryptography.exceptions import InvalidSignature

        if not isinstance(signature, str) or not signature:
            raise SignatureError("the entry is not signed")
        try:
            self._public.verify(bytes.fromhex(signature), payload)
        except (InvalidSignature, ValueError):
            raise SignatureError("the entry's signature does not verify with the configured public key") from None


def keygen(directory: Path) -> tuple[Path, Path]:
    """Write ``cache-signing.pem`` (private, mode 0600) and ``cache-signing.pub.pem`` into ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / "cache-signing.pem"
    public = directory / "cache-signing.pub.pem"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.signing")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("keygen", help="write a new Ed25519 key pair for signing cache entries")
    gen.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    private, public = keygen(args.directory)
    print(f"private key (CI secret {PRIVATE_ENV}): {private}\npublic key ({PUBLIC_ENV}): {public}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
