"""Container records and image holds, without runc: names, id prefixes, `kura ps`'s words,
and `kura rmi` refusing an image a container holds."""

from __future__ import annotations

import json

import pytest

from containers.cli import ago, status_text
from containers.state import ContainerError, Containers
from puller.store import Store, StoreError


def test_names_are_unique_and_ids_found_by_a_unique_prefix(tmp_path):
    containers = Containers(tmp_path)
    a = containers.create({"name": "web", "status": "created"})
    b = containers.create({"name": None, "status": "created"})
    assert len(a["id"]) == 64 and b["name"] == b["id"][:12]
    with pytest.raises(ContainerError, match="already in use"):
        containers.create({"name": "web"})
    with pytest.raises(ContainerError, match="invalid name"):
        containers.create({"name": "../x"})
    assert containers.find("web")["id"] == a["id"]
    assert containers.find(b["id"][:5])["id"] == b["id"]
    with pytest.raises(ContainerError, match="no container"):
        containers.find("nope")
    record = json.loads((tmp_path / "containers" / a["id"] / "state.json").read_text())
    assert record["name"] == "web"


def test_the_containers_directory_is_root_s_alone_and_a_second_remove_is_quiet(tmp_path):
    """Image files under it keep their setuid bits and device nodes: other users may not reach
    them. Two removers of one container (a --rm supervisor and `kura rm -f`) both succeed."""
    (tmp_path / "containers").mkdir(mode=0o755)
    containers = Containers(tmp_path)
    record = containers.create({"name": "web", "status": "created"})
    assert (tmp_path / "containers").stat().st_mode & 0o777 == 0o700
    (containers.directory(record["id"]) / "upper" / "etc").mkdir(parents=True)
    containers.remove_directory(record["id"])
    containers.remove_directory(record["id"])
    assert not containers.directory(record["id"]).exists()


def test_rmi_refuses_the_last_reference_to_a_held_image(tmp_path):
    store = Store(tmp_path)
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "a" * 64,
                  "size": 2}
    store.add("docker.io/library/x:1", descriptor)
    store.add("docker.io/library/x:2", descriptor)
    store.hold("c" * 64, descriptor["digest"], "web")
    store.remove("docker.io/library/x:1")  # another reference still names the image
    with pytest.raises(StoreError, match="used by container web"):
        store.remove("docker.io/library/x:2")
    store.release("c" * 64)
    store.remove("docker.io/library/x:2")
    with pytest.raises(StoreError, match="no longer in the store"):
        store.hold("c" * 64, descriptor["digest"], "web")


def test_ps_says_durations_as_docker_does():
    assert [ago(s) for s in (0.5, 1, 5, 60, 150, 3600, 7200, 3 * 86400)] == [
        "Less than a second", "1 second", "5 seconds", "About a minute", "2 minutes", "About an hour", "2 hours",
        "3 days"]
    assert status_text({"status": "running", "started": 95}, 100) == "Up 5 seconds"
    assert status_text({"status": "exited", "exit_code": 3, "finished": 0}, 120) == "Exited (3) 2 minutes ago"
    assert status_text({"status": "exited", "exit_code": None}, 120) == "Exited (?)"


def test_where_overlayfs_cannot_be_mounted_the_copy_keeps_links_and_modes(tmp_path):
    from containers.rootfs import copy_lower, mount_overlay
    lower = tmp_path / "low:er"  # overlayfs options cannot name it
    (lower / "bin").mkdir(parents=True)
    (lower / "bin" / "tool").write_text("#!/bin/sh\n")
    (lower / "bin" / "tool").chmod(0o755)
    (lower / "sbin").symlink_to("bin")
    why = mount_overlay([lower], tmp_path / "upper", tmp_path / "work", tmp_path / "rootfs")
    assert why is not None and "low:er" in why
    target = tmp_path / "copy"
    target.mkdir()
    copy_lower(lower, target)
    assert (target / "bin" / "tool").stat().st_mode & 0o777 == 0o755
    assert (target / "sbin").is_symlink() and str((target / "sbin").readlink()) == "bin"
    (target / "bin" / "tool").write_text("changed")
    assert (lower / "bin" / "tool").read_text() == "#!/bin/sh\n"
