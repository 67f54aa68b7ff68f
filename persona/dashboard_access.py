"""Who may reach the dashboard, and what every answer tells the browser.

- Bound anywhere but loopback it wants a token (``check_binding``).
- With no token, a request must name this machine (or the bound address) in its ``Host``
  header (DNS rebinding: a site whose name points at 127.0.0.1 is the browser's same
  origin, but its requests say its own name). A refusal says which names are accepted
  and how a reverse proxy gets through.
- Every answer forbids framing (a framed page's "retry all" click, which the page's own
  script makes with ``X-Persona-Action``, would re-queue every dead letter), sends no
  referrer (the page's address may hold ``?token=``) and no sniffing; the page and the API
  are never cached (figures and dead letters in a shared cache, or a stale page).
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from persona.errors import ConfigError
from persona.settings import Settings

__all__ = ["AccessGuard", "allowed_hosts", "check_binding", "has_token", "is_loopback"]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)
UNCACHED_PATHS = ("/", "/api/")  # the page and what it reads: "/" itself, and everything under /api/


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(settings: Settings, host: str) -> None:
    """Refuse to serve beyond this machine without a token."""
    if not is_loopback(host) and not has_token(settings):
        raise ConfigError(
            f"the dashboard would listen on {host}, reachable from other machines, with no token; "
            "set PERSONA_DASHBOARD__TOKEN (or bind to 127.0.0.1)"
        )


def has_token(settings: Settings) -> bool:
    """Whether a (non-blank) dashboard token is set."""
    # The one test of "a token is set": a blank one (PERSONA_DASHBOARD__TOKEN= in a .env)
    # guards nothing, so it counts as none (Settings already reads it as unset).
    token = settings.dashboard.token
    return token is not None and bool(token.get_secret_value().strip())


def allowed_hosts(settings: Settings, host: str) -> list[str]:
    """The Host header values a request may carry: any with a token, else this machine's names."""
    if has_token(settings):
        return ["*"]  # the token, which a rebinding page does not have, guards every route
    hosts = {*LOOPBACK_NAMES, host}
    if ":" in host:
        hosts.add(f"[{host}]")  # how an IPv6 address appears in a Host header
    return sorted(hosts)


def _host_name(header: str) -> str:
    """The name in a Host header, without its port (``[::1]:8787`` -> ``[::1]``)."""
    if header.startswith("["):
        return header[: header.find("]") + 1].lower()
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


class AccessGuard:
    """ASGI middleware: refuses a Host this dashboard does not answer to (when ``hosts`` is
    not ``["*"]``) with a sentence saying what to do, and sets the security headers."""

    def __init__(self, app: ASGIApp, hosts: list[str]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        uncached = scope["path"] == "/" or scope["path"].startswith(UNCACHED_PATHS[1])

        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                added = [*SECURITY_HEADERS, *([(b"cache-control", b"no-store")] if uncached else [])]
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        named = Headers(scope=scope).get("host", "")
        if "*" in self.hosts or _host_name(named) in self.hosts:
            await self.app(scope, receive, send_guarded)
            return
        accepted = ", ".join(h for h in self.hosts if not h.startswith("[")) or "none"
        refusal = (
            f"this dashboard answers only requests for {accepted} (with no token set, other names are refused: "
            f"a site pointing its name at this machine could read it), and this one was for {named or 'no host'!r}. "
            "Open it as http://127.0.0.1:PORT/; behind a reverse proxy, have the proxy send Host: 127.0.0.1 "
            "(nginx: proxy_set_header Host 127.0.0.1;), or set PERSONA_DASHBOARD__TOKEN and bind it wider "
            "(PERSONA_DASHBOARD__HOST=0.0.0.0): with a token, any host name is accepted\n"
        )
        await PlainTextResponse(refusal, status_code=400)(scope, receive, send_guarded)
