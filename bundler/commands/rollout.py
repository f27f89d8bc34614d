"""`tvmbundle rollout BUNDLE --inventory FLEET.toml`: a bundle to a fleet in waves."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from rich.table import Table

from bundler.commands import common
from bundler.errors import EXIT_OK, EXIT_USER


def register(subparsers) -> None:
    s = subparsers.add_parser("rollout", help="deploy a bundle to a fleet in waves, stopping and rolling back on failures")
    s.add_argument("bundle")
    s.add_argument("--inventory", required=True, metavar="FILE", help="fleet inventory (TOML, format = 1)")
    s.add_argument("--group", help="only hosts in this group")
    s.add_argument("--canary", type=int, default=1, help="hosts in the first wave (default 1)")
    s.add_argument("--batch", default="25%", help="hosts per later wave, a count or a share (default 25%%)")
    s.add_argument("--max-failures", default="10%", help="failures tolerated before stopping (default 10%%)")
    s.add_argument("--parallel", type=int, default=16, help="hosts deployed at once within a wave (default 16)")
    s.add_argument("--dry-run", action="store_true", help="show the waves and stop")
    s.add_argument("--report", metavar="FILE", help="write the JSON report here")
    s.add_argument("--identity", metavar="KEY_FILE")
    s.add_argument("--known-hosts", metavar="FILE")
    s.add_argument("--accept-new-host-key", action="store_true")
    s.add_argument("--sudo", action="store_true",
                   help="every host logs in as a user with passwordless sudo (or set sudo = true in the inventory)")
    s.add_argument("--health-timeout", type=float, default=30.0, metavar="S")
    s.add_argument("--step-timeout", type=float, default=60.0, metavar="S")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler.device import fleet

    hosts = fleet.load_inventory(Path(args.inventory))
    out = common.out()
    lock = threading.Lock()
    stop = threading.Event()

    def listener(hr: fleet.HostReport) -> None:
        if args.json or args.quiet:
            return
        with lock:
            detail = f" at {hr.step}: {hr.error}" if hr.error else (f" ({hr.step})" if hr.result == "running" else "")
            took = f" {hr.seconds:.1f} s" if hr.result not in ("running", "pending") else ""
            out.print(f"wave {hr.wave}  {hr.host:20s} {hr.result}{took}{detail}", markup=False)

    report = fleet.rollout(
        Path(args.bundle), hosts, group=args.group, canary=args.canary, batch=args.batch,
        max_failures=args.max_failures, parallel=args.parallel, dry_run=args.dry_run,
        identity=Path(args.identity) if args.identity else None,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
        accept_new_host_key=args.accept_new_host_key, sudo=args.sudo or None, health_timeout=args.health_timeout,
        step_timeout=args.step_timeout, report_path=Path(args.report) if args.report else None,
        listener=listener, stop=stop)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        table = Table("host", "wave", "result", "step", "time", "sent", "error", box=None, pad_edge=False)
        for hr in report.hosts:
            table.add_row(hr.host, str(hr.wave), hr.result, hr.step, f"{hr.seconds:.1f} s",
                          common.size(hr.uploaded_bytes), hr.error[:80])
        out.print(table)
        if args.dry_run:
            for i, wave in enumerate(report.waves):
                out.print(f"wave {i}: {', '.join(wave)}  -> {report.bundle_id[:12]}")
        elif report.completed:
            out.print(f"rollout of {report.bundle_id[:12]} completed on {len(report.hosts)} host(s)")
        else:
            out.print(f"rollout of {report.bundle_id[:12]} stopped: {report.stopped_reason}")
    return EXIT_OK if report.completed or args.dry_run else EXIT_USER
