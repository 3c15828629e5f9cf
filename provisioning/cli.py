"""``lepton provision ...``: fleet identities, certificates, broker config, bundles.

Thin: parses, calls lepton.provisioning.fleet, prints. Errors are
LeptonError subclasses and become one line in lepton.cli.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from lepton.errors import LeptonError
from lepton.protocol import DEFAULT_PREFIX

FLEET_ENV = "LEPTON_FLEET"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lepton provision`` and its subcommands."""
    p = subparsers.add_parser(
        "provision",
        help="create a fleet: CA, device certificates, broker config and ACL, install bundles",
        description="Provision a fleet: a CA, one certificate per device (CN = device id), a Mosquitto "
        "config whose ACL lets each device write only under its own id, and a bundle per device "
        "(key, certificate, CA, agent config, install.sh, systemd unit). Commands are idempotent.",
    )
    sub = p.add_subparsers(dest="provision_command", metavar="COMMAND", required=True)
    _init_parser(sub)
    _device_parser(sub)
    _bulk_parser(sub)
    r = _simple(sub, "revoke", "ID", _revoke, "revoke an identity: its certificates go on the CRL, the ACL denies it "
                "everything, its key and bundle are deleted; then reload the broker (SIGHUP). With --superseded, "
                "only the certificates a --rotate replaced (the coordinator's too); the identity stays valid")
    r.add_argument("--superseded", action="store_true",
                   help="revoke every certificate of ID but its current one, after --rotate and installing the new "
                   "bundle: the old key is refused from then on; then restart the broker")
    c = sub.add_parser("coordinator", help="rewrite the coordinator's config and bundle from fleet.toml; --rotate "
                       "renews its key and certificate",
                       description="Rewrite identities/<coordinator>/coordinator.toml and bundles/<coordinator>.tar.gz "
                       "from fleet.toml (after editing broker, http or models settings there); --rotate also issues "
                       "a new key and certificate. Install the new bundle on the coordinator host.")
    _fleet_arg(c)
    c.add_argument("--rotate", action="store_true", help="issue a new key and certificate")
    c.add_argument("--json", action="store_true", help="print what was done as JSON")
    c.set_defaults(func=_guarded(_coordinator))
    o = _simple(sub, "observer", "NAME", _observer, "issue a read-only identity (reads everything under the prefix, "
                "writes nothing) for dashboards and mosquitto_sub checks")
    o.add_argument("--rotate", action="store_true", help="issue a new key and certificate (also re-admits a revoked "
                   "observer)")
    a = sub.add_parser("apply", help="rewrite every config and bundle and the broker files from fleet.toml, after "
                       "editing it",
                       description="After an edit of fleet.toml (the broker's host, names or port, [models], [http]) "
                       "or of templates/: rewrite every device's agent config and bundle (revoked ones aside), the "
                       "coordinator's, and the broker files. Keys and certificates are kept; files that would not "
                       "change are not touched. Then install the bundles that changed and copy the broker files.")
    _fleet_arg(a)
    a.add_argument("--json", action="store_true", help="print what was done as JSON")
    a.set_defaults(func=_guarded(_apply))
    b = sub.add_parser("broker-config", help="(re)write the broker's files: mosquitto.conf, acl, crl.pem, server key and certificate",
                       description="Write everything the broker host needs into the fleet's broker/ directory (or --out). "
                       "Paths inside mosquitto.conf point at broker.dir from fleet.toml, where the files go on the broker host.")
    _fleet_arg(b)
    b.add_argument("--out", type=Path, metavar="DIR", help="directory to write to (default: <fleet>/broker)")
    b.add_argument("--rotate", action="store_true", help="a new server key and certificate (cert_days from now) and "
                   "the CRL issued now (its next update crl_days ahead): renew both before `provision list` shows "
                   "them expiring, copy the files over and reload the broker")
    b.add_argument("--json", action="store_true", help="print what was written as JSON")
    b.set_defaults(func=_guarded(_broker_config))
    ls = sub.add_parser("list", help="list the fleet's identities: role, tags, certificate expiry, revoked",
                        description="List every identity in the fleet (devices, the coordinator, observers) with "
                        "its role, tags, certificate expiry and whether it is revoked, then the CA, the broker's "
                        "server certificate and the CRL (role crl; its expiry is its next update), which expire too. "
                        f"Anything that expires within {RENEW_DAYS} days is marked RENEW.")
    _fleet_arg(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_guarded(_list))


RENEW_DAYS = 60  # `provision list` marks what expires sooner


def _guarded(func):
    """A file system error (unwritable directory, full disk) becomes one clean line."""
    @functools.wraps(func)
    def run(args) -> int:
        try:
            return func(args)
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise LeptonError(f"cannot write or read{where}: {exc.strerror or exc}") from None
    return run


def _fleet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet", type=Path, default=Path(os.environ.get(FLEET_ENV, ".")), metavar="DIR",
                   help=f"fleet directory (default: ${FLEET_ENV} or the current directory)")


