"""The test servers leave nothing behind (the suite once left 15 /tmp/hfhub-* folders, 73 MB)."""

from __future__ import annotations

from tests.support.hfhub import Hub


async def test_hub_removes_its_folder_on_close() -> None:
    hub = Hub()
    hub.add_repo("org/m", {"config.json": b"{}", "w.bin": b"x" * 1000})
    await hub.start()
    folder = hub._dir
    assert any(folder.rglob("*"))
    await hub.close()
    assert not folder.exists()
