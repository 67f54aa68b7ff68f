"""The Discord adapter's slash commands: /ask, /persona, /reset, /retry, /cancel, and for
operators (user ids or a role from the settings: ``PersonaBot.is_operator``) /queue, /swap and
/rollback, the same all-or-nothing swap as the CLI's, of a version by its name (a checkpoint
folder only by the CLI, on the server). Every command keeps to the place lists and counts
against the rate limits, read before the dm_policy; past the limits the first gets the notice
and the rest nothing, as messages do. A command's refusal (a rate limit, the dm_policy, a
switch the user may not make) is shown to its user alone; every command that waits on
Redis shows "thinking…" first, since Discord drops one not answered within 3 s. The answer to
/ask and /retry goes out as the answer to a message does (``adapters.delivery``): a part Discord
fails to take is sent again where that cannot show it twice (``_Answering``), and the exchange
is kept in the conversation only once all of it went out.

``SlashCommands`` is the part of ``PersonaBot`` (``adapters.discord_bot``) that answers
them: it uses the bot's ``responder``, ``access``, ``settings``, ``tree``, its place lists
(``_place_allowed``), ``is_operator`` and ``_answering_now``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import aiohttp
import discord
from discord import app_commands

from adapters.delivery import Failure, send_parts
from adapters.discord_reading import readable
from adapters.responder import Deliver, Where
from adapters.splitting import DISCORD_MESSAGE_LIMIT_CHARS, split_message
from persona import swap as swaps
from persona.checkpoints import BASE_VERSION
from persona.connection import connect
from persona.errors import PersonaError
from persona.heartbeat import live_workers, starting_workers
from persona.monitoring import collect_stats
from persona.personas import PersonaRegistry

__all__ = ["NO_MENTIONS", "OPERATOR_ONLY_TEXT", "SlashCommands", "kept_name", "operator_role_name_text"]

log = logging.getLogger(__name__)

OPERATOR_ONLY_TEXT = "This command is for the bot's operators."
NOT_HERE_TEXT = "I'm not answering in this channel."
SLOW_DOWN_TEXT = "Please slow down a little."
FOLDER_REFUSED_TEXT = (
    "Name a version, such as v3 or base: a checkpoint folder can be swapped in only by `persona swap` on the server."
)
VERSION_NAME_PATTERN = re.compile(rf"v\d+|{BASE_VERSION}")
# How long a command waits for Redis to count it before showing "thinking…": Discord drops a
# command not answered within 3 s of its use, and the gateway took some of those to bring it.
ADMIT_WAIT_S = 1.0
# Every live worker loads and checks the new weights before the switch.
SWAP_TIMEOUT_S = 300.0
NO_MENTIONS = discord.AllowedMentions.none()  # what the bot says never pings anyone


class SlashCommands:
    """The slash commands of ``PersonaBot``, which it inherits (see the module's docstring)."""

    def _add_commands(self) -> None:
        tree = self.tree

        @tree.command(name="ask", description="Ask the persona something")
        @app_commands.describe(text="what you want to say")
        async def ask(interaction: discord.Interaction, text: str) -> None:
            kept = kept_name(interaction.id)
            text = readable(self, interaction, text)
            await self._slash_answer(
                interaction,
                lambda where, say: self.responder.answer(where, text, keep_as=kept, notify=say, deliver=say),
            )

        @tree.command(name="retry", description="Answer your last message again, differently")
        async def retry(interaction: discord.Interaction) -> None:
            kept = kept_name(interaction.id)
            await self._slash_answer(
                interaction, lambda where, say: self.responder.retry(where, keep_as=kept, notify=say, deliver=say)
            )

        @tree.command(name="reset", description="Forget our conversation")
        async def reset(interaction: discord.Interaction) -> None:
            if await self._slash_allowed(interaction, ephemeral=True):
                await self._respond(interaction, await self.responder.reset(self._where(interaction)), ephemeral=True)

        @tree.command(name="cancel", description="Withdraw the answer I am working on")
        async def cancel(interaction: discord.Interaction) -> None:
            if await self._slash_allowed(interaction, ephemeral=True):
                await self._respond(interaction, await self.responder.cancel(self._where(interaction)), ephemeral=True)

        @tree.command(name="persona", description="Show the persona here, or switch it (operators, or in DMs)")
        @app_commands.describe(name="the persona to switch to")
        async def persona(interaction: discord.Interaction, name: str | None = None) -> None:
            await self._persona(interaction, name)

        @tree.command(name="queue", description="Queue depth, in-flight work and workers (operators only)")
        async def queue(interaction: discord.Interaction) -> None:
            await self._queue_stats(interaction)

        @tree.command(name="swap", description="Switch a persona's checkpoint on every worker (operators only)")
        @app_commands.describe(persona="the persona", version="a version such as v3, or base")
        async def swap(interaction: discord.Interaction, persona: str, version: str) -> None:
            await self._swap(interaction, persona, version)

        @tree.command(name="rollback", description="Return a persona to its previous checkpoint (operators only)")
        @app_commands.describe(persona="the persona")
        async def rollback(interaction: discord.Interaction, persona: str) -> None:
            await self._swap(interaction, persona, None)

    @staticmethod
    def _where(interaction: discord.Interaction) -> Where:
        return Where(chat=str(interaction.channel_id), user=str(interaction.user.id))

    async def _slash_allowed(
        self, interaction: discord.Interaction, *, ephemeral: bool, refusal: str = "", dm_policy: bool = True
    ) -> bool:
        """The place lists, then ``refusal`` (a reason to refuse that needs no Redis), then the rate
        limits, then in DMs the dm_policy (unless not ``dm_policy``: operators' commands); a
        refused user is told why, alone. An allowed command shows "thinking…" (``ephemeral``: to
        its user alone) before the dm_policy waits on Redis: Discord drops a command not answered
        within 3 s, and a restarting Redis takes longer than that to say so."""
        if interaction.guild_id is not None and not await self._place_allowed(interaction.guild_id, interaction.channel):
            refusal = NOT_HERE_TEXT
        if refusal:
            await self._respond(interaction, refusal, ephemeral=True)
            return False
        if not await self._within_limits(interaction, ephemeral=ephemeral):
            return False
        if not interaction.response.is_done():
            await interaction.response.defer(ephemeral=ephemeral, thinking=True)
        if interaction.guild_id is None and dm_policy:
            decision = await self.access.check(str(interaction.user.id), interaction.user.name)
            if not decision.allowed:
                await self._refuse(interaction, decision.reply, thinking_in_public=not ephemeral)
                return False
        return True

    async def _within_limits(self, interaction: discord.Interaction, *, ephemeral: bool) -> bool:
        """Count the command against the rate limits. Over them, the first gets the notice, to its
        user alone, and the rest nothing, as messages do. A Redis slower than ADMIT_WAIT_S to count
        it gets "thinking…" shown meanwhile (``ephemeral``: to its user alone), and a refusal then
        replaces it: a "thinking…" is never left unanswered."""
        counting = asyncio.ensure_future(self.responder.admit(self._where(interaction)))
        await asyncio.wait({counting}, timeout=ADMIT_WAIT_S)
        if not counting.done():
            await interaction.response.defer(ephemeral=ephemeral, thinking=True)
        decision, notice = await counting
        if decision.allowed:
            return True
        if interaction.response.is_done():
            await self._refuse(interaction, notice or SLOW_DOWN_TEXT, thinking_in_public=not ephemeral)
        elif notice:
            await self._respond(interaction, notice, ephemeral=True)
        return False

    async def _operator_allowed(self, interaction: discord.Interaction, refusal: str = "") -> bool:
        """``_slash_allowed`` for an operator's command: the place lists, then whether the user is an
        operator (there), then ``refusal``, then the rate limits; "thinking…" shows, to them alone.
        The dm_policy is for people talking to the persona, not for its operators."""
        refusal = refusal if self.is_operator(interaction.user) else OPERATOR_ONLY_TEXT
        return await self._slash_allowed(interaction, ephemeral=True, refusal=refusal, dm_policy=False)

    async def _refuse(self, interaction: discord.Interaction, text: str, *, thinking_in_public: bool) -> None:
        """Tell a command's user alone why not, after its "thinking…". Discord fixes a response's
        visibility when it is deferred, and the first follow-up fills that response in: after a
        public "thinking…" the refusal would be shown to the whole channel. So that one is
        deleted first, and the refusal follows on its own, for its user's eyes only."""
        if thinking_in_public:
            try:
                await interaction.delete_original_response()
            except discord.HTTPException as exc:  # the refusal still goes out, if in public
                log.warning('could not delete a public "thinking…" before a refusal: %s', exc)
        await self._respond(interaction, text, ephemeral=True)

    async def _slash_answer(
        self, interaction: discord.Interaction, make: Callable[[Where, Deliver], Awaitable[object]]
    ) -> None:
        """Rate-limit, show "thinking…" while the queue works, then let ``make`` say the answer
        (and any notice before it) through the ``Deliver`` it is given."""
        if not await self._slash_allowed(interaction, ephemeral=False):
            return
        with self._answering_now():
            await make(self._where(interaction), _Answering(interaction).say)

    async def _persona(self, interaction: discord.Interaction, name: str | None) -> None:
        """Show the persona (to the user alone), or switch it (for all to see)."""
        refusal = self._switch_refusal(interaction, name.lower()) if name is not None else ""
        if not await self._slash_allowed(interaction, ephemeral=name is None, refusal=refusal):
            return
        chat = str(interaction.channel_id)
        if name is None:
            text = await self.responder.persona_text(chat)
        else:
            text = await self.responder.set_persona(chat, name.lower())
        await self._respond(interaction, text, ephemeral=name is None)

    def _switch_refusal(self, interaction: discord.Interaction, name: str) -> str:
        """Why this user cannot switch a server channel to ``name``, or '' when they may try. The
        settings and persona files tell, so the refusal comes before any public "thinking…".
        In a DM the dm_policy is checked first, and nothing there is public."""
        if interaction.guild_id is None:
            return ""
        if not self.is_operator(interaction.user):
            return "Only the bot's operators can switch the persona in a server channel."
        return self.responder.unknown_persona_text(name)

    async def _queue_stats(self, interaction: discord.Interaction) -> None:
        """Operator-only: queue depths, outcomes and live workers. "Thinking…" goes first, as
        for every command that reads Redis: a slow or restarting Redis takes longer than the
        3 s Discord waits for a first response."""
        if not await self._operator_allowed(interaction):
            return

        def read() -> str:
            client = connect(self.settings)
            try:
                stats = collect_stats(client, default_deadline_s=self.settings.queue.default_deadline_s)
            finally:
                client.close()
            lines = [f"{s.name}: {s.waiting} waiting, {s.in_flight} in flight" for s in stats.streams]
            lines.append(f"completed {stats.completed}, failed {stats.failed}, dead letters {stats.dead_letters}")
            lines.append(f"workers: {len(stats.workers)} live")
            return "\n".join(lines)

        try:
            text = await asyncio.to_thread(read)
        except Exception as exc:  # the operator hears what failed rather than nothing
            log.exception("queue stats failed")
            text = f"Could not read the queue ({exc}). Try again in a minute; if it keeps failing, check Redis."
        await self._respond(interaction, text, ephemeral=True)

    async def _swap(self, interaction: discord.Interaction, name: str, target: str | None) -> None:
        """Operator-only: the same all-or-nothing swap as `persona swap` / `persona rollback`, to a
        version named (``target``; None: the one before). A folder path is refused: it names files
        on the bot's machine, which only the CLI there takes."""
        target = target.strip().lower() if target is not None else None
        refusal = FOLDER_REFUSED_TEXT if target is not None and not VERSION_NAME_PATTERN.fullmatch(target) else ""
        if not await self._operator_allowed(interaction, refusal):  # "thinking…": a swap takes seconds
            return
        try:
            by = f"discord:{interaction.user} ({interaction.user.id})"  # the swap log says which operator
            text = await asyncio.to_thread(self._run_swap, name.strip().lower(), target, by)
        except PersonaError as exc:
            text = str(exc)
        except Exception as exc:  # the operator hears what failed rather than nothing
            log.exception("swap failed")
            text = f"The swap failed: {exc}"
        await self._respond(interaction, text, ephemeral=True)

    def _run_swap(self, name: str, target: str | None, by: str) -> str:
        client = connect(self.settings)
        try:
            persona = PersonaRegistry.from_settings(self.settings).get(name)
            kind = "swap" if target else "rollback"
            target = target or swaps.rollback_target(client, persona.name)
            if target == swaps.current_version(client, persona):
                return f"{persona.name} already serves {target}."
            if not live_workers(client):
                if starting_workers(client):
                    return "A worker is still starting (loading its models); try again once it serves."
                return "No worker is running to load it; start one, or run `persona swap` on the server."
            if not swaps.voters(client, persona.name):  # none would load and check it before the flip
                return (f"No running worker serves {persona.name}, so none can check {target} first; run "
                        "`persona swap` on the server (it checks it there).")
            outcome = swaps.swap_persona(client, persona, target, kind=kind, timeout_s=SWAP_TIMEOUT_S, by=by)
            if not outcome.committed:
                return outcome.problem
            was = outcome.proposal.previous
            return f"{persona.name} now serves {target} (was {was}); {len(outcome.votes)} worker(s) switched."
        finally:
            client.close()

    async def _respond(self, interaction: discord.Interaction, text: str, *, ephemeral: bool = False) -> None:
        """Answer an interaction (first response or follow-ups), split at the limit."""
        for chunk in split_message(text, DISCORD_MESSAGE_LIMIT_CHARS) or ["…"]:
            if interaction.response.is_done():
                await interaction.followup.send(chunk, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS)
            else:
                await interaction.response.send_message(chunk, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS)


class _Answering:
    """What /ask or /retry says after its public "thinking…", each part sent again while a second
    try cannot show it twice. The first part fills "thinking…" in by editing the original
    response: an edit sent twice shows the same words once, so it is tried again after any 5xx,
    dropped connection or timeout. The parts after it are follow-ups, which are webhook
    executions: Discord's API takes no nonce for those, so one that may have been posted (its
    connection dropped or timed out once sent) is not sent again, and one that failed to connect
    at all is. discord.py itself sends a follow-up or an edit again after each 5xx, 5 times over
    about 25 s; after that the part counts as not sent."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.thinking = True  # the original response still says "thinking…"

    async def say(self, text: str) -> bool:
        """Send ``text`` in as many messages as it takes; whether all went out."""
        parts = split_message(text, DISCORD_MESSAGE_LIMIT_CHARS)
        return await send_parts(parts, self._send, self._failure, to=f"Discord channel {self.interaction.channel_id}")

    async def _send(self, chunk: str) -> None:
        if self.thinking:
            await self.interaction.edit_original_response(content=chunk, allowed_mentions=NO_MENTIONS)
            self.thinking = False
        else:
            await self.interaction.followup.send(chunk, allowed_mentions=NO_MENTIONS)

    def _failure(self, exc: Exception) -> Failure | None:
        """What a failed edit (``thinking``) or follow-up means (see the class's docstring)."""
        if isinstance(exc, aiohttp.ClientConnectorError):  # no connection was made: nothing was sent
            return Failure.TRY_AGAIN
        lost = isinstance(exc, aiohttp.ClientError | OSError | asyncio.TimeoutError)
        if self.thinking and (lost or isinstance(exc, discord.DiscordServerError)):
            return Failure.TRY_AGAIN
        if lost:
            return Failure.MAY_HAVE_ARRIVED
        if isinstance(exc, discord.DiscordException):
            return Failure.REFUSED  # a 4xx (the interaction expired...), or 5xx after discord.py's own tries
        return None


def operator_role_name_text(role: str) -> str:
    """Why the operators' role cannot be given by its name alone (``PersonaBot`` refuses to start)."""
    return (
        f"PERSONA_DISCORD__OPERATOR_ROLE names the role {role!r}, which anyone can give themselves in a server of "
        "their own that they invite the bot to: set it to the role's id (Developer Mode on, right-click the role, "
        "Copy Role ID), or list your servers in PERSONA_DISCORD__ALLOWED_GUILDS"
    )


def kept_name(interaction_id: int) -> str:
    """Where a slash command's answer keeps its exchange (see ``PersonaBot._slash_exchange``)."""
    return f"interaction:{interaction_id}"
