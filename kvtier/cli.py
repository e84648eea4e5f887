"""The ``kvtier`` command.

    kvtier serve [--config FILE]        run the daemon (foreground; systemd runs this)
    kvtier stats [--json]               tiers, capacity, hit rates, namespaces
    kvtier put NAMESPACE KEY FILE       store a file as one block (debugging)
    kvtier get NAMESPACE KEY FILE       fetch one block into a file (debugging)
    kvtier check [--config F] [--repair] verify NVMe block files, remove bad ones on request
    kvtier config check FILE            validate a configuration file
    kvtier token                        a new bearer token and its tenants-file line
    kvtier prewarm PLAN [--promote]     compute customers' contexts through vLLM, report coverage

KEY is 32 or 64 hex digits (a 16- or 32-byte key), or ``name:TEXT`` to use
the first 16 bytes of SHA-256(TEXT). Every client command takes --address
(default: $KVTIER_ADDRESS or the default socket). Exit codes: 0 ok, 1 not
found, 2 bad usage or input, 3 daemon unreachable, 4 other daemon error;
prewarm: 3 also when vLLM is unreachable, 5 coverage under the threshold; 141 (quietly)
when standard output is closed early (``kvtier stats | head``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys

from . import __version__, errors
from .config import FILE_SETTINGS, arena_room_problem, default_address, format_size, load, locate

EXIT_OK, EXIT_MISSING, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_ERROR = 0, 1, 2, 3, 4
EXIT_COVERAGE = 5  # prewarm: a customer's coverage is under the threshold
EXIT_NOTHING = 6  # prewarm: the plan has contexts and none is stored or resident
EXIT_PIPE = 141  # stdout closed early, as a shell reports a process ended by SIGPIPE


def parse_key(text: str) -> bytes:
    if text.startswith("name:"):
        return hashlib.sha256(text[5:].encode()).digest()[:16]
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"key {text!r} is not hex (or use name:TEXT)") from None
    if len(key) not in (16, 32):
        raise argparse.ArgumentTypeError(f"key must be 16 or 32 bytes (32 or 64 hex digits), got {len(key)} bytes")
    return key


def _setup_logging(level: str) -> None:
    from .logs import setup
    setup(level)


def cmd_serve(a) -> int:
    from .server import run
    cfg = load(a.config)
    room = arena_room_problem(cfg)
    if room:  # refused before anything is created: such an arena fills RAM and gets killed, or fails to map
        line = locate(a.config, room) if a.config else None
        raise errors.ConfigError(f"{a.config}:{line}: {room}" if line else room)
    _setup_logging(cfg.server.log_level)
    try:
        run(cfg, a.config)
    except OSError as e:
        setting = _setting_of(cfg, e.filename)
        if setting is None:
            raise
        name, path = setting
        print(f"error: {name}: cannot use {path}: {e.strerror} ({e.filename})", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _setting_of(cfg, filename) -> tuple[str, str] | None:
    """The setting whose path a failed file operation was on: that path, a file inside it (an
    NVMe directory's files, the arena's .lock and .slots) or a directory above it."""
    if not isinstance(filename, str) or not filename:
        return None
    f = filename.rstrip("/")
    paths = [("ram.arena_path", cfg.arena_path), ("server.socket", cfg.socket_path),
             *(("nvme.dirs", d) for d in cfg.nvme.dirs)]
    for name, path in paths:
        path = path.rstrip("/")
        if f == path or f.startswith(path + ".") or f.startswith(path + "/") or path.startswith(f + "/"):
            return name, path
    return None


def start_problems(cfg) -> list[str]:
    """What ``serve`` would fail on at start that the configuration's syntax cannot show: each file
    it names that cannot be read now, a tenants file that does not parse, and an arena that does
    not fit where it would live."""
    from .auth import Tenants
    out = []
    for section, key in FILE_SETTINGS:
        name, path = f"{section}.{key}", getattr(getattr(cfg, section), key)
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                out.append(f"{name}: cannot read {path}: {e.strerror}")
    if cfg.auth.tenants_file and not any(p.startswith("auth.") for p in out):
        try:
            Tenants.load(cfg.auth.tenants_file)
        except errors.ConfigError as e:
            out.append(f"auth.tenants_file: {e}")
    for d in cfg.nvme.dirs:
        probe = os.path.abspath(d)
        while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            out.append(f"nvme.dirs: {d} is not a directory" if probe == os.path.abspath(d) else
                       f"nvme.dirs: {d} cannot be created: {probe} is not a directory")
    out += dir_problems(cfg)
    room = arena_room_problem(cfg)
    if room:
        out.append(room)
    return out


def dir_problems(cfg) -> list[str]:
    """What serve's own checks of the arena's and the socket's directories would refuse, for the
    ones that exist now (a missing one serve creates): a per-user default must be a directory of
    this user's that no one else may write, a configured one not writable by everyone without the
    sticky bit; a symbolic link or something other than a file at the arena's path is refused too
    (who should own a configured directory's files depends on the user that runs serve: not checked)."""
    from .arena import dir_problem
    out = []
    for name, path, private, what in (
            ("ram.arena_path", os.path.dirname(cfg.arena_path), not cfg.ram.arena_path, "arena directory"),
            ("server.socket", os.path.dirname(os.path.abspath(cfg.socket_path)), not cfg.server.socket,
             "socket directory")):
        if os.path.lexists(path):
            try:
                problem = dir_problem(path, private, what)
            except OSError as e:  # a dangling link to a configured directory
                problem = f"{what} {path} cannot be used: {e.strerror}"
            if problem:
                out.append(f"{name}: {problem}")
    try:
        st = os.lstat(cfg.arena_path)
    except OSError:
        return out
    if stat.S_ISLNK(st.st_mode):
        out.append(f"ram.arena_path: {cfg.arena_path} is a symbolic link, which the daemon does not follow; "
                   f"remove it (rm {cfg.arena_path}) or set ram.arena_path to the file itself")
    elif not stat.S_ISREG(st.st_mode):
        out.append(f"ram.arena_path: {cfg.arena_path} is not a regular file; remove it or choose another path")
    return out


def start_warnings(cfg) -> list[str]:
    """What ``serve`` would start with but not as the docs describe: an arena outside tmpfs and
    hugetlbfs (e.g. a hugetlbfs not mounted where ram.arena_path expects it) is an ordinary file
    on whatever filesystem holds the path; an NVMe directory that does not exist yet is created
    by the daemon only where it may write (not under kvtier.service's ProtectSystem=strict); one
    under a mount point of /etc/fstab that is not mounted is skipped by the daemon."""

    from .arena import _mount_of
    out = []
    fstype, _ = _mount_of(os.path.dirname(cfg.arena_path) or ".")
    if fstype not in ("tmpfs", "hugetlbfs"):
        out.append(f"ram.arena_path: {cfg.arena_path} is on {fstype or 'an unknown filesystem'}, not tmpfs or "
                   f"hugetlbfs: the arena would be an ordinary file there (is the filesystem meant for it mounted?)")
    from .cold import unmounted_mount_point
    for d in cfg.nvme.dirs:
        unmounted = unmounted_mount_point(d)
        if unmounted:
            out.append(f"nvme.dirs: {d} is on {unmounted}, which /etc/fstab mounts but is not mounted now: "
                       f"the daemon would run without it (mount it first)")
        elif not os.path.isdir(d):
            out.append(f"nvme.dirs: {d} does not exist; under kvtier.service create it owned by kvtier "
                       f"(install -d -o kvtier -g kvtier {d}) and list it in ReadWritePaths")
    return out


def cmd_config_check(a) -> int:
    cfg = load(a.file)

    def where(m: str) -> str:
        line = locate(a.file, m)
        return f"{a.file}:{line}" if line else str(a.file)
    missing = start_problems(cfg)
    if missing:
        for m in missing:
            print(f"config error: {where(m)}: {m}", file=sys.stderr)
        return EXIT_USAGE
    for w in start_warnings(cfg):
        print(f"warning: {where(w)}: {w}", file=sys.stderr)
    print(f"{a.file}: ok (socket {cfg.socket_path}, arena {cfg.arena_path}, "
          f"{format_size(cfg.ram.capacity) if cfg.ram.capacity else 'auto-sized'} RAM, policy {cfg.ram.policy})")
    return EXIT_OK


def cmd_check(a) -> int:
    from .cold import check_dir
    dirs = list(a.dir or [])
    if a.config or not dirs:
        dirs += list(load(a.config).nvme.dirs)
    if not dirs:
        print(f"no NVMe directories in {a.config} ([nvme] dirs is empty): nothing to check; or give --dir DIR"
              if a.config else "no NVMe directories: give --config FILE (with [nvme] dirs) or --dir DIR",
              file=sys.stderr)
        return EXIT_USAGE
    absent = [d for d in dirs if not os.path.isdir(d)]
    if absent:
        for d in absent:
            print(f"{d}: no such directory", file=sys.stderr)
        return EXIT_USAGE
    bad = 0
    for d in dirs:
        rep = check_dir(d, repair=a.repair)
        print(f"{d}: {rep.files} block files, {rep.ok} ok ({format_size(rep.bytes)}), {len(rep.corrupt)} corrupt, "
              f"{len(rep.orphans)} orphan temp files" + (f", {rep.removed} removed" if a.repair else ""))
        for p, why in rep.corrupt:
            print(f"  corrupt: {p}: {why}")
        if rep.other_version:  # another kvtier's (a rollback): kept, even by --repair
            print(f"  {len(rep.other_version)} file(s) of another kvtier version, left alone "
                  f"({rep.other_version[0][1]}): a version that reads them serves them; remove them by hand "
                  f"if none will run here again")
        bad += len(rep.corrupt) + len(rep.orphans)
    if bad and not a.repair:
        print("run with --repair to remove them (the daemon treats them as misses meanwhile)")
    return EXIT_OK if (not bad or a.repair) else EXIT_MISSING


def cmd_token(a) -> int:
    from .auth import new_token
    tok, digest = new_token()
    print(f"token (give it to the client; KVTIER_TOKEN or --token): {tok}")
    print(f'tenants file line: token_sha256 = ["{digest}"]')
    return EXIT_OK


def _client(a):
    from .client import TLS, Client
    tls = TLS(a.tls_ca, a.tls_cert, a.tls_key) if getattr(a, "tls_ca", None) else None
    return Client(a.address, token=getattr(a, "token", None), tls=tls)


def stats_dict(s) -> dict:
    """The StatsResponse as JSON-ready data, 64-bit counters as numbers (proto's JSON mapping
    writes them as strings, which `jq` then compares as text)."""
    from google.protobuf.json_format import MessageToDict
    d = MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _numbers(s.DESCRIPTOR, d)
    return d


def _numbers(desc, d: dict) -> None:
    from google.protobuf.descriptor import FieldDescriptor as F
    wide = (F.CPPTYPE_INT64, F.CPPTYPE_UINT64)
    for f in desc.fields:
        if f.name not in d:
            continue
        v = d[f.name]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            val = f.message_type.fields_by_name["value"]
            for k in v:
                if val.message_type is not None:
                    _numbers(val.message_type, v[k])
                elif val.cpp_type in wide:
                    v[k] = int(v[k])
        elif f.message_type is not None:
            for x in (v if isinstance(v, list) else [v]):
                _numbers(f.message_type, x)
        elif f.cpp_type in wide:
            d[f.name] = [int(x) for x in v] if isinstance(v, list) else int(v)


def _tokens(n: int) -> str:
    """Prefill tokens saved, short: 950, 12.3K, 4.5M, 7.8G ("-" when the clients never said)."""
    if not n:
        return "-"
    for unit in ("", "K", "M", "G"):
        if n < 1000 or unit == "G":
            return f"{n}" if not unit else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def cmd_stats(a) -> int:
    with _client(a) as c:
        s = c.stats(a.namespace or "")
    if a.json:
        print(json.dumps(stats_dict(s), indent=2))
        return EXIT_OK
    ram = next((t for t in s.tiers if t.name == "ram"), None)
    pages = f" ({ram.backing}, {'2 MiB' if ram.huge_pages else '4 KiB'} pages)" if ram is not None else ""
    print(f"kvtier {s.version}  up {s.uptime_s:.0f}s  arena {s.arena_path}{pages}  "
          f"leases {s.leases}  reservations {s.reservations}")
    print()
    print(f"{'tier':<8}{'policy':<8}{'blocks':>10}{'used':>12}{'capacity':>12}{'use%':>7}"
          f"{'evictions':>11}{'pinned':>8}{'leased':>8}  locked")
    for t in s.tiers:
        # capacity: the cluster tier's is the server's own (none here); locked: only RAM is locked
        cap, pct = ((format_size(t.capacity_bytes), f"{100 * t.used_bytes / t.capacity_bytes:.1f}%")
                    if t.capacity_bytes else ("-", "-"))
        locked = "-" if t.name != "ram" else "yes" if t.locked else f"no ({t.lock_detail})" if t.lock_detail else "no"
        # the cluster tier's blocks and bytes are the server's (not counted here)
        blocks, used = (("-", "-") if t.name == "cluster" and not t.blocks
                        else (t.blocks, format_size(t.used_bytes)))
        print(f"{t.name:<8}{t.policy:<8}{blocks:>10}{used:>12}{cap:>12}"
              f"{pct:>7}{t.evictions:>11}{t.pinned_blocks:>8}{t.leased_blocks:>8}  {locked}")
    for t in s.tiers:
        if t.degraded and t.name == "nvme":
            print(f"nvme: skipping {', '.join(t.degraded)} after ENOSPC or I/O errors (tried again every nvme.retry_s)")
        elif t.degraded:
            print(f"{t.name}: {', '.join(t.degraded)} (its blocks are misses until it is back)")
    print()
    if not s.namespaces:
        print("no namespaces yet")
        return EXIT_OK
    print(f"{'namespace':<24}{'blocks':>10}{'bytes':>12}{'hits':>10}{'misses':>10}{'hit%':>7}"
          f"{'puts':>10}{'evictions':>11}{'prefill saved':>15}")
    for n in sorted(s.namespaces, key=lambda n: -n.bytes):
        total = n.hits + n.misses
        hr = f"{100 * n.hits / total:.1f}%" if total else "-"
        print(f"{n.name:<24}{n.blocks:>10}{format_size(n.bytes):>12}{n.hits:>10}{n.misses:>10}{hr:>7}"
              f"{n.puts:>10}{n.evictions:>11}{_tokens(n.prefill_tokens_saved):>15}")
    return EXIT_OK


def cmd_put(a) -> int:
    with open(a.file, "rb") as f:
        data = f.read()
    if not data:
        print(f"{a.file} is empty; blocks hold at least one byte", file=sys.stderr)
        return EXIT_USAGE
    with _client(a) as c:
        stored = c.put(a.namespace, a.key, data, overwrite=a.overwrite)
        print(f"{'stored' if stored else 'already present'}: {a.namespace}/{a.key.hex()} "
              f"({len(data)} bytes, via {c.path})")
    return EXIT_OK


def cmd_get(a) -> int:
    with _client(a) as c:
        data = c.get(a.namespace, a.key)
    if data is None:
        print(f"not found: {a.namespace}/{a.key.hex()}", file=sys.stderr)
        return EXIT_MISSING
    if a.file == "-":
        sys.stdout.buffer.write(data)
    else:
        with open(a.file, "wb") as f:
            f.write(data)
        print(f"wrote {len(data)} bytes to {a.file}", file=sys.stderr)
    return EXIT_OK


def cmd_prewarm(a) -> int:
    import dataclasses
    import signal
    import threading

    from .prewarm import load as load_plan, run_plan
    from .prewarm.run import Permanent, Transient
    from .prewarm.state import Busy, State
    plan = load_plan(a.plan)
    if a.address:
        plan = dataclasses.replace(plan, address=a.address)
    if a.state:
        plan = dataclasses.replace(plan, state=a.state)
    if a.check:  # the plan, and every context's sources: a missing file would fail its context every night
        from .prewarm.plan import load_context
        from .prewarm.promote import check_budget
        if a.promote or a.promote_only:
            check_budget(plan)
        elif not plan.ram_budget:
            print(f"{a.plan}: promote.ram_budget is not set: a run with --promote (as kvtier-prewarm.service "
                  f"starts it) will refuse to start", file=sys.stderr)
        bad = 0
        problem = State(plan.state).check_writable()
        if problem:
            print(f"{a.plan}: run.state: {problem}", file=sys.stderr)
            bad += 1
        for t in plan.tenants:
            for c in t.contexts:
                try:
                    load_context(c)
                except (OSError, ValueError) as e:
                    print(f"{a.plan}: context {c.id}: {e}", file=sys.stderr)
                    bad += 1
        n = sum(len(t.contexts) for t in plan.tenants)
        if bad:
            unread = bad - bool(problem)
            if unread:
                print(f"{a.plan}: {unread} of {n} contexts cannot be read", file=sys.stderr)
            return EXIT_USAGE
        print(f"{a.plan}: ok ({len(plan.tenants)} customers, {n} contexts, vLLM {plan.url}, state {plan.state})")
        return EXIT_OK

    def stop(signum, frame):  # systemd stops with SIGTERM: save the state, end requests cleanly
        raise KeyboardInterrupt
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        rep = run_plan(plan, promote=True if a.promote else None, promote_only=a.promote_only, force=a.force,
                       min_coverage=a.min_coverage, min_ram_coverage=a.min_ram_coverage,
                       progress_out=sys.stderr, tty=False if a.quiet else None)
    except (Transient, Permanent) as e:
        print(f"vLLM at {plan.url}: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except errors.Unavailable as e:  # --address is optional here: name the address the run used
        print(f"daemon unreachable at {plan.address or default_address()}: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Busy as e:
        print(f"{a.plan}: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
    if a.json:
        rep.write_json(sys.stdout)
    else:
        rep.write_table(sys.stdout)
    if rep.nothing_prewarmed:  # whatever the thresholds: the timer's unit must not succeed
        return EXIT_NOTHING
    return EXIT_COVERAGE if rep.under_threshold() else EXIT_OK


def _fraction(text: str) -> float:
    try:
        v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction (0.95) or a percentage (95%)") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1 (0% and 100%)")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier", description="Tiered KV-cache store for LLM serving.",
                                epilog="Run 'kvtier COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"kvtier {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon in the foreground",
                       description="Run the kvtier daemon until SIGTERM/SIGINT. Without --config it runs on "
                                   "embedded defaults (configs/kvtier.toml documents every setting).")
    s.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file")
    s.set_defaults(fn=cmd_serve)

    def client_args(sp):
        sp.add_argument("--address", "-a", default=default_address(),
                        help="daemon address: unix:///path or host:port (default: %(default)s)")
        sp.add_argument("--token", help="bearer token when the daemon has tenants (default: $KVTIER_TOKEN)")
        sp.add_argument("--tls-ca", metavar="PEM", help="CA of the daemon's TLS certificate (TCP addresses)")
        sp.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
        sp.add_argument("--tls-key", metavar="PEM", help="key of --tls-cert")

    s = sub.add_parser("stats", help="show tiers, capacity and namespaces",
                       description="Show the daemon's tiers, capacity, hit rates and namespaces.")
    client_args(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--namespace", "-n", help="only this namespace")
    s.set_defaults(fn=cmd_stats)

    key_help = "32/64 hex digits, or name:TEXT (first 16 bytes of SHA-256 of TEXT)"
    s = sub.add_parser("put", help="store a file as one block", description="Store FILE as one block.")
    client_args(s)
    s.add_argument("namespace")
    s.add_argument("key", type=parse_key, help=key_help)
    s.add_argument("file", help="file to read")
    s.add_argument("--overwrite", action="store_true", help="replace the block if present")
    s.set_defaults(fn=cmd_put)

    s = sub.add_parser("get", help="fetch one block into a file", description="Fetch one block into FILE.")
    client_args(s)
    s.add_argument("namespace")
    s.add_argument("key", type=parse_key, help=key_help)
    s.add_argument("file", help="file to write, or - for standard output")
    s.set_defaults(fn=cmd_get)

    s = sub.add_parser("check", help="verify NVMe block files",
                       description="Read every block file of the NVMe directories and verify its header and "
                                   "checksum. Exit 0 when all are sound (or were repaired), 1 when some are not.")
    s.add_argument("--config", "-c", metavar="FILE", help="take the directories from this configuration")
    s.add_argument("--dir", action="append", metavar="DIR", help="a directory to check (repeatable)")
    s.add_argument("--repair", action="store_true", help="remove corrupt files and orphan temp files")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("token", help="make a new bearer token for the tenants file",
                       description="Print a new random token and the token_sha256 line for the tenants file.")
    s.set_defaults(fn=cmd_token)

    s = sub.add_parser("config", help="configuration tools", description="Configuration tools.")
    csub = s.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    c = csub.add_parser("check", help="validate a configuration file",
                        description="Validate FILE: unknown keys, wrong types and bad values are errors.")
    c.add_argument("file")
    c.set_defaults(fn=cmd_config_check)

    s = sub.add_parser("prewarm", help="compute customers' contexts through vLLM and report coverage",
                       description="Send each context of PLAN through vLLM (with the kvtier connector) so its KV "
                                   "is stored, skip contexts still resident, optionally promote them into RAM, "
                                   "and report coverage per customer (docs/prewarm.md). Exit 5 when a "
                                   "customer's coverage is under the threshold, 6 when no context "
                                   "was prewarmed.")
    s.add_argument("plan", help="plan file (TOML; configs/prewarm.example.toml documents it)")
    s.add_argument("--promote", action="store_true", help="then bring the plan's chunks into RAM (promote.ram_budget)")
    s.add_argument("--promote-only", action="store_true", help="only the promote phase (sends nothing to vLLM)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--min-coverage", type=_fraction, metavar="F",
                   help="exit 5 if a customer's coverage in any tier is under F (0.95 or 95%%)")
    s.add_argument("--min-ram-coverage", type=_fraction, metavar="F",
                   help="exit 5 if a customer's coverage in RAM is under F")
    s.add_argument("--address", "-a", help="daemon address (default: the plan's, else $KVTIER_ADDRESS or the "
                                           "default socket)")
    s.add_argument("--state", metavar="FILE", help="state file (default: the plan's run.state)")
    s.add_argument("--quiet", "-q", action="store_true", help="a line per context instead of a progress bar")
    s.add_argument("--force", action="store_true",
                   help="send every context, also those still resident (after changing the engine: model "
                        "revision, dtype, chunk size, TP/PP)")
    s.add_argument("--check", action="store_true",
                   help="only validate the plan and read every context's sources (sends nothing)")
    s.set_defaults(fn=cmd_prewarm)
    return p


def _unreachable_hint(args, message: str) -> str:
    """What to try: no socket at a Unix address means no daemon there (or another address);
    a TCP listener of the daemon speaks TLS (server.tls_cert), perhaps asking for a client
    certificate (server.tls_client_ca): a client without them sees its connection closed."""
    address = getattr(args, "address", None) or ""
    if "permission denied" in message.lower():
        return (" (the daemon's sockets are for its user and group: run as a member of group kvtier "
                "under kvtier.service, or of the daemon's user's group)")
    if address.startswith("unix:"):
        return (" (is `kvtier serve` running? Give its server.socket as --address unix://PATH or in "
                "$KVTIER_ADDRESS)" if "No such file" in message else "")
    low = message.lower()
    if "refused" in low or "dns" in low or "name resolution" in low or "resolve" in low:
        return ""
    if not getattr(args, "tls_ca", None):
        return " (if the daemon's TCP listener has TLS, give --tls-ca PEM)"
    if not getattr(args, "tls_cert", None):
        return " (if the daemon asks for client certificates, give --tls-cert PEM and --tls-key PEM)"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except errors.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except errors.Unavailable as e:
        print(f"daemon unreachable at {getattr(args, 'address', '?')}: {e}{_unreachable_hint(args, str(e))}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except errors.Unauthenticated as e:
        hint = "" if getattr(args, "token", None) or os.environ.get("KVTIER_TOKEN") else \
            " (the daemon has tenants: give --token TOKEN or set $KVTIER_TOKEN; `kvtier token` makes one)"
        print(f"error ({e.code.name}): {e}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except (errors.InvalidArgument, errors.BadNamespace) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except errors.KvtierError as e:
        print(f"error ({e.code.name}): {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # the reader went away (kvtier stats | head): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit's flush
        return EXIT_PIPE
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
