"""`zmagic ui`: the web app's command.  Gradio is imported only when the command runs, so the
rest of the `zmagic` command works without the ``ui`` extra."""
from __future__ import annotations

import ipaddress
import sys

from zmagic_core.contracts.errors import InputError, ZmagicError

DEFAULT_PORT = 7860


def add_ui_parser(sub) -> None:
    """Register `zmagic ui` on the `zmagic` command's subparsers."""
    p = sub.add_parser("ui", help="the web app: build a recipe in a form, run it, compare combiners (needs the ui extra)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; the app has no login)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--out", default="outputs/ui", help="folder of the per-session output folders (default outputs/ui)")
    p.add_argument("--recipe", help="recipe file the form shows first (default: the shapes world's red-circle recipe)")
    p.set_defaults(func=cmd_ui)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_ui(args) -> int:
    try:
        from zmagic_core.app.ui import ZmagicApp
    except ImportError as exc:
        if "zmagic-core[ui]" in str(exc):
            raise ZmagicError(str(exc)) from None
        raise
    if not _is_loopback(args.host):
        print(f"zmagic ui: warning: serving on {args.host}: anyone who can reach it can run generations and read "
              "the files it writes (the app has no login)", file=sys.stderr)
    app = ZmagicApp(out_root=args.out, initial=args.recipe)
    print(f"zmagic ui: http://{args.host}:{args.port} (Ctrl-C to stop); runs go to {app.out_root}/<session>/")
    try:
        app.launch(host=args.host, port=args.port, block=True, quiet=True)
    except OSError as exc:
        raise InputError(f"cannot serve on {args.host}:{args.port}: {exc}") from None
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0