def _init_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a fleet directory: CA, broker certificate, coordinator identity, model-signing key",
                       description="Create a fleet in DIR. Re-running with the same options changes nothing.")
    p.add_argument("dir", type=Path, metavar="DIR", help="the fleet directory (created if missing)")
    p.add_argument("--host", action="append", required=True, metavar="NAME_OR_IP",
                   help="broker host name or IP address; repeat for more. Devices connect to the first; "
                   "the server certificate names all")
    p.add_argument("--name", help="fleet name (CA name, comments)")
    p.add_argument("--prefix", help=f"MQTT topic prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--port", type=int, help="broker TLS port (default 8883)")
    p.add_argument("--bind", help="address the broker's TLS listener binds (default: all)")
    p.add_argument("--coordinator", metavar="ID", help="the coordinator's certificate CN (default lepton-coordinator)")
    p.add_argument("--broker-dir", dest="dir_", metavar="PATH",
                   help="where the broker's files will live on the broker host (default: <DIR>/broker)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=_guarded(_init))


def _device_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("device", help="issue (or keep) a device's key, certificate, agent config and bundle",
                       description="Issue a device identity: key (0600), certificate (CN = ID), agent config from "
                       "templates/agent.toml plus templates/tag-<tag>.toml per tag, and bundles/ID.tar.gz.")
    p.add_argument("id", metavar="ID", help="device id: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit "
                   "(no '/', '+', '#')")
    _fleet_arg(p)
    p.add_argument("--tags", help="comma-separated tags (replace the device's tags; default: keep them)")
    p.add_argument("--rotate", action="store_true", help="issue a new key and certificate (also re-admits a revoked id)")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.set_defaults(func=_guarded(_device))


def _bulk_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bulk", help="provision every device in an inventory CSV (header with 'id', optional 'tags')",
                       description="Provision many devices. The CSV needs a header row with an 'id' column and may "
                       "have 'tags' (separated by ';' or spaces); other columns are ignored. Idempotent: a re-run "
                       "changes no file; --rotate renews every key and certificate.")
    p.add_argument("inventory", type=Path, metavar="INVENTORY.csv")
    _fleet_arg(p)
    p.add_argument("--rotate", action="store_true", help="issue new keys and certificates for every listed device")
    p.add_argument("--json", action="store_true", help="print what was done as JSON (no progress bar)")
    p.set_defaults(func=_guarded(_bulk))


def _simple(sub, name, metavar, func, help_text):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("name", metavar=metavar)
    _fleet_arg(p)
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.set_defaults(func=_guarded(func))
    return p


# --- handlers ---------------------------------------------------------------------


def _report(args, outcomes) -> int:
    if args.json:
        print(json.dumps([o.to_json() for o in outcomes], indent=2))
    else:
        for o in outcomes:
            print(f"{o.name}: {o.action}" + (f" ({len(o.written)} files written)" if o.written else ""))
    _warn(outcomes)
    return 0


def _warn(outcomes) -> None:
    """Each warning once on stderr, with how many devices it concerns."""
    devices: dict[str, list[str]] = {}
    for o in outcomes:
        for text in getattr(o, "warnings", []):
            devices.setdefault(text, []).append(o.name)
    for text, names in devices.items():
        who = names[0] if len(names) == 1 else f"{len(names)} devices ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        print(f"lepton provision: warning: {who}: {text}", file=sys.stderr)


def _init(args) -> int:
    from lepton.provisioning.fleet import Fleet
    from lepton.provisioning.settings import new_settings

    opts = {"name": args.name, "prefix": args.prefix, "port": args.port, "bind": args.bind,
            "coordinator": args.coordinator, "dir": args.dir_}
    fleet, outcome = Fleet.create(args.dir, new_settings(args.dir, args.host, **opts))
    rc = _report(args, [outcome])
    if not args.json:
        print(f"fleet {fleet.settings.name} in {fleet.root}; broker files in {fleet.layout.broker_dir}, "
              f"coordinator bundle {fleet.layout.bundle(fleet.settings.coordinator)}")
    return rc


def _device(args) -> int:
    from lepton.provisioning.fleet import Fleet

    tags = None if args.tags is None else [t for t in args.tags.split(",")]
    fleet = Fleet(args.fleet)
    outcome = fleet.add_device(args.id, tags=tags, rotate=args.rotate)
    rc = _report(args, [outcome])
    if not args.json:
        _broker_hint(fleet, outcome.written)
    return rc


def _copy_to_broker(files, src, dest) -> str:
    """"copy FILES to DEST on the broker host and" (nothing to copy where the broker reads them in place)."""
    same = Path(src).resolve() == Path(dest).resolve()
    return "" if same else f"copy {files} to {dest} on the broker host and "


def _broker_hint(fleet, written) -> None:
    """Say so when the broker's files changed (a new device raises the queue limit; a re-admitted one
    leaves the ACL's deny list)."""
    home = fleet.layout.broker_dir
    if any(Path(p).parent == home for p in written):
        print(f"broker files updated in {home}; {_copy_to_broker('them', home, fleet.settings.broker.dir)}"
              "reload the broker (restart it if the port or bind address changed: a reload keeps the old listener)")


