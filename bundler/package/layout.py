"""Where a bundle lives on a device: the one place that names the paths and the unit.

Several bundles share a device (a detector and a recognizer, the common camera or OCR pipeline),
so each bundle name has its own releases, ``current`` link and service instance, while the
content-addressed store is shared (the runtime and the harness are the same files for every model
of a board: a second model sends its own files only)::

    PREFIX/store/sha256/<hex>                  every file, by content, shared by every bundle
    PREFIX/staging/                            uploads in progress
    PREFIX/bundles/NAME/releases/<id>/         NAME's releases (store files hard-linked)
    PREFIX/bundles/NAME/current -> releases/<id>
    tvmbundle@NAME.service                     NAME's unit: a whole instance unit file, rendered
                                               from the release's manifest (so a rollback brings back
                                               the unit of the release it returns to)

NAME is the manifest's ``name`` (the model's file name without ``.onnx``). The single-service
layout of tvmbundle 0.1 (``PREFIX/releases``, ``PREFIX/current``, ``tvmbundle.service``) is
read as the *legacy* layout: a deploy of the same name adopts it (bundler.device.release).

The device agent (bundler/build/harness_src/device.cc, struct Prefix) computes the same paths
from ``--prefix`` and ``--name``; the Ansible role and the Mender module call the agent.
"""

from __future__ import annotations

LEGACY_UNIT = "tvmbundle.service"
UNIT_DIR = "/etc/systemd/system"


def unit_name(name: str) -> str:
    """The systemd unit of bundle ``name``: an instance name, so `systemctl list-units 'tvmbundle@*'`
    lists every bundle of a device."""
    return f"tvmbundle@{name}.service"


def store_dir(prefix: str) -> str:
    """Every file of every release, by its SHA-256 (``store_dir(prefix)/<hex>``)."""
    return f"{prefix.rstrip('/')}/store/sha256"


def staging_dir(prefix: str) -> str:
    """Uploads in progress (``<sha256>.part``), and the manifest and unit of the release being installed."""
    return f"{prefix.rstrip('/')}/staging"


def bundle_dir(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/bundles/{name}"


def releases_dir(prefix: str, name: str) -> str:
    return f"{bundle_dir(prefix, name)}/releases"


def release_dir(prefix: str, name: str, bundle_id: str) -> str:
    return f"{releases_dir(prefix, name)}/{bundle_id}"


def current(prefix: str, name: str) -> str:
    """The ``current`` link; it points at ``releases/<id>`` (relative, so an image can be relocated)."""
    return f"{bundle_dir(prefix, name)}/current"


def current_target(bundle_id: str) -> str:
    return f"releases/{bundle_id}"


# The single-service layout of tvmbundle 0.1, which deploy reads and adopts.

def legacy_release_dir(prefix: str, bundle_id: str) -> str:
    return f"{prefix.rstrip('/')}/releases/{bundle_id}"


def legacy_current(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/current"
