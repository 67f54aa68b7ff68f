"""`persona telegram`, `persona discord` and `persona access`: the chat adapters and who may use them."""

from __future__ import annotations

import datetime as dt
import json

import typer
from rich.markup import escape

from persona.cli.common import console, friendly_errors, get_settings
from persona.cli.tables import WholeNumbersTable
from persona.connection import connect
from persona.errors import ConfigError
from persona.logs import setup_logging

access_app = typer.Typer(
    help="Who may talk to the bots in private (dm_policy allowlist or pairing).", no_args_is_help=True
)


@friendly_errors
def telegram() -> None:
    """Run the Telegram bot (needs PERSONA_TELEGRAM__TOKEN; polls unless a webhook URL is set)."""
    settings = get_settings()
    if settings.telegram.token is None:
        raise ConfigError("set PERSONA_TELEGRAM__TOKEN to the token @BotFather gave you")
    setup_logging(settings)
    from adapters.telegram_bot import run_telegram

    run_telegram(settings)


@friendly_errors
def discord() -> None:
    """Run the Discord bot (needs PERSONA_DISCORD__TOKEN and the Message Content intent)."""
    settings = get_settings()
    if settings.discord.token is None:
        raise ConfigError("set PERSONA_DISCORD__TOKEN to your bot's token (Discord developer portal, Bot tab)")
    setup_logging(settings)
    from adapters.discord_bot import run_discord

    run_discord(settings)


@access_app.command()
@friendly_errors
def approve(
    code: str = typer.Argument(..., help="the pairing code the user was given"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Let the user who was given CODE talk to the bot in private."""
    from adapters.access import approve_code

    pending = approve_code(connect(get_settings()), code)
    if pending is None:
        raise ConfigError(f"no pending pairing code {code!r} (codes expire); see `persona access list`")
    if json_output:  # the pairing as `persona access list --json` listed it, now approved
        print(json.dumps({"ok": True, **pending.__dict__}))
        return
    who = f"{pending.name} " if pending.name else ""
    # A name is whatever the stranger called themselves: "[/]" broke the command, "[bold]..." styled it.
    console.print(escape(f"approved {who}({pending.platform} user {pending.user})"), highlight=False)


@access_app.command("list")
@friendly_errors
def list_access(json_output: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Approved users per platform, and pairing codes waiting for approval."""
    from adapters.access import approved_users, pending_pairings

    client = connect(get_settings())
    approved, pending = approved_users(client), pending_pairings(client)
    if json_output:
        print(json.dumps({"approved": approved, "pending": [p.__dict__ for p in pending]}))
        return
    table = WholeNumbersTable("platform", "user id", numbers=("user id",), title="approved users", header_style="bold")
    for platform, users in approved.items():
        for user in users:
            table.add_row(escape(platform), escape(user))
    console.print(table)
    waiting = WholeNumbersTable("code", "platform", "user id", "name", "asked at (UTC)", numbers=("code", "user id"),
                                title="pending pairing codes", header_style="bold")
    for p in pending:
        asked = dt.datetime.fromtimestamp(p.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M")
        waiting.add_row(*(escape(field) for field in (p.code, p.platform, p.user, p.name)), asked)
    console.print(waiting)


@access_app.command()
@friendly_errors
def revoke(
    platform: str = typer.Argument(..., help="telegram or discord"),
    user: str = typer.Argument(..., help="the user id to remove"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Withdraw a user's approval; they get a new pairing code next time they write."""
    from adapters.access import revoke_user

    platform = platform.lower()
    if platform not in ("telegram", "discord"):  # "slack 1 was not approved" read as a wrong id
        raise ConfigError(f"unknown platform {platform!r}; name telegram or discord")
    if not revoke_user(connect(get_settings()), platform, user):
        # Said as every failure is (one JSON object under --json), not as a bare line on stderr.
        raise ConfigError(f"{platform} user {user} was not approved; `persona access list` shows who is")
    if json_output:
        print(json.dumps({"ok": True, "platform": platform, "user": user}))
        return
    console.print(escape(f"revoked {platform} user {user}"), highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(telegram)
    app.command()(discord)
    app.add_typer(access_app, name="access")