def _apply(args) -> int:
    from lepton.provisioning.fleet import Fleet

    fleet = Fleet(args.fleet)
    outcomes = fleet.apply()
    if args.json:
        return _report(args, outcomes)
    changed = [o for o in outcomes if o.name != "broker" and o.action != "unchanged"]
    print(f"{len(outcomes) - 1} identities: {len(changed)} updated"
          + (f" ({', '.join(o.name for o in changed[:8])}{', ...' if len(changed) > 8 else ''})" if changed else ""))
    _warn(outcomes)
    if changed:
        print(f"install the new bundles from {fleet.layout.bundles_dir} on those hosts")
    _broker_hint(fleet, outcomes[-1].written)
    return 0


def _bulk(args) -> int:
    from lepton.provisioning.fleet import Fleet
    from lepton.provisioning.inventory import read_inventory

    rows = read_inventory(args.inventory)
    fleet = Fleet(args.fleet)
    fleet.check_rows(rows)  # before the progress bar: a bad row is one clean error line
    if args.json:
        return _report(args, fleet.add_devices(rows, rotate=args.rotate))
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task("provisioning", total=len(rows))
        outcomes = fleet.add_devices(rows, rotate=args.rotate, progress=lambda _o: bar.advance(task))
    counts: dict[str, int] = {}
    for o in outcomes:
        if o.name != "broker":
            counts[o.action] = counts.get(o.action, 0) + 1
    print(f"{len(rows)} devices: " + ", ".join(f"{n} {action}" for action, n in sorted(counts.items())))
    _warn(outcomes)
    if any(o.name == "broker" for o in outcomes):
        print(f"broker files updated in {fleet.layout.broker_dir}; copy them to the broker host and reload it")
    return 0


def _revoke(args) -> int:
    from lepton.provisioning.fleet import Fleet

    fleet = Fleet(args.fleet)
    outcome = fleet.revoke(args.name, superseded=args.superseded)
    rc = _report(args, [outcome])
    if args.json or outcome.action == "unchanged":
        return rc
    if args.superseded:
        # A connection made with an old certificate has the same name as the current one: no ACL line can cut it.
        print(f"now {_copy_to_broker(f'{fleet.layout.broker_dir}/crl.pem', fleet.layout.broker_dir, fleet.settings.broker.dir)}"
              "restart the broker (systemctl restart mosquitto): a reload refuses the old certificates from then on, "
              "a restart also ends connections made with them")
    else:
        print(f"now {_copy_to_broker(f'{fleet.layout.broker_dir}/crl.pem and acl', fleet.layout.broker_dir, fleet.settings.broker.dir)}"
              "reload the broker (systemctl reload mosquitto, or kill -HUP its pid)")
    return rc


def _coordinator(args) -> int:
    from lepton.provisioning.fleet import Fleet

    fleet = Fleet(args.fleet)
    outcome = fleet.update_coordinator(rotate=args.rotate)
    rc = _report(args, [outcome])
    if outcome.written and not args.json:
        print(f"install the new {fleet.layout.bundle(fleet.settings.coordinator)} on the coordinator host")
    return rc


def _observer(args) -> int:
    from lepton.provisioning.fleet import Fleet

    fleet = Fleet(args.fleet)
    outcome = fleet.add_observer(args.name, rotate=args.rotate)
    rc = _report(args, [outcome])
    if not args.json:
        _broker_hint(fleet, outcome.written)
        print(f"key {fleet.layout.key(args.name)}, certificate {fleet.layout.cert(args.name)}, CA {fleet.layout.ca_cert}")
    return rc


def _broker_config(args) -> int:
    from lepton.provisioning.fleet import Fleet, Outcome

    fleet = Fleet(args.fleet)
    with fleet.layout.locked():
        written = fleet.write_broker_files(args.out, rotate=args.rotate)
    rc = _report(args, [Outcome("broker", ("rotated" if args.rotate else "updated") if written else "unchanged",
                                written)])
    if written and not args.json:
        out = args.out or fleet.layout.broker_dir
        print(f"{_copy_to_broker(out, out, fleet.settings.broker.dir)}"
              "reload the broker (SIGHUP: it reads the new certificate and CRL; restart it if the port or bind "
              "address changed)")
    return rc


def _list(args) -> int:
    from lepton.provisioning.fleet import Fleet

    import datetime as dt

    rows = Fleet(args.fleet).describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    now = dt.datetime.now(dt.timezone.utc)
    for r in rows:
        until = "next update by" if r["role"] == "crl" else "valid until"
        state = "REVOKED" if r["revoked"] else f"{until} {r['not_after'] or '?'}"
        if not r["revoked"] and r["not_after"]:
            left = (dt.datetime.fromisoformat(r["not_after"]) - now).days
            if left < RENEW_DAYS:
                state += f"  RENEW: {'expired' if left < 0 else f'{left} days left'}"
        tags = f" [{', '.join(r['tags'])}]" if r["tags"] else ""
        print(f"{r['name']:<32} {r['role']:<12} {state}{tags}")
    return 0
