"""The expert package: the one thing an owner publishes, and its signature.

A package is a folder with `expert.safetensors` (per layer i: the owner's FFN as
`layers.{i}.gate_up_proj` (2I, H, gate rows first) and `layers.{i}.down_proj` (H, I), its router
row `layers.{i}.router` (H) and its bias `layers.{i}.bias`, the trained b of min(b, 0)), the
manifest `consort_expert.json`, and `consort_signature.json`. Nothing of the anchor is in it: the
manifest names the anchor and tokenizer (by hash) the expert was trained against, and the merge
takes everything else from its own anchor.

Each owner holds an Ed25519 key pair (`cryptography`'s implementation); the coordinator holds the
owners' public keys in its keyring (`keyring/<owner>.pub`), enrolled once when the owner joins.
The signature covers the SHA-256 of every file in the package (weights and manifest) and the
owner's name, so changing one byte of any file, adding or removing a file, or re-signing with
another key is detected, and the merge says which of these happened.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from stages.artifacts import PRIVATE_KEY, PUBLIC_KEY, SIGNATURE, WEIGHTS
from stages.io import file_digest


class PackageRefused(ValueError):
    """A package whose signature does not hold: unsigned, tampered, or signed by another key."""


def create_owner_key(key_dir: Path) -> Path:
    """An owner's key pair in `key_dir` (the private key readable by the owner only); returns the public key's path.

    An existing key is kept: a new one would make every package signed before unverifiable.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = key_dir / PRIVATE_KEY, key_dir / PUBLIC_KEY
    if private_path.exists():
        return public_path
    key_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = private_path.with_name(f".{PRIVATE_KEY}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    os.replace(tmp, private_path)
    return public_path


def enrol_owner_key(public_key: Path, keyring: Path, owner: str) -> Path:
    """Put an owner's public key in the coordinator's keyring (kept if that key is already there)."""
    keyring.mkdir(parents=True, exist_ok=True)
    target = enrolled_key(keyring, owner)
    data = public_key.read_bytes()
    if target.exists() and target.read_bytes() != data:
        raise PackageRefused(f"keyring {keyring} already holds a different key for owner {owner!r}: remove "
                             f"{target} only if that owner really replaced its key")
    if not target.exists():
        target.write_bytes(data)
    return target


def _file_digests(package: Path) -> dict[str, str]:
    return {path.relative_to(package).as_posix(): file_digest(path)
            for path in sorted(p for p in package.rglob("*") if p.is_file() and p.name != SIGNATURE)}


def _payload(owner: str, files: dict[str, str]) -> bytes:
    return json.dumps({"owner": owner, "files": files}, sort_keys=True, separators=(",", ":")).encode()


def sign_package(package: Path, private_key: Path, owner: str) -> None:
    """Write the package's signature file over every other file in it (call last, inside the atomic write)."""
    from cryptography.hazmat.primitives import serialization

    if not private_key.exists():
        raise FileNotFoundError(f"{private_key}: no signing key for owner {owner!r}; "
                                f"create one with `consort owner init {owner}`")
    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    files = _file_digests(package)
    signature = base64.b64encode(key.sign(_payload(owner, files))).decode()
    (package / SIGNATURE).write_text(json.dumps({"owner": owner, "algorithm": "ed25519", "files": files,
                                                 "signature": signature}, indent=2, sort_keys=True) + "\n")


def package_hash(package: Path) -> str:
    """The package's name in lineage: the SHA-256 of its signature file, which covers every other file."""
    signature = package / SIGNATURE
    return file_digest(signature) if signature.exists() else ""


def enrolled_key(keyring: Path, owner: str) -> Path:
    return keyring / f"{owner}.pub"


def verify_package(package: Path, owner: str, key_path: Path) -> None:
    """Raise PackageRefused, saying which check failed, unless the key at `key_path` signed exactly these files."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    sig_path = package / SIGNATURE
    if not sig_path.exists():
        raise PackageRefused(f"expert {owner}: {sig_path} is missing: the package is unsigned, or its upload "
                             "did not finish (publish it again)")
    if not key_path.exists():
        raise PackageRefused(f"expert {owner}: no public key for {owner!r} in the keyring ({key_path}); "
                             "enrol the owner's key first (`consort owner init` prints it)")
    try:
        record = json.loads(sig_path.read_text())
        signed_files, signature = dict(record["files"]), base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as err:
        raise PackageRefused(f"expert {owner}: {sig_path} is not a signature record ({err})") from None
    try:
        serialization.load_pem_public_key(key_path.read_bytes()).verify(signature, _payload(owner, signed_files))
    except InvalidSignature:
        raise PackageRefused(f"expert {owner}: the signature does not verify with {owner}'s enrolled key: the package "
                             "was signed by another key, for another owner, or its signature record was edited") from None
    actual = _file_digests(package)
    for name in sorted(set(signed_files) | set(actual)):
        if name not in actual:
            raise PackageRefused(f"expert {owner}: signed file {name} is missing from the package (an upload "
                                 "that did not finish? publish it again)")
        if name not in signed_files:
            raise PackageRefused(f"expert {owner}: file {name} is not covered by the signature (added after signing)")
        if actual[name] != signed_files[name]:
            raise PackageRefused(f"expert {owner}: file {name} changed after it was signed (tampered or corrupted)")


def expert_tensors(trained) -> dict:
    """The owner's half of a trained 2-expert model (stages/model/moe.py's blocks), in the package layout."""
    import torch

    from stages.model.moe import OWNER, blocks

    out = {}
    for i, block in enumerate(blocks(trained)):
        ffn = block.experts[OWNER]
        out[f"layers.{i}.gate_up_proj"] = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight]).detach().clone()
        out[f"layers.{i}.down_proj"] = ffn.down_proj.weight.detach().clone()
        out[f"layers.{i}.router"] = block.routers[OWNER].weight.detach().reshape(-1).clone()
        out[f"layers.{i}.bias"] = block.owner_bias.detach().reshape(()).clone()
    return out


def owner_model(anchor, r_pub, tensors: dict):
    """The owner's 2-expert model again (its public expert the anchor's FFN), from its package's tensors:
    the inverse of expert_tensors."""
    import torch

    from stages.model.moe import OWNER, blocks, upcycle

    model = upcycle(anchor, r_pub, tensors["layers.0.router"])
    with torch.no_grad():
        for i, block in enumerate(blocks(model)):
            ffn = block.experts[OWNER]
            gate, up = tensors[f"layers.{i}.gate_up_proj"].chunk(2)
            ffn.gate_proj.weight.copy_(gate)
            ffn.up_proj.weight.copy_(up)
            ffn.down_proj.weight.copy_(tensors[f"layers.{i}.down_proj"])
            block.routers[OWNER].weight.copy_(tensors[f"layers.{i}.router"].view(1, -1))
            block.owner_bias.copy_(tensors[f"layers.{i}.bias"])
    return model.eval()


def open_expert_tensors(package: Path, owner: str, num_layers: int, hidden: int, intermediate: int):
    """The package's tensors, read on demand (stages/model/tensor_files.py), their shapes checked against
    this anchor's first; PackageRefused naming the first misfit."""
    from stages.model.tensor_files import TensorFiles

    path = package / WEIGHTS
    if not path.exists():
        raise PackageRefused(f"expert {owner}: {path} is missing; is {package} an expert package of this version?")
    shapes = {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate), "router": (hidden,),
              "bias": ()}
    expected = {f"layers.{i}.{name}": shape for i in range(num_layers) for name, shape in shapes.items()}
    tensors = TensorFiles(path)
    for name, shape in expected.items():
        if name not in tensors.where:
            raise PackageRefused(f"expert {owner}: tensor {name} is missing from its package")
        if tensors.shape(name) != shape:
            raise PackageRefused(f"expert {owner}: tensor {name} has shape {tensors.shape(name)}, this anchor "
                                 f"needs {shape}: the expert was built for another architecture")
    extra = sorted(set(tensors.where) - set(expected))
    if extra:
        raise PackageRefused(f"expert {owner}: its package holds tensors this anchor has no place for: "
                             f"{', '.join(extra[:3])}")
    return tensors
