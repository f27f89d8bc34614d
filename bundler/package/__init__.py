"""Stage 3, the bundle: the manifest, the tarball and its other forms (overlay, .deb, Buildroot,
Yocto), the systemd unit, and verification before anything ships."""
